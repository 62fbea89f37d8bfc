"""Generate the bundled sample dataset: a small dogImages look-alike, no download.

    python -m kennel_train.sample DIR [--classes 5] [--train 16] [--valid 4] [--test 4]

DIR gets the original layout, train/ valid/ test/ with one folder per class
named like dogImages' (``001.Affenpinscher``), holding 500x375 JPEGs (the size
of a typical dog photo). Each class draws its own shape and colours over a
noisy background, so a model can learn it even from a frozen random backbone.
The same seed gives the same bytes.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# The first classes of dogImages, in its own naming, so sample runs look like real ones.
BREEDS = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier", "004.Akita",
          "005.Alaskan_malamute", "006.American_eskimo_dog", "007.American_foxhound",
          "008.American_staffordshire_terrier", "009.American_water_spaniel",
          "010.Anatolian_shepherd_dog"]
SPLITS = ("train", "valid", "test")
SIZE = (500, 375)
_PALETTE = [(200, 60, 40), (40, 160, 70), (50, 80, 200), (220, 190, 40), (150, 60, 170),
            (30, 170, 180), (240, 130, 30), (120, 120, 120), (250, 250, 250), (20, 20, 20)]


def draw_image(class_index: int, rng: random.Random, size: tuple[int, int] = SIZE) -> Image.Image:
    width, height = size
    background = tuple(rng.randint(60, 200) for _ in range(3))
    # Noise from the seeded rng (Pillow's effect_noise has its own unseeded generator).
    noise = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.uniform(20, 60), (height, width, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8), "RGB")
    image = Image.blend(image, Image.new("RGB", size, background), 0.6)
    draw = ImageDraw.Draw(image)
    colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in _PALETTE[class_index % len(_PALETTE)])
    for _ in range(rng.randint(2, 4)):
        r = rng.randint(height // 8, height // 3)
        cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        shape = class_index % 3
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def generate(root: str | Path, classes: int = 5, counts: dict[str, int] | None = None,
             seed: int = 0, size: tuple[int, int] = SIZE) -> Path:
    """Write the dataset under root and return root. Existing files are overwritten."""
    if not 2 <= classes <= len(BREEDS):
        raise ValueError(f"classes must be between 2 and {len(BREEDS)}")
    counts = counts or {"train": 16, "valid": 4, "test": 4}
    root = Path(root)
    for split in SPLITS:
        for class_index, breed in enumerate(BREEDS[:classes]):
            folder = root / split / breed
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{seed}/{split}/{class_index}")
            for i in range(counts.get(split, 0)):
                name = f"{breed.split('.', 1)[1]}_{i:05d}.jpg"
                draw_image(class_index, rng, size).save(folder / name, "JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kennel_train.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write train/ valid/ test/ into")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--train", type=int, default=16, help="images per class in train/")
    parser.add_argument("--valid", type=int, default=4)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate(args.root, args.classes, {"train": args.train, "valid": args.valid, "test": args.test}, args.seed)
    print(f"sample dataset written to {root}")


if __name__ == "__main__":
    main()
