"""Robust image loading and ViT normalization.

Images in the wild are broken (truncated JPEGs, missing or empty files, PNGs named .jpg, CMYK, palette, 1-pixel and
huge images, garbage bytes). :meth:`ImageLoader.load` never raises for a bad image: it returns a normalized tensor
(possibly after repairing a truncated JPEG) or None, which leaves that image slot empty. Every event is counted in
:class:`ImageStats`.

Warnings are bounded: for each kind, the first ``ImageStats.warn_limit`` events are reported with
``warnings.warn(..., DataWarning)``, then one suppression notice; every event is also logged at DEBUG level on
``logging.getLogger(__name__)``. Counts are per process (a DataLoader worker counts in its own copy).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

MAX_IMAGES = 4
"""Image slots per post (m in the paper)."""

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"


class DataWarning(UserWarning):
    """A recoverable problem in the input data (bad image, dropped extra images)."""


@dataclass
class ImageSpec:
    """Geometry and normalization of the ViT input.

    Attributes:
        size: output height and width in pixels.
        mean, std: per-channel normalization applied after rescaling to [0, 1]: ``(x / 255 - mean) / std``.
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"ImageSpec.size must be a positive integer, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImageSpec needs 3 means and 3 positive stds, got mean={self.mean} std={self.std}")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageSpec:
        """Read ``image_mean``, ``image_std`` and ``size`` from a ViT folder's ``preprocessor_config.json``.

        Args:
            path: a model folder, or the JSON file itself.

        Returns:
            The spec; defaults for whatever the file (or a missing file) does not give.

        Raises:
            ValueError: a non-square ``size``.
        """
        path = Path(path)
        cfg_path = path / "preprocessor_config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            logger.info("%s not found; using the default ImageSpec", cfg_path)
            return cls()
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        kwargs: dict = {}
        size = cfg.get("size")
        if isinstance(size, int):
            kwargs["size"] = size
        elif isinstance(size, dict):
            if "height" in size or "width" in size:
                h, w = size.get("height"), size.get("width")
                if h != w:
                    raise ValueError(f"{cfg_path}: only square sizes are supported, got {size}")
                kwargs["size"] = h
            elif "shortest_edge" in size:
                kwargs["size"] = size["shortest_edge"]
        for key, name in (("image_mean", "mean"), ("image_std", "std")):
            if key in cfg:
                value = cfg[key]
                kwargs[name] = tuple(value) if isinstance(value, list) else (value,) * 3
        return cls(**kwargs)


@dataclass
class ImageStats:
    """Counters of image events.

    Each :meth:`ImageLoader.load` call adds 1 to exactly one of ok, repaired, missing, undecodable, empty_file;
    ``converted`` additionally counts decoded images that were not RGB (CMYK, L, P, RGBA, ...); ``too_many`` counts
    posts whose extra images (beyond 4) the readers dropped.
    """

    ok: int = 0
    repaired: int = 0
    missing: int = 0
    undecodable: int = 0
    empty_file: int = 0
    converted: int = 0
    too_many: int = 0
    warn_limit: int = field(default=5, repr=False, compare=False)
    _warned: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    COUNTERS = ("ok", "repaired", "missing", "undecodable", "empty_file", "converted", "too_many")

    def count(self, kind: str, message: str | None = None, n: int = 1) -> None:
        """Add ``n`` to counter ``kind``; warn with ``message`` (bounded per kind) when given."""
        if kind not in self.COUNTERS:
            raise KeyError(f"unknown ImageStats counter {kind!r}; expected one of {self.COUNTERS}")
        setattr(self, kind, getattr(self, kind) + n)
        if message is None:
            return
        logger.debug("%s", message)
        seen = self._warned.get(kind, 0)
        self._warned[kind] = seen + 1
        if seen < self.warn_limit:
            warnings.warn(message, DataWarning, stacklevel=3)
        elif seen == self.warn_limit:
            warnings.warn(
                f"further {kind!r} image warnings suppressed; see ImageStats.summary() for counts",
                DataWarning,
                stacklevel=3,
            )

    def summary(self) -> str:
        """One line with all counters, e.g. ``"images: ok=10 repaired=1 missing=2 ..."``."""
        return "images: " + " ".join(f"{k}={getattr(self, k)}" for k in self.COUNTERS)

    def merge(self, other: ImageStats) -> None:
        """Add the counters of ``other`` to this one (e.g. stats collected in another process)."""
        for k in self.COUNTERS:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in self.COUNTERS}


