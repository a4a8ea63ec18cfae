from __future__ import annotations

import functools
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tpm_fast.data.images import DataWarning, ImageLoader, ImageSpec, ImageStats, repair_truncated_jpeg


def _random_rgb(rng: np.random.Generator, w: int, h: int, smooth: bool = False) -> Image.Image:
    if smooth:  # gradients + low noise: reduced-scale decoding must stay close to a full decode
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 3, (h, w, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def _huge_jpeg() -> bytes:
    """A 6000 x 4000 solid-color JPEG (encoded once per session)."""
    return _encode(Image.new("RGB", (6000, 4000), (200, 30, 40)), "JPEG", quality=90)


def _bomb_jpeg() -> bytes:
    """A small JPEG whose header claims 60000 x 60000 pixels (beyond PIL's decompression-bomb limit)."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def _build(case: str, rng: np.random.Generator) -> bytes | None:
    """Bytes of a test file (None: do not create the file)."""
    rgb = _random_rgb(rng, 40, 30)
    if case == "jpeg":
        return _encode(rgb, "JPEG")
    if case == "truncated_jpeg":
        return _encode(rgb, "JPEG")[:-2]
    if case == "truncated_mid_jpeg":
        data = _encode(rgb, "JPEG", quality=95)
        return data[: len(data) * 2 // 3]
    if case == "truncated_header_jpeg":
        return _encode(rgb, "JPEG")[:100]
    if case == "png_named_jpg":
        return _encode(rgb, "PNG")
    if case == "cmyk_jpeg":
        return _encode(rgb.convert("CMYK"), "JPEG")
    if case == "gray_png":
        return _encode(rgb.convert("L"), "PNG")
    if case == "palette_gif":
        return _encode(rgb.convert("P"), "GIF")
    if case == "rgba_png":
        return _encode(rgb.convert("RGBA"), "PNG")
    if case == "one_pixel":
        return _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "JPEG")
    if case == "huge_jpeg":
        return _huge_jpeg()
    if case == "bomb_jpeg":
        return _bomb_jpeg()
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


@pytest.mark.parametrize("case", list(CASES))
def test_load_cases(tmp_path, case):
    rng = np.random.default_rng(list(CASES).index(case))
    data = _build(case, rng)
    path = tmp_path / f"{case}.jpg"
    if data is not None:
        path.write_bytes(data)
    loader = ImageLoader(ImageSpec(size=32))
    counter, present, converted = CASES[case]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = loader.load(path)
    expected = {k: 0 for k in ImageStats.COUNTERS}
    expected[counter] = 1
    expected["converted"] = int(converted)
    assert loader.stats.as_dict() == expected
    data_warnings = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    if counter == "ok":
        assert out is not None and data_warnings == []
    else:
        assert len(data_warnings) == 1 and data_warnings[0].startswith(f"{path}: ")
    if present:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= -1.0 and out.max() <= 1.0
    else:
        assert out is None


def test_pixel_values(tmp_path):
    """Solid colors give exact normalized values; the 1-pixel and the huge image included."""
    (tmp_path / "huge.jpg").write_bytes(_huge_jpeg())
    (tmp_path / "one.png").write_bytes(_encode(Image.new("RGB", (1, 1), (255, 0, 128)), "PNG"))
    (tmp_path / "p.png").write_bytes(_encode(Image.new("RGB", (7, 5), (0, 9, 3)), "PNG"))
    cases = {"one.png": (255, 0, 128), "huge.jpg": (200, 30, 40), "p.png": (0, 9, 3)}
    loader = ImageLoader(ImageSpec(size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.5)))
    for name, color in cases.items():
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        out = loader.load(tmp_path / name)
        expected = (torch.tensor(color, dtype=torch.float32) / 255 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor(
            [0.2, 0.25, 0.5]
        )
        tol = 0.1 if fmt == "JPEG" else 1e-5  # JPEG chroma subsampling shifts solid colors slightly
        torch.testing.assert_close(out, expected[:, None, None].expand(3, 16, 16), atol=tol, rtol=0)


@pytest.mark.parametrize(
    "seed, w, h, fmt", [(0, 37, 53, "PNG"), (1, 300, 200, "JPEG"), (2, 224, 224, "PNG"), (3, 15, 400, "PNG")]
)
def test_matches_hf_vit_image_processor(tmp_path, seed, w, h, fmt):
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(seed)
    im = _random_rgb(rng, w, h)
    if seed == 3:
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(im, fmt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = ViTImageProcessor(
            do_resize=True, size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    with Image.open(path) as ref_im:
        pixels = proc(images=ref_im, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    ref = torch.as_tensor(np.asarray(pixels))
    out = ImageLoader(ImageSpec()).load(path)
    assert out.shape == ref.shape == (3, 224, 224)
    assert (out - ref).abs().mean() <= 0.02


def test_draft_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "big.jpg"
    path.write_bytes(_encode(_random_rgb(rng, 1800, 1200, smooth=True), "JPEG", quality=90))
    fast, full = ImageLoader(draft=True).load(path), ImageLoader(draft=False).load(path)
    assert (fast - full).abs().mean() <= 0.02


def test_repair_truncated_jpeg():
    assert repair_truncated_jpeg(b"\xff\xd8abc") == b"\xff\xd8abc\xff\xd9"
    assert repair_truncated_jpeg(b"\xff\xd8abc\xff\xd9") == b"\xff\xd8abc\xff\xd9"
    assert repair_truncated_jpeg(b"\x89PNGabc") == b"\x89PNGabc"
    assert repair_truncated_jpeg(b"") == b""


def test_warnings_are_bounded_and_counted(tmp_path):
    loader = ImageLoader()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i in range(9):
            assert loader.load(tmp_path / f"missing_{i}.jpg") is None
        (tmp_path / "e.jpg").write_bytes(b"")
        assert loader.load(tmp_path / "e.jpg") is None
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 5 + 1 + 1  # 5 "missing", one suppression notice, 1 "empty_file"
    assert "suppressed" in msgs[5] and msgs[6].startswith(str(tmp_path / "e.jpg"))
    assert loader.stats.missing == 9 and loader.stats.empty_file == 1


def test_stats_summary_and_merge():
    a, b = ImageStats(ok=3, missing=1), ImageStats(ok=2, repaired=1, too_many=4, converted=2)
    a.merge(b)
    assert a.as_dict() == {
        "ok": 5, "repaired": 1, "missing": 1, "undecodable": 0, "empty_file": 0, "converted": 2, "too_many": 4
    }  # fmt: skip
    assert a.summary() == "images: ok=5 repaired=1 missing=1 undecodable=0 empty_file=0 converted=2 too_many=4"
    with pytest.raises(KeyError):
        a.count("bogus")


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"size": {"height": 384, "width": 384}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]},
         ImageSpec(384, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))),
        ({"size": 160}, ImageSpec(160)),
        ({"size": {"shortest_edge": 256}, "image_mean": 0.5, "image_std": 0.25}, ImageSpec(256, std=(0.25,) * 3)),
        (None, ImageSpec()),
    ],
)  # fmt: skip
def test_image_spec_from_pretrained(tmp_path, cfg, expected):
    if cfg is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert ImageSpec.from_pretrained(tmp_path) == expected


def test_image_spec_errors(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 160}}))
    with pytest.raises(ValueError, match="square"):
        ImageSpec.from_pretrained(tmp_path)
    with pytest.raises(ValueError):
        ImageSpec(size=0)
    with pytest.raises(ValueError):
        ImageSpec(std=(0.5, 0.0, 0.5))


def test_directory_path_is_missing(tmp_path: Path):
    loader = ImageLoader()
    with pytest.warns(DataWarning, match="not readable"):
        assert loader.load(tmp_path) is None
    assert loader.stats.missing == 1
