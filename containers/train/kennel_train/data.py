"""Image data: the class list, the file index of each split, transforms and loaders.

Classes are the folder names of the training split in sorted order, exactly as
torchvision's ImageFolder numbers them, so index i means the same breed here,
in the artifact, at the endpoint and in the original system.

Images are decoded by kennel_artifact.decode_image (the serving decoder: RGB,
pixel limit); evaluation uses Preprocessing.apply, the very function serving
runs. A file that cannot be read is skipped and counted, not fatal, until a
split's unreadable fraction passes ``max_unreadable_fraction``. Files whose
header is not an image are found while indexing; a truncated body only when a
worker decodes it, so each batch carries the indices it had to skip.

The loader's sampler is a DistributedSampler with explicit rank and world size
(one process: rank 0 of 1), so data-parallel training only changes those two
numbers, and it can start an epoch part-way through (resume after SIGTERM).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2 as transforms

from kennel_artifact import ImageError, Preprocessing, decode_image

from .failure import TrainingFailure
from .stop import reset_in_worker

# torchvision's IMG_EXTENSIONS (ImageFolder): files with other names are not images to it either.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_CROP = 224


# --------------------------------------------------------------------------- the file index


@dataclass
class SplitIndex:
    """The images of one split: (path, class index) pairs in a stable order, and the unreadable ones."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    unreadable: list[str] = field(default_factory=list)  # relative paths

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.unreadable)

    def counts(self) -> dict[str, int]:
        return {"images": len(self.samples), "unreadable": len(self.unreadable)}


def class_folders(root: Path) -> list[str]:
    """ImageFolder's classes: the sorted names of the sub-folders (hidden ones are not classes)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(directory) / name for name in sorted(names)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return files


def _header_is_image(path: Path) -> bool:
    """Cheap check (reads the header only): is this file an image PIL can open?"""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return width > 0 and height > 0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def index_split(name: str, root: Path, classes: Sequence[str] | None = None) -> SplitIndex:
    """Index ``root``/<class>/** ; ``classes`` fixes the numbering (the training split's)."""
    found = class_folders(root)
    classes = list(found if classes is None else classes)
    samples, unreadable = [], []
    for label, class_name in enumerate(classes):
        if class_name not in found:
            continue  # reported by check_splits
        for path in _image_files(root / class_name):
            if _header_is_image(path):
                samples.append((str(path), label))
            else:
                unreadable.append(str(path.relative_to(root)))
    return SplitIndex(name, root, classes, samples, unreadable)


def check_unreadable(split: SplitIndex, skipped: int, max_fraction: float) -> None:
    """Fail when more than ``max_fraction`` of the split's images could not be read."""
    total = split.total
    if total and skipped / total > max_fraction:
        examples = ", ".join(split.unreadable[:3])
        raise TrainingFailure(
            f"{skipped} of {total} images in {split.name}/ cannot be read ({skipped / total:.1%}, more than "
            f"max_unreadable_fraction={max_fraction:g})" + (f", e.g. {examples}" if examples else "")
            + ": fix or remove them, or raise max_unreadable_fraction")


def check_splits(splits: Sequence[SplitIndex], max_fraction: float) -> None:
    """Same classes in every split, images in every split and in every training class."""
    train = splits[0]
    if not train.classes:
        raise TrainingFailure(f"no class folders in {train.root}: train/ must hold one folder per class "
                              "(e.g. train/001.Affenpinscher/*.jpg)")
    for split in splits[1:]:
        found = class_folders(split.root)
        missing = sorted(set(train.classes) - set(found))
        extra = sorted(set(found) - set(train.classes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{split.name}/ lacks {len(missing)} of train/'s classes ({_some(missing)})")
            if extra:
                parts.append(f"{split.name}/ has {len(extra)} classes train/ does not ({_some(extra)})")
            raise TrainingFailure("the splits' classes differ: " + "; ".join(parts)
                                  + ": every split needs the same class folders")
    for split in splits:
        if not split.samples:
            raise TrainingFailure(f"no images in {split.name}/ ({split.root}): expected files like "
                                  f"{split.name}/<class>/<name>.jpg ({', '.join(IMAGE_EXTENSIONS)})")
        check_unreadable(split, len(split.unreadable), max_fraction)
    empty = sorted(set(range(len(train.classes))) - {label for _, label in train.samples})
    if empty:
        names = _some([train.classes[i] for i in empty])
        raise TrainingFailure(f"{len(empty)} classes have no training images ({names}): every class folder in train/ "
                              "needs images")


def _some(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- transforms


class EvalTransform:
    """The serving preprocessing (kennel_artifact.Preprocessing.apply), as a tensor."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.preprocessing.apply(image))


class TrainTransform:
    """Augmentation (random resized crop, horizontal flip), then the evaluation's scaling and normalisation."""

    def __init__(self, preprocessing: Preprocessing, size: int = TRAIN_CROP):
        self.augment = transforms.Compose([transforms.RandomResizedCrop(size, antialias=True),
                                           transforms.RandomHorizontalFlip()])
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32)
        self.std = np.asarray(preprocessing.std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.augment(image), dtype=np.float32) * np.float32(1.0 / 255.0)
        array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- dataset and loader


class ImageFiles(Dataset):
    """Decodes one file per item; an unreadable file yields None (the batch counts it, training goes on)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        path, label = self.samples[index]
        try:
            with open(path, "rb") as fh:
                image = decode_image(fh.read())
            return self.transform(image), label, index
        except (OSError, ImageError):
            return None, label, index


class Batch(NamedTuple):
    images: torch.Tensor      # [n, 3, H, W] float32
    labels: torch.Tensor      # [n] int64
    indices: torch.Tensor     # [n] dataset indices of the images
    unreadable: list[int]     # dataset indices skipped in this batch

    @property
    def positions(self) -> int:
        """Sampler positions this batch used up (read and skipped)."""
        return len(self.labels) + len(self.unreadable)


def collate(items: Sequence[tuple[torch.Tensor | None, int, int]]) -> Batch:
    good = [item for item in items if item[0] is not None]
    unreadable = [index for image, _, index in items if image is None]
    if not good:
        return Batch(torch.empty(0, 3, TRAIN_CROP, TRAIN_CROP), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), unreadable)
    return Batch(torch.stack([image for image, _, _ in good]),
                 torch.tensor([label for _, label, _ in good], dtype=torch.long),
                 torch.tensor([index for _, _, index in good], dtype=torch.long), unreadable)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded order per epoch, one shard per rank) that can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: positions of this epoch's order already consumed (from a checkpoint)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, workers: int, pin_memory: bool,
                persistent: bool, seed: Sequence[int] | None = None) -> DataLoader:
    """Decoding runs in ``workers`` processes, batches prefetched; pinned memory for fast copies to a GPU.

    ``seed`` (e.g. (seed, rank, epoch)) seeds the workers' random augmentation; without it
    they derive it from torch's global generator, which every rank seeded alike, so the
    k-th image of each rank's shard would get the same crop and flip.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers > 0 else None, drop_last=False, generator=generator,
                      worker_init_fn=reset_in_worker if workers > 0 else None)
