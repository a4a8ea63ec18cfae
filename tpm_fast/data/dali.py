"""DALI image source: a batch's images decoded and resized by NVIDIA DALI, on the GPU (``device="mixed"``, the
hardware JPEG decoder where the GPU has one) or on the CPU.

A bad file inside DALI fails the whole DALI batch, so nothing unchecked reaches it: Python reads each file and
sends DALI only what it decodes exactly as PIL would: JPEGs that end with the end-of-image marker and PNGs, in RGB
or grayscale, without transparency, within PIL's pixel limit (checked from the header, without decoding). Everything
else (missing, empty, truncated, CMYK, palette, transparent, unreadable files) goes through
:class:`~tpm_fast.data.images.ImageLoader`, so the events and repairs are those of the PIL path. Should DALI fail
anyway, that batch is decoded by PIL and the pipeline is rebuilt.

The bytes go in through ``fn.external_source`` as one flat DALI batch (the 1-4 images of every post); the resized
uint8 images come back in that order and :func:`~tpm_fast.data.feed.assemble` regroups them by post and normalizes
them on the device. One pipeline per process (each ``deepspeed`` rank makes its own, on its own GPU).

The GPU branch (``device="mixed"``, the copy into a CUDA tensor) only runs where CUDA is present: the CPU
pipeline is the one tested on machines without a GPU.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tpm_fast.data.feed import stack_uint8
from tpm_fast.data.images import JPEG_EOI, ImageEvent, ImageLoader, ImageSpec, read_image

logger = logging.getLogger(__name__)

MAX_BATCH = 256  # images per DALI run; larger requests are split


def dali_unavailable() -> str | None:
    """None when ``nvidia.dali`` imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return 'nvidia-dali is not installed (pip install -e ".[dali]")'
    return None


def for_dali(data: bytes) -> str | None:
    """The image mode (RGB or L) when DALI decodes ``data`` as PIL's path would (see the module docstring), else
    None; reads only the header."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, transparent, (w, h) = im.format, im.mode, "transparency" in im.info, im.size
    except Exception:  # noqa: BLE001 - PIL decides what the bad file is
        return None
    limit = Image.MAX_IMAGE_PIXELS or float("inf")
    if mode not in ("RGB", "L") or transparent or w * h > limit:
        return None
    return mode if (fmt == "JPEG" and data.endswith(JPEG_EOI)) or fmt == "PNG" else None


class DaliImages:
    """Image source decoding with DALI.

    Args:
        spec: output geometry (resize to ``spec.size`` square, bilinear with antialiasing, as PIL).
        device: ``cuda:k``: decode with ``device="mixed"`` on GPU k, outputs on that GPU; ``cpu``: a CPU pipeline.
        threads: DALI CPU threads.
    """

    name = "dali"

    def __init__(self, spec: ImageSpec, device: torch.device, threads: int = 1) -> None:
        problem = dali_unavailable()
        if problem:
            raise RuntimeError(problem)
        self.spec, self.device, self.threads = spec, torch.device(device), max(1, threads)
        self.fallback = ImageLoader(spec)
        self.failures = 0
        self._pipe = None

    def _pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=MAX_BATCH, num_threads=self.threads, prefetch_queue_depth=1)
        def resize_pipeline():
            raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1)
            rgb = fn.decoders.image(raw, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)  # fmt: skip
            s = self.spec.size
            return fn.resize(rgb, resize_x=s, resize_y=s, interp_type=types.INTERP_LINEAR, antialias=True)

        device_id = (self.device.index or 0) if gpu else None
        pipe = resize_pipeline(device_id=device_id)
        pipe.build()
        return pipe

    def _run(self, blobs: list[bytes]) -> torch.Tensor:
        """(n, S, S, 3) uint8 on the device: ``blobs`` decoded and resized by the pipeline."""
        if self._pipe is None:
            self._pipe = self._pipeline()
        self._pipe.feed_input("raw", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        (out,) = self._pipe.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            pixels = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)  # shape: (n, S, S, 3)
            feed_ndarray(dense, pixels, cuda_stream=torch.cuda.current_stream(self.device))
            return pixels
        return torch.from_numpy(np.array(out.as_tensor()))  # shape: (n, S, S, 3); a copy (DALI reuses its buffers)

    def load(self, paths: Sequence[Path]) -> tuple[torch.Tensor, list[ImageEvent]]:
        """Decode ``paths``.

        Returns:
            (N, S, S, 3) uint8 tensor of the present images in the order of ``paths``, on the DALI device, and one
            event per path (those of the PIL path for the same files).
        """
        events: list[ImageEvent | None] = [None] * len(paths)
        pil: dict[int, np.ndarray] = {}
        dali_at, blobs = [], []
        for i, path in enumerate(paths):
            data, events[i] = read_image(path)
            if data is None:
                continue
            mode = for_dali(data)
            if mode is not None:
                dali_at.append(i)
                blobs.append(data)
                events[i] = ImageEvent("ok", converted=mode != "RGB")
            else:
                pixels, events[i] = self.fallback.decode_bytes(data, path)
                if pixels is not None:
                    pil[i] = pixels
        decoded = []
        for start in range(0, len(blobs), MAX_BATCH):
            chunk = blobs[start : start + MAX_BATCH]
            try:
                decoded.append(self._run(chunk))
            except RuntimeError as e:  # DALI failed the batch: PIL decodes it; a fresh pipeline for the next one
                self.failures += 1
                self._pipe = None
                logger.warning("DALI failed a batch (%s); decoding its %d images with PIL", str(e)[:200], len(chunk))
                for i, data in zip(dali_at[start : start + MAX_BATCH], chunk, strict=True):
                    pixels, events[i] = self.fallback.decode_bytes(data, paths[i])
                    if pixels is not None:
                        pil[i] = pixels
                decoded.append(None)
        return self._ordered(dali_at, decoded, pil), events

    def _ordered(self, dali_at: list[int], decoded: list[torch.Tensor | None], pil: dict[int, np.ndarray]):
        """(N, S, S, 3): the present images in path order, DALI's outputs and PIL's arrays interleaved."""
        if not pil and all(d is not None for d in decoded):
            return torch.cat(decoded) if decoded else stack_uint8([], self.spec.size).to(self.device)
        rows = {}
        for chunk_no, out in enumerate(decoded):
            if out is not None:
                rows.update(zip(dali_at[chunk_no * MAX_BATCH : (chunk_no + 1) * MAX_BATCH], out, strict=True))
        rows.update((i, torch.from_numpy(a).to(self.device)) for i, a in pil.items())
        return torch.stack([rows[i] for i in sorted(rows)])  # shape: (N, S, S, 3)