def repair_truncated_jpeg(data: bytes) -> bytes:
    """Append the JPEG end-of-image marker ``FF D9`` to a JPEG that lacks it (as the authors do).

    Args:
        data: the file bytes.

    Returns:
        ``data + b"\\xff\\xd9"`` when ``data`` starts with the JPEG start marker and does not end with ``FF D9``;
        ``data`` unchanged otherwise.
    """
    if data.startswith(JPEG_SOI) and not data.endswith(JPEG_EOI):
        return data + JPEG_EOI
    return data


class ImageLoader:
    """Load one image file into a normalized ``(3, size, size)`` float32 tensor, or None for an empty slot.

    Follows HF ``ViTImageProcessor`` (RGB conversion compositing transparency onto white, BILINEAR resize to
    size x size, rescale by 1/255, ``(x - mean) / std``); equal up to float rounding, except that JPEGs at least 4x
    the output size in both sides are decoded at a reduced DCT scale (``Image.draft``, keeping at least 2x the output
    size) before the resize, which is fast and bounds memory for huge photos (mean difference under 0.02; turn it off
    with ``draft=False``). Images beyond PIL's decompression-bomb limit count as undecodable.

    Args:
        spec: output geometry and normalization.
        stats: counters to update (a new one when None; available as ``self.stats``).
        draft: allow reduced-scale JPEG decoding.
    """

    def __init__(self, spec: ImageSpec | None = None, stats: ImageStats | None = None, draft: bool = True) -> None:
        self.spec = spec if spec is not None else ImageSpec()
        self.stats = stats if stats is not None else ImageStats()
        self.draft = draft
        self._mean = np.asarray(self.spec.mean, dtype=np.float32)
        self._std = np.asarray(self.spec.std, dtype=np.float32)

    def load(self, path: str | Path) -> torch.Tensor | None:
        """Load and normalize one image.

        Args:
            path: the image file.

        Returns:
            ``(3, size, size)`` float32 tensor, or None (missing, empty or undecodable file; counted and warned).
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            self.stats.count("missing", f"{path}: image not readable ({type(e).__name__}); slot left empty")
            return None
        if not data:
            self.stats.count("empty_file", f"{path}: image file is empty (0 bytes); slot left empty")
            return None
        try:
            out, converted = self._decode(data)
            kind = "ok"
        except Exception as first_error:  # noqa: BLE001 - any decoder failure means "bad image"
            repaired = repair_truncated_jpeg(data)
            if len(repaired) == len(data):
                self.stats.count("undecodable", f"{path}: cannot decode image ({first_error}); slot left empty")
                return None
            try:
                out, converted = self._decode(repaired)
                kind = "repaired"
            except Exception as e:  # noqa: BLE001
                self.stats.count("undecodable", f"{path}: cannot decode image, even repaired ({e}); slot left empty")
                return None
        if converted:
            self.stats.count("converted")
        if kind == "repaired":
            self.stats.count("repaired", f"{path}: truncated JPEG repaired by appending FF D9")
        else:
            self.stats.count("ok")
        return out

    def _decode(self, data: bytes) -> tuple[torch.Tensor, bool]:
        """Decode, convert to RGB, resize and normalize; raises on any decoding problem."""
        s = self.spec.size
        with Image.open(io.BytesIO(data)) as im:
            if self.draft and im.format == "JPEG":
                im.draft(None, (2 * s, 2 * s))
            im.load()
            converted = im.mode != "RGB"
            rgb = _to_rgb(im)
        rgb = rgb.resize((s, s), Image.Resampling.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255)  # shape: (S, S, 3)
        arr = (arr - self._mean) / self._std
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), converted  # shape: (3, S, S)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of ``im``; transparency is composited onto white (as HF ``convert_to_rgb``)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
