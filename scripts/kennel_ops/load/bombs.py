"""Small requests that ask a serving worker for a lot of memory or time.

Each case is a real request (bytes of a few KB at most, apart from the large
photo) aimed at one bound of the request budget: extreme aspect ratios that a
shorter-side resize would blow up, 1-bit and palette images whose decoded pixels
are thousands of times their bytes, many of them in one request, modes that cost
8 bytes a pixel to decode and convert, containers that carry a large image inside
a small one, formats outside the documented list, compressed PNG text, numbers
json cannot read, custom attributes str.isdigit() accepts and int() refuses.

``expect`` is what the answer must be: 200 for a request the budget admits (the
largest photo it takes), else the 4xx that refuses it. Used by the budget tests
(in process and against the image) and by kennel-bench-budget (kennel_ops.bench.budget).
"""
from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

from PIL import Image

from kennel_ops.load.hostile import _png_chunk, jpeg_declaring


@dataclass(frozen=True)
class BudgetCase:
    name: str
    body: bytes
    content_type: str
    expect: int
    headers: dict[str, str] = field(default_factory=dict)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, palette: bytes = b"",
        extra_chunks: bytes = b"") -> bytes:
    """A valid PNG of zeros (one filter byte a row), streamed through zlib: bytes stay small
    whatever the size it declares."""
    bits_per_pixel = bit_depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + (width * bits_per_pixel + 7) // 8)
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header)
    if palette:
        chunks += _png_chunk(b"PLTE", palette)
    return (b"\x89PNG\r\n\x1a\n" + chunks + extra_chunks + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


# 6324 x 6324 = 39,992,976 pixels: just under the 40-megapixel limit.
BOMB_SIDE = 6324


@functools.lru_cache(maxsize=1)
def one_bit_bomb() -> bytes:
    """40 megapixels of 1-bit zeros in about 5 KB."""
    return png(BOMB_SIDE, BOMB_SIDE, bit_depth=1)


@functools.lru_cache(maxsize=1)
def large_photo() -> bytes:
    """A 40-megapixel RGB JPEG (7744 x 5163, noise on a gradient): the largest photo the budget takes."""
    width, height = 7744, 5163
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste(Image.effect_noise((width // 4, height // 4), 40).convert("RGB"), (width // 3, height // 3))
    return _encode(image, "JPEG", quality=70)


def ico_with_large_png() -> bytes:
    """An ICO whose directory claims 16 x 16 while its entry is a 7000 x 7000 PNG."""
    inner = png(7000, 7000, bit_depth=8, colour_type=2)
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 6 + 16)
    return directory + entry + inner


def ztxt_bomb_png() -> bytes:
    """A small PNG carrying 64 compressed text chunks of 1 MB each."""
    text = zlib.compress(b"a" * (1 << 20), 9)
    chunks = b"".join(_png_chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(64))
    return png(32, 32, extra_chunks=chunks)


def animated_gif(frames: int = 400) -> bytes:
    """Many frames: only the first is decoded."""
    images = [Image.new("P", (120, 90), i % 200) for i in range(frames)]
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:])


def cmyk_claiming(width: int, height: int) -> bytes:
    return jpeg_declaring(_encode(Image.new("CMYK", (64, 48), (10, 20, 30, 40)), "JPEG"), width, height)


def images_json(blobs: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(b).decode("ascii") for b in blobs]}).encode()


def cases() -> list[BudgetCase]:
    """The corpus, cheapest first. Bodies are built on each call (a few seconds: the large photo is cached)."""
    bomb = one_bit_bomb()
    gray = "image/png"
    return [
        BudgetCase("2000 x 1 PNG (shorter-side resize to 512000 x 256)", png(2000, 1), gray, 400),
        BudgetCase("20000 x 1 PNG", png(20000, 1), gray, 400),
        BudgetCase("400000 x 1 PNG", png(400_000, 1), gray, 400),
        BudgetCase("40000000 x 1 1-bit PNG", png(40_000_000, 1, bit_depth=1), gray, 400),
        BudgetCase("1 x 40000 PNG", png(1, 40_000), gray, 400),
        BudgetCase("CMYK JPEG claiming 6000 x 6000 (8 bytes a pixel to decode)", cmyk_claiming(6000, 6000),
                   "image/jpeg", 400),
        BudgetCase("RGBA PNG of 6000 x 6000", png(6000, 6000, colour_type=6), gray, 400),
        BudgetCase("ICO claiming 16 x 16 holding a 7000 x 7000 PNG", ico_with_large_png(), "image/x-icon", 400),
        BudgetCase("BLP", _encode(Image.new("P", (64, 64)), "BLP"), "application/octet-stream", 400),
        BudgetCase("AVIF-like ftyp box with garbage", b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + bytes(64),
                   "image/avif", 400),
        BudgetCase("PSD header", b"8BPS\0\x01" + bytes(6) + struct.pack(">HIIHH", 3, 8000, 8000, 8, 3) + bytes(64),
                   "application/octet-stream", 400),
        BudgetCase("PNG with 64 MB of compressed text", ztxt_bomb_png(), gray, 400),
        BudgetCase("JSON with a 5000-digit number", b'{"image": "x", "n": ' + b"9" * 5000 + b"}",
                   "application/json", 400),
        BudgetCase("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        BudgetCase("top_k=\u00b2 (a digit to str.isdigit, not to int)", png(300, 300), gray, 400,
                   {"X-Amzn-SageMaker-Custom-Attributes": "top_k=\u00b2"}),
        BudgetCase("top_k of 5000 digits", png(300, 300), gray, 400,
                   {"X-Amzn-SageMaker-Custom-Attributes": "top_k=" + "9" * 5000}),
        BudgetCase("GIF of 400 frames (the first is decoded)", animated_gif(), "image/gif", 200),
        BudgetCase("1-bit PNG of 6324 x 6324 (5 KB, 40 megapixels)", bomb, gray, 200),
        BudgetCase("palette PNG of 6324 x 6324", png(BOMB_SIDE, BOMB_SIDE, bit_depth=1, colour_type=3,
                                                     palette=bytes(6)), gray, 200),
        BudgetCase("32 x the 1-bit 40-megapixel PNG in one JSON body (1.28 gigapixels)", images_json([bomb] * 32),
                   "application/json", 413),
        BudgetCase("40-megapixel RGB JPEG", large_photo(), "image/jpeg", 200),
    ]
