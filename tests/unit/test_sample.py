"""The bundled sample: the original layout, class names like dogImages', same seed -> same bytes."""
from pathlib import Path

from kennel_train import sample

COUNTS = {"train": 2, "valid": 1, "test": 1}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.jpg"))}


def test_layout_and_names(tmp_path):
    sample.generate(tmp_path, classes=3, counts=COUNTS)
    for split, count in COUNTS.items():
        folders = sorted(p.name for p in (tmp_path / split).iterdir())
        assert folders == ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
        assert all(len(list((tmp_path / split / f).glob("*.jpg"))) == count for f in folders)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first, second, other = (sample.generate(tmp_path / name, classes=2, counts=COUNTS, seed=seed)
                            for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _files(first) == _files(second)
    assert _files(first).keys() == _files(other).keys() and _files(first) != _files(other)
