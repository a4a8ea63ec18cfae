"""Images per batch: the image sources, and the feed that assembles model batches ahead of the training step.

An image source decodes the images of a whole batch: ``load(paths)`` returns the present images as one
(N, S, S, 3) uint8 tensor (resized RGB; on the CPU, or on the GPU for DALI's mixed decoder) and one
:class:`~tpm_fast.data.images.ImageEvent` per path. Sources: :class:`PILImages` (a thread pool over
:class:`~tpm_fast.data.images.ImageLoader`; PIL releases the GIL while decoding), ``CachedImages``
(:mod:`tpm_fast.data.cache`) and ``DaliImages`` (:mod:`tpm_fast.data.dali`). They agree on which images are
present and on every event, so the image counts of a run do not depend on the loader.

:class:`ImageFeed` iterates a DataLoader of :class:`~tpm_fast.data.dataset.PostBatch`, loads each batch's images in
a background thread ``prefetch`` batches ahead of the step, normalizes them on the training device in the compute
dtype (:func:`~tpm_fast.data.images.normalize`) and yields :class:`Batch`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from tpm_fast.data.dataset import PostBatch
from tpm_fast.data.images import MAX_IMAGES, ImageEvent, ImageLoader, ImageSpec, ImageStats, normalize

PRESENT = ("ok", "repaired")
"""Outcomes that deliver an image; the others leave the slot empty."""


class ImageSource(Protocol):
    """Decodes the images of a batch (see the module docstring)."""

    name: str
    spec: ImageSpec

    def load(self, paths: Sequence[Path]) -> tuple[torch.Tensor, list[ImageEvent]]: ...


class PILImages:
    """The PIL loader over a thread pool.

    Args:
        spec: output geometry.
        threads: decoding threads (1: decode in the calling thread).
        draft: reduced-scale JPEG decoding (see :class:`~tpm_fast.data.images.ImageLoader`).
    """

    name = "pil"

    def __init__(self, spec: ImageSpec, threads: int = 1, draft: bool = True) -> None:
        self.spec = spec
        self.loader = ImageLoader(spec, draft=draft)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pil-decode") if threads > 1 else None

    def load(self, paths: Sequence[Path]) -> tuple[torch.Tensor, list[ImageEvent]]:
        """Decode ``paths``.

        Returns:
            (N, S, S, 3) uint8 CPU tensor of the present images in the order of ``paths``, and one event per path.
        """
        results = self.decode(paths)
        return stack_uint8([a for a, _ in results if a is not None], self.spec.size), [e for _, e in results]

    def decode(self, paths: Sequence[Path]) -> list[tuple[np.ndarray | None, ImageEvent]]:
        """:meth:`~tpm_fast.data.images.ImageLoader.load_uint8` of each path, on the pool."""
        return list(self.pool.map(self.loader.load_uint8, paths) if self.pool else map(self.loader.load_uint8, paths))


def stack_uint8(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """(N, S, S, 3) uint8 tensor of N (S, S, 3) arrays; (0, S, S, 3) when there are none."""
    if not arrays:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))  # shape: (N, S, S, 3)


@dataclass
class Batch:
    """A batch ready for the model.

    Attributes:
        tensors: on the training device: the text tensors of :class:`~tpm_fast.data.dataset.PostBatch`, plus
            ``pixel_values`` (N, 3, S, S) in the compute dtype with only the present images (post-major,
            slot-ascending; N may be 0), ``image_post`` (N,) long post index in the batch, ``image_slot`` (N,) long
            slot 0..3 (a failed image k leaves slot k empty, slots are not compacted), ``image_mask`` (B, 4) bool
            presence map (``image_mask[image_post, image_slot]`` is True).
        host: the text tensors, ``image_post`` and ``image_mask`` on the CPU (read them without a device sync).
        events: one event per requested image (the feed has already counted them in its ``stats``).
    """

    tensors: dict[str, torch.Tensor]
    host: dict[str, torch.Tensor]
    events: list[ImageEvent]


def assemble(
    posts: PostBatch, source: ImageSource | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> Batch:
    """Load a :class:`PostBatch`'s images with ``source`` (None: text only) and build the model's :class:`Batch`."""
    size = source.spec.size if source is not None else 224
    if source is not None and posts.image_paths:
        pixels, events = source.load(posts.image_paths)  # shape: (N, S, S, 3) uint8
        present = [e.kind in PRESENT for e in events]
    else:
        pixels, events, present = torch.zeros((0, size, size, 3), dtype=torch.uint8), [], []
    keep = [i for i, p in enumerate(present) if p]
    image_post = torch.tensor([posts.image_post[i] for i in keep], dtype=torch.long)  # shape: (N,)
    image_slot = torch.tensor([posts.image_slot[i] for i in keep], dtype=torch.long)  # shape: (N,)
    image_mask = torch.zeros((posts.tensors["input_ids"].shape[0], MAX_IMAGES), dtype=torch.bool)  # shape: (B, 4)
    image_mask[image_post, image_slot] = True
    host = dict(posts.tensors, image_post=image_post, image_slot=image_slot, image_mask=image_mask)
    tensors = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    tensors["pixel_values"] = normalize(pixels.to(device), source.spec if source else ImageSpec(size), dtype)
    return Batch(tensors, host, events)


class ImageFeed:
    """Model batches from a DataLoader of :class:`PostBatch`, images loaded ``prefetch`` batches ahead.

    A background thread assembles the batches (:func:`assemble`), so image decoding overlaps the training step.
    Image events are counted in ``stats`` (with bounded warnings) as each batch is handed out.

    Args:
        loader: the DataLoader (its ``collate_fn`` is :func:`~tpm_fast.data.dataset.collate`).
        source: the image source; None for text-only models.
        device: the training device.
        dtype: the compute dtype of ``pixel_values``.
        stats: counters for the image events (a new one when None).
        prefetch: batches assembled ahead (0: assemble in the consuming thread).
    """

    def __init__(
        self,
        loader: DataLoader,
        source: ImageSource | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        stats: ImageStats | None = None,
        prefetch: int = 2,
    ) -> None:
        self.loader, self.source, self.device, self.dtype = loader, source, device, dtype
        self.stats = stats if stats is not None else ImageStats()
        self.prefetch = prefetch

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        batches = self._ahead() if self.prefetch > 0 else self._assembled()
        for batch in batches:
            for event in batch.events:
                self.stats.record(event)
            yield batch

    def _assembled(self) -> Iterator[Batch]:
        for posts in self.loader:
            yield assemble(posts, self.source, self.device, self.dtype)

    def _ahead(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: object) -> bool:
            """Queue ``item`` unless the consumer has stopped; False when it has."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._assembled():
                    if not put(batch):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
                put(e)

        worker = threading.Thread(target=produce, name="image-feed", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()
