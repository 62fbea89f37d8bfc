"""The training program: settings -> data -> model -> epochs -> test -> model directory and reports.

Two ways in, one program:

* ``main()``: the SageMaker entry. The image sets
  SAGEMAKER_TRAINING_MODULE=kennel_train.main:main, so the sagemaker-training
  toolkit's ``train`` imports this module and calls main() in its own process.
  The toolkit turns any exception into "Framework Error: <traceback>" and a
  SystemExit into exit code 0, so main() catches everything itself, writes the
  one-line failure reason first (the toolkit never overwrites it) and raises
  the toolkit's ClientError, which the toolkit reports with exit code 1.
* ``python -m kennel_train [--epochs 3 ...]``: the same run without the
  toolkit (compose, tests, a laptop); exit code 0, 1 on failure, 128+signal
  when stopped by a signal.

Several hosts or GPUs (resourceconfig.json): torchrun's elastic agent starts
one process per GPU or per CPU host (kennel_train.launch), one model trained
data-parallel (kennel_train.distributed); rank 0 alone writes the checkpoints,
the model and the reports; this host's one failure reason is written here.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import os
import platform
import random
import sys
import time
import traceback
from typing import Any, Mapping, Sequence

import torch

import kennel_artifact
from kennel_artifact import IMAGENET_EVAL, Manifest

from . import checkpoint, contract, data, device, distributed, export, launch, loop, quantize, reports
from .cluster import DistributedError, Layout, Settings, plan, read_cluster
from .failure import Stopped, TrainingFailure, is_out_of_memory, is_shared_memory_exhausted, reason_for, write_failure
from .model import SplitModel, build_network, describe_head, find_pretrained, load_backbone
from .progress import configure_logging, format_duration
from .stop import StopRequest

log = logging.getLogger("kennel_train")

CHECK_IMAGES = 8  # evaluation images the ONNX export is verified on


# --------------------------------------------------------------------------- entry points


def main() -> None:
    """SageMaker entry point (the toolkit calls it in-process); raises ClientError with the reason on failure."""
    from sagemaker_training import errors

    code, reason = run(flags=None)
    if code != 0:
        raise errors.ClientError(reason or f"training failed with exit code {code}")


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m kennel_train``: flags override everything else; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m kennel_train", description="Train the dog-breed classifier on an /opt/ml layout.",
        epilog="Precedence: defaults < KENNEL_<NAME> environment variables < hyperparameters.json < flags.")
    parser.add_argument("--base-dir", help="the /opt/ml folder (default: $SAGEMAKER_BASE_DIR or /opt/ml)")
    for setting in contract.SETTINGS:
        default = "auto" if setting.default is None else str(setting.default).lower()
        parser.add_argument(setting.flag, dest=setting.name, metavar="VALUE",
                            # argparse formats help with %: a literal one ("98%") must be doubled
                            help=f"{setting.help} (default {default}; env {setting.env})".replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    base_dir = args.pop("base_dir")
    if base_dir:
        os.environ[contract.BASE_DIR_ENV] = base_dir
    code, _ = run(flags={name: value for name, value in args.items() if value is not None})
    return code


def run(flags: Mapping[str, str] | None) -> tuple[int, str | None]:
    """Start this host's process(es); write the one failure reason; return (exit code, reason or None)."""
    configure_logging()
    paths = contract.Paths.from_env()
    # What an earlier run left (compose reuses ./output) must not describe this one.
    paths.failure.unlink(missing_ok=True)
    (paths.output / "success").unlink(missing_ok=True)
    try:
        settings = Settings.from_env()
        layout = plan(read_cluster(paths.resource_config), settings)
        code, reason = launch.launch(run_rank, layout, settings, (dict(flags or {}),))
    except DistributedError as error:
        code, reason = 1, str(error)
    if code == 0:
        log.info("training complete")
        return 0, None
    reason = reason or f"training failed with exit code {code}"
    write_failure(paths.failure, reason)
    log.error("training failed: %s", reason)
    return code, reason


