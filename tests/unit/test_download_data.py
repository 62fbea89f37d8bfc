"""kennel-download-data (kennel_ops/download_data.py): the dataset check and the unpacking, on generated trees (no download)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from kennel_ops import download_data

SMALL = {"train": 4, "valid": 2, "test": 2}
BREEDS = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]


def make_tree(root: Path, breeds=BREEDS, per_class=None) -> Path:
    per_class = per_class or {split: count // 2 for split, count in SMALL.items()}
    for split, count in per_class.items():
        for breed in breeds:
            folder = root / split / breed
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{breed[4:]}_{i:05d}.jpg").write_bytes(b"\xff\xd8")
    return root


def check_small(root: Path) -> list[str]:
    return download_data.check_dataset(root, expected_classes=2, expected_images=SMALL)


def test_complete_tree_passes(tmp_path):
    assert check_small(make_tree(tmp_path, BREEDS[:2])) == []


def test_real_expectations_report_every_count(tmp_path):
    problems = download_data.check_dataset(make_tree(tmp_path, BREEDS[:2]))
    assert len(problems) == 6  # 3 splits x (class count, image count)
    assert f"{tmp_path / 'train'}: 2 class folders, expected 133" in problems
    assert f"{tmp_path / 'train'}: 4 images, expected 6680" in problems
    assert f"{tmp_path / 'test'}: 2 images, expected 836" in problems


def test_missing_split_and_differing_classes(tmp_path):
    make_tree(tmp_path, BREEDS[:2], {"train": 2, "valid": 1})
    (tmp_path / "valid" / BREEDS[1]).rename(tmp_path / "valid" / BREEDS[2])
    problems = check_small(tmp_path)
    assert f"{tmp_path / 'test'}: missing" in problems
    assert any(p.startswith(f"{tmp_path / 'valid'}: classes differ from train/") and BREEDS[2] in p
               for p in problems), problems


def test_misnamed_class_folder(tmp_path):
    make_tree(tmp_path, ["001.Affenpinscher", "Afghan hound"])
    assert any("not named like 001.Affenpinscher: Afghan hound" in p for p in check_small(tmp_path))


def test_non_images_are_not_counted(tmp_path):
    make_tree(tmp_path, BREEDS[:2])
    (tmp_path / "train" / BREEDS[0] / "notes.txt").write_text("x")
    (tmp_path / "train" / BREEDS[0] / "Affenpinscher_00000.jpg").unlink()
    assert check_small(tmp_path) == [f"{tmp_path / 'train'}: 3 images, expected 4"]


def test_unpack_takes_the_top_folder_and_drops_macos_metadata(tmp_path):
    tree = make_tree(tmp_path / "src" / "dogImages", BREEDS[:2])
    archive = tmp_path / "dogImages.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(tree.rglob("*")):
            bundle.write(path, path.relative_to(tmp_path / "src"))
        bundle.writestr("__MACOSX/dogImages/._x", b"")
    root = download_data.unpack(archive, tmp_path / "dest")
    assert root == tmp_path / "dest" / "dogImages"
    assert check_small(root) == []
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["dogImages"]


def test_unpack_refuses_paths_outside_the_destination(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("dogImages/../../escaped.txt", b"x")
    with pytest.raises(OSError, match="unsafe path"):
        download_data.unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists()


def test_check_only_cli_exit_codes(tmp_path, capsys):
    make_tree(tmp_path, BREEDS[:2])
    assert download_data.main(["--check-only", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(line.startswith("download_data: ") for line in err)
