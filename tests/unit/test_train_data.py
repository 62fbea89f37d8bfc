"""kennel_train.data: ImageFolder's class order, unreadable files, the serving preprocessing, the sampler."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import kennel_artifact
from kennel_artifact import IMAGENET_EVAL, ORIGINAL_EVAL
from kennel_train import data
from kennel_train.failure import TrainingFailure


def jpeg(path: Path, size=(40, 30), colour=(200, 50, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


def test_classes_and_samples_are_in_imagefolder_order(tmp_path):
    # Numbers, case and punctuation where a naive ordering might differ from sorted().
    names = ["133.Yorkshire_terrier", "002.Afghan_hound", "10.b", "9.a", "Zeta", "alpha", "050.Chinese_shar-pei"]
    for name in names:
        for stem in ("b", "a", "C"):
            jpeg(tmp_path / name / f"{stem}.jpg")
    (tmp_path / "002.Afghan_hound" / "notes.txt").write_text("not an image")
    index = data.index_split("train", tmp_path)
    reference = torchvision.datasets.ImageFolder(str(tmp_path))
    assert index.classes == reference.classes
    assert index.samples == [(path, label) for path, label in reference.samples]


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    # ImageFolder would make ".ipynb_checkpoints" class 0 (shifting every index) and choke on macOS "._x.jpg"
    # resource forks; neither is a dog photo.
    jpeg(tmp_path / "001.a" / "x.jpg")
    jpeg(tmp_path / ".ipynb_checkpoints" / "y.jpg")
    (tmp_path / "001.a" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    index = data.index_split("train", tmp_path)
    assert index.classes == ["001.a"]
    assert index.samples == [(str(tmp_path / "001.a" / "x.jpg"), 0)] and index.unreadable == []


def test_eval_splits_use_the_training_numbering(tmp_path):
    for name in ("001.a", "002.b"):
        jpeg(tmp_path / "train" / name / "x.jpg")
    jpeg(tmp_path / "valid" / "002.b" / "y.jpg")
    train = data.index_split("train", tmp_path / "train")
    valid = data.index_split("valid", tmp_path / "valid", train.classes)
    assert valid.samples == [(str(tmp_path / "valid" / "002.b" / "y.jpg"), 1)]


def test_images_in_nested_folders_belong_to_their_class(tmp_path):
    jpeg(tmp_path / "001.a" / "deeper" / "x.jpg")
    assert data.index_split("train", tmp_path).samples == [(str(tmp_path / "001.a" / "deeper" / "x.jpg"), 0)]


def splits_at(root: Path) -> list[data.SplitIndex]:
    train = data.index_split("train", root / "train")
    return [train] + [data.index_split(name, root / name, train.classes) for name in ("valid", "test")]


def test_a_valid_dataset_passes_the_checks(generated_dataset):
    data.check_splits(splits_at(generated_dataset), 0.0)


def test_classes_that_differ_between_splits_are_named(tmp_path, generated_dataset):
    root = shutil.copytree(generated_dataset, tmp_path / "d")
    shutil.rmtree(root / "valid" / "002.Afghan_hound")
    jpeg(root / "test" / "999.Extra" / "x.jpg")
    with pytest.raises(TrainingFailure, match=r"the splits' classes differ: valid/ lacks 1 of train/'s classes "
                                              r"\(002.Afghan_hound\)"):
        data.check_splits(splits_at(root), 0.0)
    shutil.copytree(generated_dataset / "valid" / "002.Afghan_hound", root / "valid" / "002.Afghan_hound")
    with pytest.raises(TrainingFailure, match=r"test/ has 1 classes train/ does not \(999.Extra\)"):
        data.check_splits(splits_at(root), 0.0)


def test_a_split_without_images_fails(tmp_path):
    for split in ("train", "valid", "test"):
        jpeg(tmp_path / split / "001.a" / "x.jpg")
    (tmp_path / "test" / "001.a" / "x.jpg").unlink()
    with pytest.raises(TrainingFailure, match=r"no images in test/"):
        data.check_splits(splits_at(tmp_path), 0.0)


def test_a_training_split_without_class_folders_fails(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / split).mkdir()
    with pytest.raises(TrainingFailure, match="no class folders in .*train: train/ must hold one folder per class"):
        data.check_splits(splits_at(tmp_path), 0.0)


def test_a_training_class_without_images_fails(tmp_path):
    for split in ("train", "valid", "test"):
        jpeg(tmp_path / split / "001.a" / "x.jpg")
        (tmp_path / split / "002.b").mkdir()
    with pytest.raises(TrainingFailure, match=r"1 classes have no training images \(002.b\)"):
        data.check_splits(splits_at(tmp_path), 0.0)


def test_unreadable_files_are_counted_then_fail_past_the_threshold(tmp_path):
    for i in range(9):
        jpeg(tmp_path / "001.a" / f"{i}.jpg")
    (tmp_path / "001.a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "001.a" / "empty.png").write_bytes(b"")
    index = data.index_split("train", tmp_path)
    assert len(index.samples) == 9
    assert index.unreadable == ["001.a/broken.jpg", "001.a/empty.png"]
    data.check_unreadable(index, 2, 0.2)  # 2 of 11 = 18% is within 20%
    with pytest.raises(TrainingFailure) as caught:
        data.check_unreadable(index, 2, 0.1)
    assert str(caught.value) == ("2 of 11 images in train/ cannot be read (18.2%, more than "
                                 "max_unreadable_fraction=0.1), e.g. 001.a/broken.jpg, 001.a/empty.png: fix or "
                                 "remove them, or raise max_unreadable_fraction")


def test_a_truncated_image_is_skipped_by_the_loader_and_reported_in_its_batch(tmp_path):
    good = tmp_path / "001.a" / "good.jpg"
    good.parent.mkdir(parents=True)
    Image.effect_noise((200, 150), 50).convert("RGB").save(good, "JPEG")
    truncated = tmp_path / "001.a" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the header is intact: decoding fails
    index = data.index_split("train", tmp_path)
    assert len(index.samples) == 2 and index.unreadable == []
    dataset = data.ImageFiles(index.samples, data.EvalTransform(IMAGENET_EVAL))
    sampler = data.ResumableSampler(dataset, shuffle=False, seed=0)
    batch = next(iter(data.make_loader(dataset, sampler, batch_size=2, workers=0, pin_memory=False, persistent=False)))
    assert batch.images.shape == (1, 3, 224, 224)
    assert batch.unreadable == [1]
    assert batch.positions == 2


def test_a_batch_of_only_unreadable_files_is_empty_not_an_error():
    batch = data.collate([(None, 0, 3), (None, 1, 4)])
    assert batch.images.shape[0] == 0 and batch.labels.numel() == 0 and batch.unreadable == [3, 4]


@pytest.mark.parametrize("preprocessing", [IMAGENET_EVAL, ORIGINAL_EVAL], ids=["imagenet", "original"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_evaluation_input_is_exactly_what_serving_computes(tmp_path, generated_dataset, preprocessing, mode):
    source = sorted((generated_dataset / "test").rglob("*.jpg"))[0]
    path = tmp_path / f"image.{'jpg' if mode in ('RGB', 'L') else 'png'}"
    Image.open(source).convert(mode).save(path)
    dataset = data.ImageFiles([(str(path), 0)], data.EvalTransform(preprocessing))
    tensor, label, index = dataset[0]
    served = preprocessing.apply(kennel_artifact.decode_image(path.read_bytes()))
    assert tensor.dtype == torch.float32
    assert np.array_equal(tensor.numpy(), served)


def test_training_augmentation_normalises_like_evaluation(tmp_path):
    image = Image.new("RGB", (300, 200), (124, 116, 104))  # ~ the ImageNet mean colour
    transform = data.TrainTransform(IMAGENET_EVAL)
    torch.manual_seed(0)
    tensor = transform(image)
    assert tensor.shape == (3, 224, 224)
    assert tensor.abs().max() < 0.02  # normalised with the same mean and std as serving
    unnormalised = data.TrainTransform(ORIGINAL_EVAL)(image)
    assert torch.allclose(unnormalised[:, 0, 0], torch.tensor([124, 116, 104]) / 255.0, atol=1e-6)


def test_the_sampler_resumes_part_way_through_the_same_epoch_order():
    dataset = list(range(10))
    sampler = data.ResumableSampler(dataset, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == dataset and len(sampler) == 10
    sampler.set_epoch(2, start=6)
    assert list(sampler) == full[6:] and len(sampler) == 4
    sampler.set_epoch(3)
    assert list(sampler) != full  # a new order every epoch


def test_the_sampler_shards_ranks_without_overlap():
    dataset = list(range(11))
    shards = []
    for rank in range(2):
        sampler = data.ResumableSampler(dataset, shuffle=True, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == 6  # equal steps on every rank (one sample repeated)
    assert set(shards[0]) | set(shards[1]) == set(dataset)


def test_loader_workers_decode_off_the_main_process(generated_dataset):
    index = data.index_split("train", generated_dataset / "train")
    dataset = data.ImageFiles(index.samples, data.TrainTransform(IMAGENET_EVAL))
    sampler = data.ResumableSampler(dataset, shuffle=True, seed=0)
    loader = data.make_loader(dataset, sampler, batch_size=4, workers=2, pin_memory=False, persistent=True)
    assert loader.num_workers == 2 and loader.persistent_workers
    seen = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        seen.append(sorted(int(i) for batch in loader for i in batch.indices))
    assert seen[0] == seen[1] == list(range(len(index.samples)))


def test_each_rank_seed_gives_its_own_augmentation_and_the_same_seed_the_same(generated_dataset):
    index = data.index_split("train", generated_dataset / "train")
    dataset = data.ImageFiles(index.samples, data.TrainTransform(IMAGENET_EVAL))

    def first_batch(seed):
        torch.manual_seed(0)  # every rank seeds the global generator alike
        sampler = data.ResumableSampler(dataset, shuffle=False, seed=0)
        loader = data.make_loader(dataset, sampler, batch_size=4, workers=1, pin_memory=False, persistent=False,
                                  seed=seed)
        return next(iter(loader)).images

    rank0, rank0_again, rank1 = first_batch((0, 0, 1)), first_batch((0, 0, 1)), first_batch((0, 1, 1))
    assert torch.equal(rank0, rank0_again)
    assert not torch.allclose(rank0, rank1)
