"""The shared artifact definition: manifest round trip, validation, image decoding, preprocessing."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import kennel_artifact as ka


def _manifest(**overrides):
    fields = dict(architecture="resnet18", class_names=["001.Affenpinscher", "002.Afghan_hound"],
                  preprocessing=ka.IMAGENET_EVAL)
    fields.update(overrides)
    return ka.Manifest(**fields)


def _encode(image, fmt="JPEG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_manifest_round_trip_and_checksum(tmp_path):
    (tmp_path / ka.ONNX_FILE).write_bytes(b"onnx bytes")
    ka.write_manifest(tmp_path, _manifest(metrics={"test_accuracy": 0.5}))
    loaded = ka.load(tmp_path)
    assert loaded.class_names == ["001.Affenpinscher", "002.Afghan_hound"]
    assert loaded.preprocessing == ka.IMAGENET_EVAL
    assert loaded.metrics == {"test_accuracy": 0.5}
    assert loaded.onnx_sha256 == ka.sha256_file(tmp_path / ka.ONNX_FILE)

    (tmp_path / ka.ONNX_FILE).write_bytes(b"replaced")
    with pytest.raises(ka.ArtifactError, match="checksum"):
        ka.load(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("class_names"), "lacks the field 'class_names'"),
    (lambda d: d.update(class_names=["b", "a"]), "sorted"),
    (lambda d: d.update(class_names=["a", "a"]), "distinct"),
    (lambda d: d.update(format_version=99), "format 99"),
    (lambda d: d["preprocessing"].update(resize=-1), "resize"),
    (lambda d: d["preprocessing"].update(std=[0, 1, 1]), "std"),
    (lambda d: d["preprocessing"].update(interpolation="lanczos9"), "interpolation"),
    (lambda d: d.update(surprise=1), "invalid"),
])
def test_invalid_manifests_are_refused_with_a_reason(tmp_path, mutate, message):
    data = _manifest().to_json()
    mutate(data)
    (tmp_path / ka.MANIFEST_FILE).write_text(json.dumps(data))
    (tmp_path / ka.ONNX_FILE).write_bytes(b"x")
    with pytest.raises(ka.ArtifactError, match=message):
        ka.load(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ka.ArtifactError, match="kennel.json not found"):
        ka.load(tmp_path)
    ka.write_manifest(tmp_path, _manifest())
    with pytest.raises(ka.ArtifactError, match="model.onnx not found"):
        ka.load(tmp_path)
    (tmp_path / ka.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ka.ArtifactError, match="not valid JSON"):
        ka.read_manifest(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"])
def test_decode_converts_every_mode_to_rgb(mode):
    image = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK",) else "PNG"
    decoded = ka.decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


def test_decode_palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    decoded = ka.decode_image(_encode(image, "PNG", transparency=0))
    assert decoded.mode == "RGB"


def test_decode_refuses_bad_bytes():
    with pytest.raises(ka.ImageError, match="empty"):
        ka.decode_image(b"")
    with pytest.raises(ka.ImageError, match="not an image"):
        ka.decode_image(b"hello, this is plain text, not a picture" * 10)
    jpeg = _encode(Image.effect_noise((300, 200), 50).convert("RGB"))
    with pytest.raises(ka.ImageError, match="truncated or corrupt"):
        ka.decode_image(jpeg[: len(jpeg) // 2])


def test_decompression_bomb_is_refused_from_the_header():
    # A 1-bit PNG of 20000x20000 is tiny on the wire and 400 Mpx when decoded.
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ka.ImageError, match="exceeds the limit"):
        ka.decode_image(bomb, max_pixels=10_000_000)


def test_imagenet_preprocessing_matches_torchvision():
    torch = pytest.importorskip("torch")
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for size in [(500, 375), (375, 500), (224, 224), (301, 257)]:
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        expected = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(ka.IMAGENET_MEAN, ka.IMAGENET_STD)])(image)
        ours = ka.IMAGENET_EVAL.apply(image)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def test_original_preprocessing_matches_the_original_transform():
    pytest.importorskip("torch")
    from torchvision import transforms

    image = Image.effect_noise((500, 375), 60).convert("RGB")
    expected = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])(image)
    np.testing.assert_allclose(ka.ORIGINAL_EVAL.apply(image), expected.numpy(), atol=1e-6)


def test_top_k_orders_by_probability_and_names_breeds():
    names = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
    result = ka.top_k([0.1, 3.0, 1.0], names, k=2)
    assert [r["breed"] for r in result] == ["Afghan hound", "Airedale terrier"]
    assert result[0]["probability"] > result[1]["probability"]
    assert sum(r["probability"] for r in ka.top_k([0.1, 3.0, 1.0], names, k=10)) == pytest.approx(1.0)


@pytest.mark.parametrize("mode, side, refused", [
    ("RGB", 6000, False),   # 36 megapixels x 4 bytes: 137 MiB
    ("L", 6000, False),     # 1 + 4 bytes a pixel: 172 MiB
    ("RGBA", 6000, True),   # 4 + 4 bytes a pixel: 275 MiB
    ("CMYK", 6000, True),
    ("RGBA", 4000, False),  # 16 megapixels: 122 MiB
])
def test_what_decoding_needs_is_judged_from_the_header(mode, side, refused):
    needed = ka.decoded_bytes(mode, side, side)
    assert (needed > ka.DEFAULT_MAX_DECODE_BYTES) == refused


def test_a_header_over_the_decode_budget_is_refused_before_decoding():
    from kennel_ops.load.bombs import png
    with pytest.raises(ka.ImageError, match="MiB to decode"):
        ka.decode_image(png(6000, 6000, colour_type=6))


def test_the_size_check_runs_before_any_pixel_is_decoded():
    from kennel_ops.load.bombs import one_bit_bomb
    seen = []

    def refuse(width, height):
        seen.append((width, height))
        raise ka.ImageError("no")

    with pytest.raises(ka.ImageError, match="no"):
        ka.decode_image(one_bit_bomb(), check_size=refuse)
    assert seen == [(6324, 6324)]
