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


# --------------------------------------------------------------------------- the shared backbone

IDENTITY = "ab" * 32


def _split_model(directory, features=512):
    """A model directory with backbone.onnx and head.onnx (stand-in bytes) and its manifest."""
    for name, content in ((ka.ONNX_FILE, b"whole"), (ka.BACKBONE_FILE, b"backbone"), (ka.HEAD_FILE, b"head")):
        (directory / name).write_bytes(content)
    record = {"sha256": IDENTITY, "features": features, "onnx_sha256": None, "head_onnx_sha256": None}
    ka.write_manifest(directory, _manifest(backbone=record))
    return directory


def test_manifest_round_trip_with_and_without_a_shared_backbone(tmp_path):
    _split_model(tmp_path)
    loaded = ka.load(tmp_path)
    assert loaded.shares_backbone and loaded.backbone == {
        "sha256": IDENTITY, "features": 512, "onnx_sha256": ka.sha256_file(tmp_path / ka.BACKBONE_FILE),
        "head_onnx_sha256": ka.sha256_file(tmp_path / ka.HEAD_FILE)}
    assert ka.load_split(tmp_path) == loaded
    # Without the record (freeze_backbone=false), and a manifest from before the field: no backbone.
    ka.write_manifest(tmp_path, _manifest())
    assert ka.load(tmp_path).backbone is None and not ka.load(tmp_path).shares_backbone
    data = json.loads((tmp_path / ka.MANIFEST_FILE).read_text())
    del data["backbone"]
    (tmp_path / ka.MANIFEST_FILE).write_text(json.dumps(data))
    assert ka.load(tmp_path).backbone is None


def test_load_split_refuses_a_model_without_the_record(tmp_path):
    (tmp_path / ka.ONNX_FILE).write_bytes(b"whole")
    ka.write_manifest(tmp_path, _manifest())
    with pytest.raises(ka.ArtifactError, match=r"kennel.json records no shared backbone: the model was trained with "
                                               r"freeze_backbone=false .* serve it on its own \(model.onnx\)"):
        ka.load_split(tmp_path)


@pytest.mark.parametrize("name", [ka.BACKBONE_FILE, ka.HEAD_FILE])
def test_load_split_names_a_missing_file(tmp_path, name):
    _split_model(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(ka.ArtifactError, match=f"{name} not found, but kennel.json records a shared backbone"):
        ka.load_split(tmp_path, verify_backbone=False)


def test_load_split_always_verifies_the_head_and_the_backbone_when_asked(tmp_path):
    _split_model(tmp_path)
    (tmp_path / ka.BACKBONE_FILE).write_bytes(b"another backbone")
    # An endpoint that already holds this backbone skips hashing it (and does not load it).
    assert ka.load_split(tmp_path, verify_backbone=False).backbone["sha256"] == IDENTITY
    with pytest.raises(ka.ArtifactError, match="backbone.onnx does not match the checksum in kennel.json"):
        ka.load_split(tmp_path)
    _split_model(tmp_path)
    (tmp_path / ka.HEAD_FILE).write_bytes(b"another head")
    for verify in (True, False):
        with pytest.raises(ka.ArtifactError, match="head.onnx does not match the checksum in kennel.json"):
            ka.load_split(tmp_path, verify_backbone=verify)


@pytest.mark.parametrize("record, message", [
    ({"sha256": IDENTITY, "features": 512}, "exactly the keys sha256, features, onnx_sha256, head_onnx_sha256"),
    ({"sha256": IDENTITY, "features": 512, "onnx_sha256": None, "head_onnx_sha256": None, "x": 1}, "exactly the keys"),
    ("ab", "exactly the keys"),
    ({"sha256": "", "features": 512, "onnx_sha256": None, "head_onnx_sha256": None}, "sha256 must be a non-empty"),
    ({"sha256": IDENTITY, "features": 0, "onnx_sha256": None, "head_onnx_sha256": None}, "features must be a posit"),
    ({"sha256": IDENTITY, "features": True, "onnx_sha256": None, "head_onnx_sha256": None}, "features must be a posit"),
    ({"sha256": IDENTITY, "features": 512, "onnx_sha256": 1, "head_onnx_sha256": None}, "must be strings"),
])
def test_an_invalid_backbone_record_is_refused_with_a_reason(tmp_path, record, message):
    data = dict(_manifest().to_json(), backbone=record)
    (tmp_path / ka.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ka.ArtifactError, match=message):
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
