"""Decoded-image cache: each image decoded and resized once, then read back from a memory-mapped file.

Layout of a cache folder: ``pixels.u8`` holds rows of S x S x 3 uint8 RGB (the output of
:meth:`~tpm_fast.data.images.ImageLoader.load_uint8`, before normalization, so one cache serves any mean/std);
``index.json`` holds ``{"format", "size", "rows", "entries": {key: [row, kind, converted, message]}}`` where the
key is the file's path, byte size and mtime (a changed file is decoded again) and ``row`` is -1 for an image that
leaves its slot empty (its event is kept, so the cache counts bad images as the decoders do). Missing files are
not cached (there is nothing to key them by).

Building is safe to interrupt and resume: rows are written past the indexed ones, then the index is replaced
atomically (``os.replace``), so an index never names a row that is not on disk. A cache built for another image
size is rebuilt. One process builds (rank 0 in ``train.py``); any number read.

    python -m tpm_fast.data.cache build CACHE_DIR --data-dir DATA --dataset MI --vit-model VIT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tpm_fast.data.feed import PILImages, stack_uint8
from tpm_fast.data.images import ImageEvent, ImageLoader, ImageSpec
from tpm_fast.data.readers import SPLITS, load_split
from tpm_fast.data.synthetic import ensure_synthetic_corpus

FORMAT = 1
CHUNK = 256  # images decoded between two index writes


def file_key(path: Path) -> str | None:
    """``"path|bytes|mtime_ns"`` of an existing file, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


class ImageCache:
    """A cache folder for images of ``size`` x ``size`` pixels (see the module docstring).

    Args:
        folder: the cache folder (created when missing).
        size: the image size S; an index written for another size is discarded (the cache is rebuilt).
    """

    def __init__(self, folder: str | Path, size: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.row_bytes = size * size * 3
        self.index_path, self.pixels_path = self.folder / "index.json", self.folder / "pixels.u8"
        self.rows, self.entries = 0, {}
        if self.index_path.is_file():
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            if index.get("format") == FORMAT and index.get("size") == size:
                self.rows, self.entries = index["rows"], index["entries"]
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, path: Path) -> tuple[int, ImageEvent] | None:
        """(row, event) of ``path`` as it is now on disk (row -1: the slot stays empty); None when not cached."""
        key = file_key(path)
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            return None
        row, kind, converted, message = entry
        return row, ImageEvent(kind, converted, message)

    def pixels(self, row: int) -> np.ndarray:
        """(S, S, 3) uint8 view of ``row`` in the memory-mapped file."""
        if self._pixels is None or self._pixels.shape[0] < self.rows:
            shape = (self.rows, self.size, self.size, 3)
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r", shape=shape)
        return self._pixels[row]

    def missing(self, paths: Iterable[Path]) -> list[Path]:
        """The existing files among ``paths`` (deduplicated, in order) that the cache does not hold yet."""
        out, seen = [], set()
        for path in paths:
            key = file_key(path)
            if key is not None and key not in self.entries and key not in seen:
                seen.add(key)
                out.append(path)
        return out

    def build(self, paths: Iterable[Path], threads: int = 1, progress: bool = True) -> int:
        """Decode and add the images of ``paths`` the cache lacks (resuming an interrupted build).

        Args:
            paths: image files (duplicates, missing and cached files are skipped).
            threads: decoding threads.
            progress: show a progress bar.

        Returns:
            The number of files added.
        """
        todo = self.missing(paths)
        source = PILImages(ImageSpec(self.size), threads)
        self._pixels = None
        with open(self.pixels_path, "r+b" if self.pixels_path.exists() else "w+b") as out:
            for start in tqdm(range(0, len(todo), CHUNK), desc="image cache", unit_scale=CHUNK, disable=not progress):
                chunk = todo[start : start + CHUNK]
                keys = [file_key(p) for p in chunk]  # before decoding: a file changed meanwhile is decoded again
                results = source.decode(chunk)
                out.seek(self.rows * self.row_bytes)
                for key, (pixels, event) in zip(keys, results, strict=True):
                    row = -1
                    if pixels is not None:
                        out.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
                        row, self.rows = self.rows, self.rows + 1
                    if key is not None:
                        self.entries[key] = [row, event.kind, event.converted, event.message]
                out.flush()
                os.fsync(out.fileno())
                self._write_index()
        return len(todo)

    def _write_index(self) -> None:
        index = {"format": FORMAT, "size": self.size, "rows": self.rows, "entries": self.entries}
        tmp = self.index_path.with_name(f"index.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, self.index_path)


class CachedImages:
    """Image source reading an :class:`ImageCache`; files it does not hold are decoded with PIL (not written).

    Args:
        cache: the cache (its size is the output size).
        spec: normalization (its size must be the cache's).
    """

    name = "cache"

    def __init__(self, cache: ImageCache, spec: ImageSpec) -> None:
        if spec.size != cache.size:
            raise ValueError(f"{cache.folder} holds {cache.size}-pixel images but the ViT needs {spec.size}")
        self.cache, self.spec = cache, spec
        self.fallback = ImageLoader(spec)
        self.misses = 0

    def load(self, paths: Sequence[Path]) -> tuple[torch.Tensor, list[ImageEvent]]:
        """Read ``paths`` from the cache.

        Returns:
            (N, S, S, 3) uint8 CPU tensor of the present images in the order of ``paths``, and one event per path.
        """
        arrays, events = [], []
        for path in paths:
            hit = self.cache.lookup(path)
            if hit is None:
                self.misses += 1
                pixels, event = self.fallback.load_uint8(path)
            else:
                row, event = hit
                pixels = self.cache.pixels(row) if row >= 0 else None
            events.append(event)
            if pixels is not None:
                arrays.append(pixels)
        return stack_uint8(arrays, self.spec.size), events


def dataset_images(data_dir: Path, dataset: str, image_dir=None, twitter2017_image_dir=None) -> list[Path]:
    """Every image path of the train, val and test splits (up to 4 per post)."""
    return [
        path
        for split in SPLITS
        for post in load_split(data_dir, dataset, split, image_dir, twitter2017_image_dir)
        for path in post.images
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tpm_fast.data.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="decode a dataset's images into the cache (resumes an interrupted build)")
    b.add_argument("cache_dir")
    b.add_argument("--data-dir", help="dataset folder (default: the embedded synthetic corpus)")
    b.add_argument("--dataset", default="MI", choices=["MI", "UNI", "twitter2015", "twitter2017"])
    b.add_argument("--image-dir")
    b.add_argument("--twitter2017-image-dir")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--vit-model", help="local ViT folder: the image size of its image processor")
    size.add_argument("--size", type=int, help="image size (default 224, the tiny default ViT's)")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoding threads")
    args = p.parse_args(argv)
    if args.data_dir:
        data_dir, dataset = Path(args.data_dir), args.dataset
    else:
        data_dir, dataset = ensure_synthetic_corpus(), "synthetic"
    spec = ImageSpec.from_pretrained(args.vit_model) if args.vit_model else ImageSpec(args.size or 224)
    paths = dataset_images(data_dir, dataset, args.image_dir, args.twitter2017_image_dir)
    cache = ImageCache(args.cache_dir, spec.size)
    start = time.perf_counter()
    added = cache.build(paths, args.threads)
    took = time.perf_counter() - start
    print(f"{cache.folder}: {len(cache)} files ({cache.rows} images of {spec.size} px); added {added} in {took:.1f} s")


if __name__ == "__main__":
    main()
