"""Request bodies -> images: every content type and every client mistake, as a 4xx with a reason."""
import base64
import io
import json

import pytest
from PIL import Image

from kennel_serve.mms_toolkit.errors import RequestError
from kennel_serve.inputs import decode_request, parse_media_type


def encode(image, fmt="JPEG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


JPEG = encode(Image.new("RGB", (64, 48), (200, 30, 40)))
PHOTO = encode(Image.effect_noise((320, 240), 60).convert("RGB"), quality=90)  # header well before the middle
PNG = encode(Image.new("RGBA", (40, 30), (10, 200, 30, 128)), "PNG")


def no_fetch(url):
    raise AssertionError(f"nothing should be fetched, got {url}")


def decode(body, content_type, fetch=no_fetch, max_images=32, max_pixels=40_000_000, max_request_pixels=200_000_000):
    return decode_request(body, content_type, fetch_url=fetch, max_images=max_images, max_pixels=max_pixels,
                          max_request_pixels=max_request_pixels)


def error_of(*args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as caught:
        decode(*args, **kwargs)
    return caught.value


def test_media_type_parameters_are_parsed():
    assert parse_media_type("Application/JSON; charset=UTF-8") == ("application/json", {"charset": "utf-8"})
    assert parse_media_type('image/jpeg;q="0.5" ') == ("image/jpeg", {"q": "0.5"})
    assert parse_media_type(None) == ("", {})


@pytest.mark.parametrize("content_type, body, size", [
    ("image/jpeg", JPEG, (64, 48)),
    ("image/png", PNG, (40, 30)),
    ("application/x-image", PNG, (40, 30)),
    ("application/octet-stream", JPEG, (64, 48)),  # sniffed
    ("image/png", JPEG, (64, 48)),  # the bytes decide, not the header
    ("image/jpeg; charset=binary", bytearray(JPEG), (64, 48)),
])
def test_raw_image_bodies(content_type, body, size):
    (image,) = decode(body, content_type)
    assert image.mode == "RGB" and image.size == size


def test_json_forms_url_image_images():
    fetched = []

    def fetch(url):
        fetched.append(url)
        return JPEG

    (image,) = decode(json.dumps({"url": "https://example.com/dog.jpg"}), "application/json", fetch)
    assert fetched == ["https://example.com/dog.jpg"] and image.size == (64, 48)
    (image,) = decode(json.dumps({"image": base64.b64encode(PNG).decode()}).encode(), "application/json")
    assert image.size == (40, 30)
    images = decode(json.dumps({"images": [base64.b64encode(JPEG).decode(), base64.urlsafe_b64encode(PNG).decode(),
                                           "data:image/png;base64," + base64.b64encode(PNG).decode().rstrip("=")]}),
                    "application/json; charset=utf-8")
    assert [i.size for i in images] == [(64, 48), (40, 30), (40, 30)]


def test_json_lines_one_record_per_line():
    body = "\n".join([json.dumps({"image": base64.b64encode(JPEG).decode()}), "",
                      json.dumps({"images": [base64.b64encode(PNG).decode()]})]) + "\n"
    assert [i.size for i in decode(body, "application/jsonlines")] == [(64, 48), (40, 30)]


@pytest.mark.parametrize("body, content_type, status, message", [
    (JPEG, None, 415, "no Content-Type"),
    (JPEG, "text/plain", 415, "Content-Type 'text/plain' is not supported"),
    (JPEG, "multipart/form-data; boundary=x", 415, "not supported"),
    (b"", "image/jpeg", 400, "the request body is empty"),
    (b"not an image at all", "image/jpeg", 400, "not an image"),
    (PHOTO[: len(PHOTO) // 2], "image/jpeg", 400, "truncated"),
    (b'{"url": ', "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "must be a JSON object"),
    (b'{"picture": "x"}', "application/json", 400, "needs one of the fields url, image, images; it has picture"),
    (b'{"url": "a", "image": "b"}', "application/json", 400, "only one of the fields"),
    (b'{"url": ""}', "application/json", 400, "'url' must be a non-empty string"),
    (b'{"image": "***"}', "application/json", 400, "'image' is not valid base64"),
    (b'{"image": 5}', "application/json", 400, "must be a non-empty base64 string"),
    (b'{"images": []}', "application/json", 400, "non-empty list"),
    (b'{"image": "data:image/png,abc"}', "application/json", 400, "without base64"),
    (json.dumps({"images": [base64.b64encode(JPEG).decode(), base64.b64encode(b"junk").decode()]}).encode(),
     "application/json", 400, "images[1]: the bytes are not an image"),
    (b'{"image": "eA=="}\n{"url": ', "application/jsonlines", 400, "line 2 is not valid JSON"),
    (b"\n\n", "application/jsonlines", 400, "holds no record"),
    (b"\xff\xfe{}", "application/json", 400, "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deeply"),
])
def test_client_mistakes_are_4xx_with_a_reason(body, content_type, status, message):
    error = error_of(body, content_type)
    assert error.status_code == status
    assert message in error.message


def test_decompression_bomb_is_refused_from_the_header():
    # 8000 x 6000 1-bit pixels: a few kB on the wire, 48 Mpx (144 MB as RGB) decoded.
    bomb = encode(Image.new("1", (8000, 6000)), "PNG")
    assert len(bomb) < 100_000
    error = error_of(bomb, "image/png")
    assert error.status_code == 400 and "8000x6000 pixels exceeds the limit of 40000000" in error.message


def test_too_many_images_is_refused_before_anything_is_fetched():
    body = "\n".join(json.dumps({"url": f"https://example.com/{i}.jpg"}) for i in range(5))
    error = error_of(body, "application/jsonlines", max_images=4)
    assert error.status_code == 400 and "5 images in one request, more than the limit of 4" in error.message


def test_every_url_of_a_request_shares_one_deadline(tmp_path):
    from kennel_serve.request_path import KennelInferenceHandler
    from kennel_serve.settings import ServeSettings

    handler = KennelInferenceHandler(ServeSettings(model_dir=tmp_path))
    deadlines = []

    def fetch(url, deadline=None):
        deadlines.append(deadline)
        return JPEG

    handler.fetcher.fetch = fetch
    body = "\n".join(json.dumps({"url": f"https://example.com/{i}.jpg"}) for i in range(3))
    assert len(handler.default_input_fn(body, "application/jsonlines")) == 3
    first = deadlines[0]
    assert first is not None and deadlines == [first] * 3
    handler.default_input_fn(body, "application/jsonlines")
    assert deadlines[3] > first  # the next request has a deadline of its own


def test_a_request_over_its_pixel_budget_is_413_before_the_rest_is_decoded():
    images = [encode(Image.new("L", (100, 100)), "PNG")] * 5
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in images]})
    error = error_of(body, "application/json", max_request_pixels=25_000)
    assert error.status_code == 413 and "KENNEL_MAX_REQUEST_PIXELS" in error.message


@pytest.mark.parametrize("fmt", ["ICO", "BLP", "PPM", "TGA", "PCX", "SGI", "DDS"])
def test_only_the_documented_formats_are_decoded(fmt):
    data = encode(Image.new("RGB" if fmt not in ("BLP",) else "P", (32, 32)), fmt)
    error = error_of(data, "application/octet-stream")
    assert error.status_code == 400 and "JPEG, PNG, WebP, GIF, BMP or TIFF" in error.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_documented_formats_are_decoded(fmt):
    (image,) = decode(encode(Image.new("RGB", (32, 24), (9, 99, 199)), fmt), "application/octet-stream")
    assert image.size == (32, 24) and image.mode == "RGB"


def test_with_preprocessing_each_image_becomes_model_input():
    import kennel_artifact
    import numpy as np
    body = json.dumps({"images": [base64.b64encode(JPEG).decode(), base64.b64encode(PNG).decode()]})
    inputs = decode_request(body, "application/json", fetch_url=no_fetch, max_images=32, max_pixels=40_000_000,
                            max_request_pixels=200_000_000, preprocessing=kennel_artifact.IMAGENET_EVAL)
    expected = [kennel_artifact.IMAGENET_EVAL.apply(kennel_artifact.decode_image(data)) for data in (JPEG, PNG)]
    assert len(inputs) == 2
    for got, want in zip(inputs, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [(2000, 1), (1, 40_000), (400_000, 1)])
def test_an_aspect_ratio_the_resize_would_blow_up_is_refused_from_the_header(size):
    import kennel_artifact
    from kennel_ops.load.bombs import png
    with pytest.raises(RequestError) as caught:
        decode_request(png(*size), "image/png", fetch_url=no_fetch, max_images=1, max_pixels=40_000_000,
                       max_request_pixels=200_000_000, preprocessing=kennel_artifact.IMAGENET_EVAL)
    assert caught.value.status_code == 400 and "aspect ratio" in caught.value.message


def test_a_number_json_cannot_read_is_a_400():
    error = error_of(b'{"image": "x", "n": ' + b"9" * 5000 + b"}", "application/json")
    assert error.status_code == 400 and "number too long" in error.message
