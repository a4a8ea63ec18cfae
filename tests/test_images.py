"""The PIL image loader: every kind of bad file, pixel values, HF ViTImageProcessor parity, warnings, the spec read
from a ViT folder's image processor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.image_corpus import CASES, build, encode, huge_jpeg, random_rgb
from tpm_fast.data.images import (
    DataWarning,
    ImageEvent,
    ImageLoader,
    ImageSpec,
    ImageStats,
    normalize,
    repair_truncated_jpeg,
)


@pytest.mark.parametrize("case", list(CASES))
def test_load_cases(tmp_path, case):
    rng = np.random.default_rng(list(CASES).index(case))
    data = build(case, rng)
    path = tmp_path / f"{case}.jpg"
    if data is not None:
        path.write_bytes(data)
    loader = ImageLoader(ImageSpec(size=32))
    counter, present, converted = CASES[case]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, event = loader.load(path)
        stats = ImageStats()
        stats.record(event)
    expected = {k: 0 for k in ImageStats.COUNTERS}
    expected[counter] = 1
    expected["converted"] = int(converted)
    assert stats.as_dict() == expected
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
    (tmp_path / "huge.jpg").write_bytes(huge_jpeg())
    (tmp_path / "one.png").write_bytes(encode(Image.new("RGB", (1, 1), (255, 0, 128)), "PNG"))
    (tmp_path / "p.png").write_bytes(encode(Image.new("RGB", (7, 5), (0, 9, 3)), "PNG"))
    cases = {"one.png": (255, 0, 128), "huge.jpg": (200, 30, 40), "p.png": (0, 9, 3)}
    loader = ImageLoader(ImageSpec(size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.5)))
    for name, color in cases.items():
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        out, _ = loader.load(tmp_path / name)
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
    im = random_rgb(rng, w, h)
    if seed == 3:
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encode(im, fmt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = ViTImageProcessor(
            do_resize=True, size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    with Image.open(path) as ref_im:
        pixels = proc(images=ref_im, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    ref = torch.as_tensor(np.asarray(pixels))
    out, _ = ImageLoader(ImageSpec()).load(path)
    assert out.shape == ref.shape == (3, 224, 224)
    assert (out - ref).abs().mean() <= 0.02


def test_draft_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(random_rgb(rng, 1800, 1200, smooth=True), "JPEG", quality=90))
    (fast, _), (full, _) = ImageLoader(draft=True).load(path), ImageLoader(draft=False).load(path)
    assert (fast - full).abs().mean() <= 0.02


def test_repair_truncated_jpeg():
    assert repair_truncated_jpeg(b"\xff\xd8abc") == b"\xff\xd8abc\xff\xd9"
    assert repair_truncated_jpeg(b"\xff\xd8abc\xff\xd9") == b"\xff\xd8abc\xff\xd9"
    assert repair_truncated_jpeg(b"\x89PNGabc") == b"\x89PNGabc"
    assert repair_truncated_jpeg(b"") == b""


def test_warnings_are_bounded_and_counted(tmp_path):
    loader, stats = ImageLoader(), ImageStats()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i in range(9):
            out, event = loader.load(tmp_path / f"missing_{i}.jpg")
            assert out is None
            stats.record(event)
        (tmp_path / "e.jpg").write_bytes(b"")
        out, event = loader.load(tmp_path / "e.jpg")
        assert out is None
        stats.record(event)
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 5 + 1 + 1  # 5 "missing", one suppression notice, 1 "empty_file"
    assert "suppressed" in msgs[5] and msgs[6].startswith(str(tmp_path / "e.jpg"))
    assert stats.missing == 9 and stats.empty_file == 1


def test_stats_summary_and_merge():
    a, b = ImageStats(ok=3, missing=1), ImageStats(ok=2, repaired=1, too_many=4, converted=2)
    a.merge(b)
    assert a.as_dict() == {
        "ok": 5, "repaired": 1, "missing": 1, "undecodable": 0, "empty_file": 0, "converted": 2, "too_many": 4
    }  # fmt: skip
    assert a.summary() == "images: ok=5 repaired=1 missing=1 undecodable=0 empty_file=0 converted=2 too_many=4"
    with pytest.raises(KeyError):
        a.count("bogus")
    with pytest.raises(KeyError):
        a.record(ImageEvent("too_many"))  # counted by the readers, not an image outcome


def _save_processor(folder: Path, processor: str = "ViTImageProcessor", **cfg) -> Path:
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": processor, **cfg}))
    return folder


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"size": {"height": 384, "width": 384}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]},
         ImageSpec(384, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))),
        ({"size": {"height": 160, "width": 160}}, ImageSpec(160)),
        ({"do_normalize": False}, ImageSpec(224, (0.0,) * 3, (1.0,) * 3)),
        ({"do_rescale": False, "image_mean": [100, 110, 120], "image_std": 50},
         ImageSpec(224, (100, 110, 120), (50,) * 3, 1.0)),
        ({"rescale_factor": 0.5, "image_mean": 0.25, "image_std": 0.75}, ImageSpec(224, (0.25,) * 3, (0.75,) * 3, 0.5)),
    ],
)  # fmt: skip
def test_image_spec_from_the_image_processor(tmp_path, cfg, expected):
    """The spec is the processor's, and normalize() then equals the processor on the resized pixels."""
    from transformers import AutoImageProcessor

    spec = ImageSpec.from_pretrained(_save_processor(tmp_path, **cfg))
    assert spec == expected
    rng = np.random.default_rng(len(json.dumps(cfg)))
    pixels = rng.integers(0, 256, (spec.size, spec.size, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
        ref = proc(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
    out = normalize(torch.from_numpy(pixels)[None], spec)[0]
    torch.testing.assert_close(out, torch.as_tensor(np.asarray(ref), dtype=torch.float32), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n,height,width", [(0, 8, 8), (1, 7, 5), (5, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_is_the_plain_formula_bit_for_bit(n, height, width, dtype):
    """normalize() (fp32 in place on a contiguous copy) equals ((x * rescale - mean) * (1 / std)) on the permuted
    pixels, then cast, exactly; it returns contiguous (N, 3, H, W)."""
    spec = ImageSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8)
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    expected = ((pixels.permute(0, 3, 1, 2).float() * spec.rescale - mean) * (1 / std)).to(dtype)
    out = normalize(pixels, spec, dtype)
    assert out.shape == (n, 3, height, width) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, expected)


def test_image_spec_without_a_processor_is_the_default(tmp_path):
    assert ImageSpec.from_pretrained(tmp_path) == ImageSpec()


@pytest.mark.parametrize(
    "processor, cfg, match",
    [
        ("ViTImageProcessor", {"size": {"height": 224, "width": 160}}, "only square"),
        ("ViTImageProcessor", {"do_resize": False}, "does not resize"),
        ("ViTImageProcessor", {"resample": 3}, "only bilinear"),
        ("CLIPImageProcessor", {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 224},
         "switches on do_center_crop"),
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}, "only square"),
    ],
)  # fmt: skip
def test_image_spec_refuses_what_the_loaders_cannot_reproduce(tmp_path, processor, cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        ImageSpec.from_pretrained(_save_processor(tmp_path, processor, **cfg))
    assert str(err.value).startswith(f"{tmp_path / 'preprocessor_config.json'}: ")


def test_image_spec_errors():
    with pytest.raises(ValueError):
        ImageSpec(size=0)
    with pytest.raises(ValueError):
        ImageSpec(std=(0.5, 0.0, 0.5))


def test_directory_path_is_missing(tmp_path: Path):
    loader = ImageLoader()
    out, event = loader.load(tmp_path)
    assert out is None and event.kind == "missing" and "not readable" in event.message