def run_rank(local_rank: int, layout: Layout, settings: Settings,
             flags: dict[str, str]) -> tuple[int, str | None]:
    """One training process: join the others, train, agree on the outcome; return (exit code, reason or None)."""
    configure_logging()
    paths = contract.Paths.from_env()
    stop = StopRequest().install()
    group = None
    failure, code = None, 0
    try:
        group = distributed.join(layout, settings, local_rank)
        train(paths, flags, group, stop)
    except Stopped as error:
        failure, code = str(error), 128 + error.signal_number
    except (Exception, KeyboardInterrupt) as error:
        failure, code = _describe(error, group), 1
    finally:
        stop.restore()
    if group is not None:
        agreed = group.finish(failure)
        group.close(finished=True)
        if agreed and not failure:
            failure, code = agreed, 1
        if failure and group.distributed:
            log.error("%s failed: %s", group.label, failure)
    return code, failure


def _describe(error: BaseException, group: distributed.Group | None) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted by SIGINT twice: stopped at once, without saving a checkpoint"
    if isinstance(error, DistributedError):
        return str(error)
    peer = group.describe(error) if group is not None else None
    if peer:
        return peer
    if not isinstance(error, TrainingFailure):
        log.error("%s", traceback.format_exc().rstrip())  # the log gets the traceback, the reason one line
    return reason_for(error)


# --------------------------------------------------------------------------- the run


def train(paths: contract.Paths, flags: Mapping[str, str], group: distributed.Group, stop: StopRequest) -> None:
    resolved = contract.resolve(paths, flags=flags)
    hp = resolved.hyperparameters
    for name, value in hp.to_json().items():
        log.info("setting %s=%s (%s)", name, "auto" if value is None else value, resolved.sources[name])
    runtime = device.select(hp.device, hp.mixed_precision, cuda_index=group.local_rank)
    log.info("device %s; %d usable CPUs", runtime.describe(), runtime.cpus)
    try:
        _train(paths, hp, group, stop, runtime)
    except Exception as error:
        if is_out_of_memory(error) or is_shared_memory_exhausted(error):
            context = f"batch_size={hp.batch_size}, {hp.architecture}, {runtime.describe()}"
            raise TrainingFailure(reason_for(error, context)) from error
        raise


def _stop_if_requested(stop: StopRequest, where: str) -> None:
    if stop.requested:
        raise Stopped(f"stopped by {stop.signal_name} {where}; nothing to save yet", stop.signal_number)


