"""Request bodies the size of a typical dog photo (500x375 JPEG, the dogImages median).

The pictures come from the sample-dataset generator of the training package, so a
load test sends what the bundled model was trained on, with no download.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from kennel_train.sample import draw_image

PHOTO_SIZE = (500, 375)


def dog_photos(count: int = 8, seed: int = 0, size: tuple[int, int] = PHOTO_SIZE,
               quality: int = 90) -> list[bytes]:
    """count distinct JPEGs, cycling over the sample classes."""
    if count < 1:
        raise ValueError("count must be at least 1")
    rng = random.Random(f"kennel-load/{seed}")
    photos = []
    for i in range(count):
        buffer = io.BytesIO()
        draw_image(i % 5, rng, size).save(buffer, "JPEG", quality=quality)
        photos.append(buffer.getvalue())
    return photos


def load_photos(folder: str | Path, limit: int = 64) -> list[bytes]:
    """JPEGs from a folder (searched recursively, sorted), for a load test on the user's own images."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not paths:
        raise ValueError(f"no .jpg files under {folder}")
    photos = [p.read_bytes() for p in paths]
    for path, data in zip(paths, photos):
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # a broken file would turn the load test into an error-rate test
    return photos
