"""kennel_train.checkpoint and stop: atomic writes, corruption fallback, pruning, the SIGTERM flag."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal

import pytest
import torch

from kennel_train import checkpoint
from kennel_train.checkpoint import Position
from kennel_train.failure import TrainingFailure
from kennel_train.stop import StopRequest

IDENTITY = {"architecture": "resnet18", "head": "original", "freeze_backbone": True, "class_names": ["a", "b"]}


def state(marker: float) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": {k: torch.full_like(v, marker) for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(), "identity": IDENTITY,
            "history": [{"epoch": 1, "train_loss": marker}], "partial_train": None}


def test_names_order_and_sidecar(tmp_path):
    checkpoint.save(tmp_path, Position(2, None), state(2.0))
    checkpoint.save(tmp_path, Position(3, 17), state(3.5))
    checkpoint.save(tmp_path, Position(3, 4), state(3.1))
    checkpoint.save(tmp_path, Position(10, None), state(10.0))
    names = [path.name for _, path in checkpoint.candidates(tmp_path)]
    assert names == ["epoch-0010.pt", "epoch-0003-step-000017.pt", "epoch-0003-step-000004.pt", "epoch-0002.pt"]
    meta = json.loads((tmp_path / "epoch-0003-step-000017.json").read_text())
    assert (meta["epoch"], meta["step"], len(meta["sha256"])) == (3, 17, 64)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_the_newest_intact_checkpoint_is_resumed_with_everything_in_it(tmp_path):
    checkpoint.save(tmp_path, Position(1, None), state(1.0))
    saved = state(2.0)
    torch.manual_seed(123)
    saved["rng"] = checkpoint.rng_state()
    expected_draw = torch.rand(4)
    checkpoint.save(tmp_path, Position(2, 5), saved)
    progress, path, loaded = checkpoint.latest(tmp_path, IDENTITY)
    assert progress == Position(2, 5) and path.name == "epoch-0002-step-000005.pt"
    assert torch.equal(loaded["model"]["weight"], torch.full((2, 3), 2.0))
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    torch.manual_seed(999)
    checkpoint.restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(4), expected_draw)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_sidecar", "empty"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    checkpoint.save(tmp_path, Position(1, None), state(1.0))
    newest = checkpoint.save(tmp_path, Position(2, None), state(2.0))
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no_sidecar":
        newest.with_suffix(".json").unlink()
    elif damage == "bad_sidecar":
        newest.with_suffix(".json").write_text("{")
    else:
        newest.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="kennel_train"):
        progress, path, loaded = checkpoint.latest(tmp_path, IDENTITY)
    assert progress == Position(1, None)
    assert torch.equal(loaded["model"]["weight"], torch.full((2, 3), 1.0))
    assert "checkpoint epoch-0002.pt is unusable" in caplog.text and "trying the previous one" in caplog.text


def test_a_file_with_a_matching_checksum_that_torch_cannot_load_is_unusable(tmp_path):
    path = checkpoint.save(tmp_path, Position(1, None), state(1.0))
    path.write_bytes(b"not a torch file")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(b"not a torch file").hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.Unusable, match="cannot be loaded"):
        checkpoint.read(path)
    assert checkpoint.latest(tmp_path, IDENTITY) is None


def test_nothing_to_resume(tmp_path):
    assert checkpoint.latest(tmp_path / "absent", IDENTITY) is None
    (tmp_path / "notes.txt").write_text("x")
    assert checkpoint.latest(tmp_path, IDENTITY) is None


def test_a_checkpoint_of_another_model_is_an_error_not_silently_skipped_or_deleted(tmp_path):
    path = checkpoint.save(tmp_path, Position(1, None), state(1.0))
    other = dict(IDENTITY, architecture="resnet50", class_names=["a", "c"])
    with pytest.raises(TrainingFailure) as caught:
        checkpoint.latest(tmp_path, other)
    message = str(caught.value)
    assert "belongs to a different run (architecture 'resnet18' there, 'resnet50' here; different class names)" \
        in message and "start with an empty checkpoint folder" in message
    assert path.exists()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path, Position(1, None), state(1.0))
    before = path.read_bytes()

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, Position(1, None), state(5.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.json", "epoch-0001.pt"]


def test_prune_keeps_the_newest_epochs_and_drops_superseded_mid_epoch_ones(tmp_path):
    for progress in (Position(1, None), Position(2, 3), Position(2, None), Position(3, None), Position(4, 2)):
        checkpoint.save(tmp_path, progress, state(1.0))
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch-0002.pt", "epoch-0003.pt",
                                                             "epoch-0004-step-000002.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["epoch-0002.json", "epoch-0003.json",
                                                               "epoch-0004-step-000002.json"]


def test_sigterm_sets_the_flag_and_the_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        assert stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_sigint_stops_at_once():
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
