"""What the endpoint computes for an image is what training evaluated.

Serving path: kennel_serve's request decoding -> the artifact's Preprocessing.apply ->
ONNX Runtime. Compared with training's own evaluation dataset (kennel_train.data:
ImageFiles + EvalTransform, reading the image from a file) and, independently, with
the reference it must agree with: ImageFolder's loader (PIL convert("RGB")) ->
torchvision's eval transform -> the PyTorch model with the same weights. Checked on real
encoded images of every mode a client sends (JPEG, PNG, grey, RGBA, palette with and
without transparency, 16-bit, CMYK) for both preprocessings: the ImageNet one new
models use and the original system's Resize((224, 224)) without normalisation.
"""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import kennel_artifact
from kennel_ops.bench.models import build_network, write_random_model
from kennel_serve.engine import KennelModel
from kennel_serve.inputs import decode_request
from kennel_train.data import EvalTransform, ImageFiles
from kennel_train.sample import draw_image


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def sample_photo(index: int, size=(500, 375)) -> Image.Image:
    return draw_image(index, random.Random(f"parity/{index}"), size)


def palette_with_transparency() -> bytes:
    image = sample_photo(3).quantize(64)
    return encoded(image, "PNG", transparency=0)


IMAGES = {
    "jpeg": lambda: encoded(sample_photo(0), "JPEG", quality=90),
    "jpeg-portrait": lambda: encoded(sample_photo(1, (375, 500)), "JPEG", quality=85),
    "png-rgb": lambda: encoded(sample_photo(2, (301, 257)), "PNG"),
    "grey-jpeg": lambda: encoded(sample_photo(4).convert("L"), "JPEG"),
    "rgba-png": lambda: encoded(sample_photo(5).convert("RGBA"), "PNG"),
    "palette-png": lambda: encoded(sample_photo(6).quantize(128), "PNG"),
    "palette-transparent-png": palette_with_transparency,
    "grey16-png": lambda: encoded(sample_photo(7).convert("L").convert("I;16"), "PNG"),
    "cmyk-jpeg": lambda: encoded(sample_photo(8).convert("CMYK"), "JPEG"),
}


def training_eval_transform(preprocessing: kennel_artifact.Preprocessing):
    """The transform training evaluates with, written with torchvision's own classes."""
    if preprocessing == kennel_artifact.ORIGINAL_EVAL:
        return transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize(kennel_artifact.IMAGENET_MEAN, kennel_artifact.IMAGENET_STD)])


def imagefolder_loader(data: bytes) -> Image.Image:
    """torchvision.datasets.folder.pil_loader, from bytes."""
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module", params=["imagenet", "original"])
def models(request, tmp_path_factory):
    preprocessing = kennel_artifact.IMAGENET_EVAL if request.param == "imagenet" else kennel_artifact.ORIGINAL_EVAL
    model_dir = write_random_model(tmp_path_factory.mktemp(request.param) / "model", "resnet18", num_classes=7,
                                   preprocessing=preprocessing, weights=True)
    eager = build_network("resnet18", 7)
    eager.load_state_dict(torch.load(model_dir / kennel_artifact.WEIGHTS_FILE, weights_only=True))
    return KennelModel.load(model_dir), eager, preprocessing


@pytest.mark.parametrize("name", IMAGES)
def test_serving_equals_training_evaluation(models, name, tmp_path):
    served, eager, preprocessing = models
    data = IMAGES[name]()
    (image,) = decode_request(data, "application/octet-stream", fetch_url=None, max_images=1, max_pixels=10**8,
                                max_request_pixels=10**8)
    serving_input = served.preprocess([image])

    (tmp_path / "image").write_bytes(data)
    evaluated, _, _ = ImageFiles([(str(tmp_path / "image"), 0)], EvalTransform(preprocessing))[0]
    np.testing.assert_array_equal(serving_input[0], evaluated.numpy())  # the very same function, bit for bit

    training_input = training_eval_transform(preprocessing)(imagefolder_loader(data)).unsqueeze(0)
    np.testing.assert_allclose(serving_input, training_input.numpy(), atol=1e-6, rtol=0)

    serving_logits = served.forward(serving_input)
    with torch.no_grad():
        training_logits = eager(training_input).numpy()
    np.testing.assert_allclose(serving_logits, training_logits, atol=2e-4, rtol=1e-4)
    assert serving_logits.argmax() == training_logits.argmax()