def _train(paths: contract.Paths, hp: contract.Hyperparameters, group: distributed.Group, stop: StopRequest,
           runtime: device.Runtime) -> None:
    leader = group.is_leader

    # ---- data: three splits, the training split's classes, unreadable files counted
    splits = contract.locate_splits(paths)
    train_index = data.index_split("train", splits.train)
    classes = train_index.classes
    valid_index = data.index_split("valid", splits.valid, classes)
    test_index = data.index_split("test", splits.test, classes)
    indexes = {"train": train_index, "valid": valid_index, "test": test_index}
    data.check_splits(list(indexes.values()), hp.max_unreadable_fraction)
    log.info("data: %s; %d classes; %s", splits.layout, len(classes), "; ".join(
        f"{name} {index.total} images ({len(index.unreadable)} unreadable)" for name, index in indexes.items()))
    for index in indexes.values():
        for name in index.unreadable[:10]:
            log.warning("skipping unreadable image %s/%s", index.name, name)
    group.agree("data", f"{len(classes)} classes, " + ", ".join(f"{n} {i.total}" for n, i in indexes.items()),
                (f"{n}/{os.path.relpath(path, i.root)}" for n, i in indexes.items() for path, _ in i.samples))
    _stop_if_requested(stop, "while indexing the data")

    # ---- model: a seeded network, ImageNet backbone weights, the trainable part and its optimizer
    preprocessing = IMAGENET_EVAL  # what the artifact records and serving applies
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    network = build_network(hp.architecture, hp.head, len(classes))
    if hp.pretrained:
        weights = find_pretrained(hp.architecture, contract.pretrained_channel(paths))
        load_backbone(network, weights)
        log.info("pretrained backbone weights: %s", weights)
    engine = hp.backbone_engine
    if engine == "auto":
        engine = "onnxruntime" if not runtime.is_cuda and runtime.precision == "fp32" else "torch"
    model = SplitModel(network, fine_tune=not hp.freeze_backbone, runtime=runtime, wrap=group.wrap, engine=engine,
                       input_size=preprocessing.input_size)
    optimizer = _optimizer(hp, model.parameters())
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    log.info("model %s, head %s, training %s: %d trainable of %d parameters; frozen layers run by %s",
             hp.architecture, hp.head, "the head" if hp.freeze_backbone else "layer4 and the head",
             sum(p.numel() for p in model.parameters()), sum(p.numel() for p in network.parameters()), engine)

    # ---- resume from the newest intact checkpoint (the leader reads it, every rank gets it)
    identity = {"architecture": hp.architecture, "head": hp.head, "freeze_backbone": hp.freeze_backbone,
                "class_names": classes}
    found = checkpoint.latest(paths.checkpoints, identity) if leader else None
    found = group.broadcast(found)
    history: list[dict[str, Any]] = []
    skipped_files: dict[str, list[int]] = {name: [] for name in indexes}
    start_epoch, partial = 1, None
    if found is not None:
        progress, path, state = found
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng(state["rng"])
        history, skipped_files = state["history"], state["skipped_files"]
        if progress.step is None:
            start_epoch = progress.epoch + 1
        elif state.get("world_size", 1) != group.world_size:
            # A rank's place in the epoch depends on the number of ranks: redo the epoch.
            start_epoch = progress.epoch
            log.warning("the checkpoint was written by %d ranks, this run has %d: epoch %d starts over",
                        state.get("world_size", 1), group.world_size, progress.epoch)
        else:
            start_epoch, partial = progress.epoch, loop.PassResult.from_json(state["partial_train"])
            if not leader:  # the saved sums are all ranks' (reduced): the leader carries them on
                partial = loop.PassResult(positions=partial.positions, steps=partial.steps)
        log.info("resuming from checkpoint %s (%s)", path.name, progress.describe())
        if progress.epoch > hp.epochs:
            log.warning("the checkpoint holds %d epochs, more than epochs=%d: testing and exporting it as it is",
                        progress.epoch, hp.epochs)
    del found

    # ---- loaders: decoding in worker processes; evaluation uses the serving preprocessing
    workers = hp.workers if hp.workers is not None else min(runtime.cpus, 8)
    pin = runtime.is_cuda
    train_set = data.ImageFiles(train_index.samples, data.TrainTransform(preprocessing))
    train_sampler = data.ResumableSampler(train_set, shuffle=True, seed=hp.seed, rank=group.rank,
                                          world_size=group.world_size)
    train_loader = data.make_loader(train_set, train_sampler, hp.batch_size, workers, pin, persistent=True,
                                    seed=(hp.seed, group.rank, start_epoch))  # each rank its own augmentation
    eval_sets = {name: data.ImageFiles(indexes[name].samples, data.EvalTransform(preprocessing))
                 for name in ("valid", "test")}

    def eval_loader(name: str, persistent: bool):
        shard = group.shard(eval_sets[name])
        return data.make_loader(shard, data.ResumableSampler(shard, shuffle=False, seed=0), hp.batch_size,
                                workers, pin, persistent)

    valid_loader = eval_loader("valid", persistent=True)
    board = reports.TensorBoard(paths.tensorboard) if leader else None

    def check_skipped(name: str, result: loop.PassResult) -> None:
        skipped_files[name] = sorted(set(skipped_files[name]) | set(result.skipped))
        data.check_unreadable(indexes[name], len(indexes[name].unreadable) + result.skipped_count,
                              hp.max_unreadable_fraction)

    def state(partial_train: loop.PassResult | None) -> dict[str, Any]:
        return {"model": checkpoint.cpu_state_dict(network), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(), "identity": identity,
                "hyperparameters": hp.to_json(), "history": history, "skipped_files": skipped_files,
                "partial_train": partial_train.to_json() if partial_train else None,
                "world_size": group.world_size}

    # ---- epochs
    run_started, epochs_run = time.monotonic(), 0
    for epoch in range(start_epoch, hp.epochs + 1):
        resumed = partial if epoch == start_epoch else None
        train_sampler.set_epoch(epoch, start=resumed.positions if resumed else 0)
        train_result = None
        try:
            train_result = loop.train_one_epoch(model, train_loader, optimizer, scaler, epoch, hp.epochs, group,
                                                stop, hp.progress_interval, resumed)
            valid_result = loop.evaluate(model, valid_loader, "valid", epoch, hp.epochs, len(classes), group, stop,
                                         hp.progress_interval)
        except loop.Interrupted as interrupted:
            done = interrupted.partial if interrupted.phase == "train" else train_result
            done = done.reduced(group)  # every rank stopped at this step: save the sums of all
            where = checkpoint.Position(epoch, done.steps)
            saved = checkpoint.save(paths.checkpoints, where, state(done)) if leader else None
            signal_name = stop.signal_name if stop.requested else "SIGTERM"
            on = f"on {', '.join(interrupted.hosts)} " if group.distributed else ""
            raise Stopped(f"stopped by {signal_name} {on}at epoch {epoch} step {done.steps} ({interrupted.phase}); "
                          f"checkpoint saved to {saved or paths.checkpoints}: run again to resume",
                          stop.signal_number or 15) from None
        train_total, valid_total = train_result.reduced(group), valid_result.reduced(group)
        if group.distributed:
            log.info("%s epoch=%d processed train_images=%d of %d valid_images=%d of %d", group.label, epoch,
                     train_result.positions, len(train_set), valid_result.positions, len(eval_sets["valid"]))
        check_skipped("train", train_total)
        check_skipped("valid", valid_total)
        row = {"epoch": epoch, "train_loss": train_total.loss, "train_accuracy": train_total.accuracy,
               "valid_loss": valid_total.loss, "valid_accuracy": valid_total.accuracy,
               "train_images_per_second": train_total.images_per_second * group.world_size,
               "train_seconds": train_total.seconds, "valid_seconds": valid_total.seconds}
        history.append(row)
        epochs_run += 1
        log.info("epoch=%d train_loss=%.4f train_accuracy=%.4f", epoch, row["train_loss"], row["train_accuracy"])
        log.info("epoch=%d valid_loss=%.4f valid_accuracy=%.4f", epoch, row["valid_loss"], row["valid_accuracy"])
        eta = (time.monotonic() - run_started) / epochs_run * (hp.epochs - epoch)
        log.info("progress epoch=%d/%d train_images_per_second=%.1f epoch_seconds=%.1f eta=%s", epoch, hp.epochs,
                 row["train_images_per_second"], row["train_seconds"] + row["valid_seconds"], format_duration(eta))
        if leader:
            board.epoch(row)
            saved = checkpoint.save(paths.checkpoints, checkpoint.Position(epoch, None), state(None))
            checkpoint.prune(paths.checkpoints, hp.keep_checkpoints)
            log.info("checkpoint %s", saved)
    del train_loader, valid_loader  # their worker processes end here

    # ---- test, in float32: the exported model runs in float32, so this is what the endpoint will score
    epochs_done = history[-1]["epoch"] if history else 0
    try:
        test_result = loop.evaluate(model, eval_loader("test", persistent=False), "test", epochs_done, hp.epochs,
                                    len(classes), group, stop, hp.progress_interval, autocast=False)
    except loop.Interrupted:
        raise Stopped(f"stopped by {stop.signal_name} during the test pass after {epochs_done} epochs; the "
                      f"checkpoint in {paths.checkpoints} holds them: run again to test and export",
                      stop.signal_number or 15) from None
    test_total = test_result.reduced(group)
    check_skipped("test", test_total)
    log.info("test_loss=%.4f test_accuracy=%.4f", test_total.loss, test_total.accuracy)
    # The original system's lines: its tuning jobs match "Testing Loss: ([0-9\.]+)".
    log.info("Testing Loss: %.4f", test_total.loss)
    log.info("Testing Accuracy: %.4f", test_total.accuracy)
    if group.distributed:
        log.info("%s parameters sha256=%s", group.label, distributed.parameter_digest(network))
    if not leader:
        return

    # ---- the model directory and the reports (leader only)
    counts = {name: {"images": len(index.samples) - len(skipped_files[name]), "files": index.total,
                     "unreadable": len(index.unreadable) + len(skipped_files[name])}
              for name, index in indexes.items()}
    metrics = {"test_loss": test_total.loss, "test_accuracy": test_total.accuracy, "epochs": epochs_done}
    if history:
        metrics.update({key: history[-1][key] for key in ("train_loss", "train_accuracy", "valid_loss",
                                                          "valid_accuracy")})
    manifest = Manifest(architecture=hp.architecture, class_names=classes, preprocessing=preprocessing,
                        head=describe_head(network, hp.head), hyperparameters=hp.to_json(),
                        metrics=_finite(metrics), data={"layout": splits.layout, "splits": counts},
                        versions=versions())
    parity = export.write_model_dir(paths.model, network, manifest, _check_images(eval_sets["test"]),
                                    backbone_frozen=hp.freeze_backbone)
    log.info("model written to %s (ONNX max abs difference %.2g, tolerance %.2g)", paths.model,
             parity["onnx_max_abs_diff"], parity["onnx_tolerance"])
    if manifest.shares_backbone:
        log.info("shared backbone %s (%s and %s, max abs difference %.2g)", manifest.backbone["sha256"],
                 kennel_artifact.BACKBONE_FILE, kennel_artifact.HEAD_FILE, parity["split_onnx_max_abs_diff"])
    if hp.int8:
        log.info("int8: quantizing the model and scoring it beside FP32 on %d validation images",
                 len(valid_index.samples))
        int8 = quantize.build_int8(paths.model, manifest, train_index.samples, valid_index.samples, seed=hp.seed)
    else:
        int8 = quantize.skip(paths.model, manifest, "turned off by the setting int8=false")
    log.info("%s", quantize.describe(int8))
    board.test(epochs_done, test_total.loss, test_total.accuracy)
    board.close()
    rows = reports.per_class_rows(classes, test_total.per_class_correct, test_total.per_class_count)
    reports.write_per_class(paths.output_data, rows)
    reports.write_metrics(paths.output_data, {
        "epochs": history, "test": {"loss": test_total.loss, "accuracy": test_total.accuracy,
                                    "images": int(test_total.count), "precision": "fp32"},
        "data": counts, "hyperparameters": hp.to_json(), "onnx": parity, "int8": int8,
        "runtime": {"device": str(runtime.device), "precision": runtime.precision, "threads": runtime.threads,
                    "world_size": group.world_size}})
    if history:
        reports.plot_curves(paths.output_data, history)
    log.info("reports written to %s", paths.output_data)


# --------------------------------------------------------------------------- helpers


def _optimizer(hp: contract.Hyperparameters, parameters) -> torch.optim.Optimizer:
    parameters = list(parameters)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.Adam(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)


def _check_images(dataset: data.ImageFiles) -> torch.Tensor:
    """The first few readable evaluation images, preprocessed exactly as serving will."""
    images = []
    for index in range(len(dataset)):
        image, _, _ = dataset[index]
        if image is not None:
            images.append(image)
        if len(images) == CHECK_IMAGES:
            break
    return torch.stack(images)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in values.items()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "pillow", "sagemaker-training"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["kennel_artifact_format"] = str(kennel_artifact.FORMAT_VERSION)
    return found


if __name__ == "__main__":
    sys.exit(cli())
