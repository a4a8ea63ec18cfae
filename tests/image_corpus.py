"""The bad-image corpus (one file per way an image can be broken) and real photographs, shared by the image tests
and the image benchmark (imported as tests.image_corpus)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image


def random_rgb(rng: np.random.Generator, w: int, h: int, smooth: bool = False) -> Image.Image:
    if smooth:  # gradients + low noise: reduced-scale decoding must stay close to a full decode
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 3, (h, w, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def huge_jpeg() -> bytes:
    """A 6000 x 4000 solid-color JPEG (encoded once per session)."""
    return encode(Image.new("RGB", (6000, 4000), (200, 30, 40)), "JPEG", quality=90)


def bomb_jpeg() -> bytes:
    """A small JPEG whose header claims 60000 x 60000 pixels (beyond PIL's decompression-bomb limit)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def build(case: str, rng: np.random.Generator) -> bytes | None:
    """Bytes of a test file (None: do not create the file)."""
    rgb = random_rgb(rng, 40, 30)
    if case == "jpeg":
        return encode(rgb, "JPEG")
    if case == "truncated_jpeg":
        return encode(rgb, "JPEG")[:-2]
    if case == "truncated_mid_jpeg":
        data = encode(rgb, "JPEG", quality=95)
        return data[: len(data) * 2 // 3]
    if case == "truncated_header_jpeg":
        return encode(rgb, "JPEG")[:100]
    if case == "png_named_jpg":
        return encode(rgb, "PNG")
    if case == "cmyk_jpeg":
        return encode(rgb.convert("CMYK"), "JPEG")
    if case == "gray_png":
        return encode(rgb.convert("L"), "PNG")
    if case == "palette_gif":
        return encode(rgb.convert("P"), "GIF")
    if case == "rgba_png":
        return encode(rgb.convert("RGBA"), "PNG")
    if case == "one_pixel":
        return encode(Image.new("RGB", (1, 1), (255, 0, 0)), "JPEG")
    if case == "huge_jpeg":
        return huge_jpeg()
    if case == "bomb_jpeg":
        return bomb_jpeg()
    if case == "garbage":
        return rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    if case == "html_named_jpg":
        return b"<html><body>404 Not Found</body></html>"
    if case == "empty":
        return b""
    if case == "missing":
        return None
    raise AssertionError(case)


CASES = {  # case -> (counter incremented, image expected, counted as converted)
    "jpeg": ("ok", True, False),
    "truncated_jpeg": ("repaired", True, False),
    "truncated_mid_jpeg": ("repaired", True, False),
    "truncated_header_jpeg": ("undecodable", False, False),
    "png_named_jpg": ("ok", True, False),
    "cmyk_jpeg": ("ok", True, True),
    "gray_png": ("ok", True, True),
    "palette_gif": ("ok", True, True),
    "rgba_png": ("ok", True, True),
    "one_pixel": ("ok", True, False),
    "huge_jpeg": ("ok", True, False),
    "bomb_jpeg": ("undecodable", False, False),
    "garbage": ("undecodable", False, False),
    "html_named_jpg": ("undecodable", False, False),
    "empty": ("empty_file", False, False),
    "missing": ("missing", False, False),
}


def write_corpus(folder: Path) -> dict[str, Path]:
    """One file per case of ``CASES`` in ``folder`` (the missing one is not created): case -> path."""
    paths = {}
    for case in CASES:
        data = build(case, np.random.default_rng(list(CASES).index(case)))
        paths[case] = folder / f"{case}.jpg"
        if data is not None:
            paths[case].write_bytes(data)
    return paths


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
"""scikit-image sample photographs (RGB, shipped inside its wheel: nothing is downloaded)."""


def write_photos(folder: Path, rng: np.random.Generator, sides: tuple[int, int] = (400, 2048)) -> list[Path]:
    """The sample photographs resized to a random longer side in ``sides`` (aspect kept), every third one as PNG,
    the others as JPEG (quality 75-95), like the images of tweets."""
    from skimage import data

    paths = []
    for k, name in enumerate(PHOTOS):
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = int(rng.integers(sides[0], sides[1] + 1))
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
        if k % 3 == 2:
            path = folder / f"{name}.png"
            im.save(path, "PNG")
        else:
            path = folder / f"{name}.jpg"
            im.save(path, "JPEG", quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths
