"""Download the dogImages dataset, unpack it and check that it is complete.

    kennel-download-data [--dest data] [--url URL]   (make data)
    kennel-download-data --check-only data/dogImages

The archive (about 1.1 GB) is downloaded to DEST/dogImages.zip.part and renamed
when complete, so an interrupted download never passes for a finished one; a
finished archive is not downloaded again. It unpacks to DEST/dogImages with
train/ valid/ test/ at its root: the one `training` channel of the original
system (KENNEL_DATA_DIR=DEST/dogImages docker compose up train).

The check: the same 133 breed folders in every split (named like
001.Affenpinscher) and 6680 / 835 / 836 images. Exit 0 when it passes, 1 with
one line per problem when it does not.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

DATA_URL = "https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip"
EXPECTED_CLASSES = 133
EXPECTED_IMAGES = {"train": 6680, "valid": 835, "test": 836}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CLASS_FOLDER = re.compile(r"^\d{3}\.\S+$")  # 001.Affenpinscher


def check_dataset(root: Path, expected_classes: int = EXPECTED_CLASSES,
                  expected_images: dict[str, int] | None = None) -> list[str]:
    """Every way root differs from a complete dogImages, one sentence each ([] = complete)."""
    expected_images = EXPECTED_IMAGES if expected_images is None else expected_images
    problems: list[str] = []
    classes_by_split: dict[str, list[str]] = {}
    for split, expected in expected_images.items():
        folder = root / split
        if not folder.is_dir():
            problems.append(f"{folder}: missing")
            continue
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        classes_by_split[split] = classes
        misnamed = [name for name in classes if not CLASS_FOLDER.match(name)]
        if misnamed:
            problems.append(f"{folder}: class folders not named like 001.Affenpinscher: {', '.join(misnamed[:3])}")
        if len(classes) != expected_classes:
            problems.append(f"{folder}: {len(classes)} class folders, expected {expected_classes}")
        images = sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images != expected:
            problems.append(f"{folder}: {images} images, expected {expected}")
    splits = list(classes_by_split)
    for split in splits[1:]:
        if classes_by_split[split] != classes_by_split[splits[0]]:
            differing = sorted(set(classes_by_split[split]) ^ set(classes_by_split[splits[0]]))
            problems.append(f"{root / split}: classes differ from {splits[0]}/: {', '.join(differing[:3])}")
    return problems


def download(url: str, target: Path) -> None:
    """Download url to target via target.part; a complete target is kept as it is."""
    if target.is_file():
        print(f"{target}: already downloaded")
        return
    partial = target.with_name(target.name + ".part")
    print(f"downloading {url}")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, started, shown = 0, time.monotonic(), 0.0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            now = time.monotonic()
            if now - shown >= 5 or done == total:
                rate = done / max(now - started, 1e-6) / 1e6
                share = f" of {total / 1e6:.0f} MB ({100 * done / total:.0f}%)" if total else ""
                print(f"  {done / 1e6:.0f} MB{share}, {rate:.1f} MB/s", flush=True)
                shown = now
    if total and done != total:
        raise OSError(f"download ended after {done} of {total} bytes; run again")
    partial.rename(target)


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack into dest (the archive's top folder is dogImages/) and return the dataset root."""
    root = dest / "dogImages"
    staging = dest / "dogImages.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"unpacking {archive}")
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():  # refuse entries that would land outside staging
            if member.startswith("/") or ".." in Path(member).parts:
                raise OSError(f"{archive}: unsafe path in the archive: {member}")
        bundle.extractall(staging)
    inner = staging / "dogImages" if (staging / "dogImages").is_dir() else staging
    shutil.rmtree(root, ignore_errors=True)
    inner.rename(root)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(root / "__MACOSX", ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-download-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("data"), help="folder for the archive and dogImages/")
    parser.add_argument("--url", default=DATA_URL)
    parser.add_argument("--check-only", type=Path, metavar="ROOT", help="only check an unpacked dataset")
    args = parser.parse_args(argv)
    try:
        if args.check_only:
            root = args.check_only
        else:
            args.dest.mkdir(parents=True, exist_ok=True)
            archive = args.dest / "dogImages.zip"
            download(args.url, archive)
            root = unpack(archive, args.dest)
    except (OSError, zipfile.BadZipFile) as error:
        print(f"download_data: {error}", file=sys.stderr)
        return 1
    problems = check_dataset(root)
    for problem in problems:
        print(f"download_data: {problem}", file=sys.stderr)
    if problems:
        return 1
    counts = " / ".join(str(n) for n in EXPECTED_IMAGES.values())
    print(f"{root}: complete ({EXPECTED_CLASSES} breeds, {counts} images)")
    print(f"train on it: KENNEL_DATA_DIR={root} make train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
