"""Images: tweet-like photographs (scikit-image's samples re-encoded at 400-2048 px, every third one a PNG) decoded,
resized to 224 x 224 and normalized into one tensor on the training device, per provider:

- ``authors``: the authors' recipe: PIL ``Image.open(...).convert("RGB")`` + HF ``ViTImageProcessor``, one image at a
  time in the main thread;
- ``pil_threads``: :class:`tpm_fast.data.feed.PILImages` on a thread pool (one thread per core; reduced-scale JPEG
  decoding) + :func:`tpm_fast.data.images.normalize`;
- ``dali_cpu`` / ``dali_gpu``: :class:`tpm_fast.data.dali.DaliImages` (CPU pipeline / ``device="mixed"``; CUDA only);
- ``cache``: :class:`tpm_fast.data.cache.CachedImages` reading the decoded-image cache (built before timing).

``extra_info.images_per_s`` is the images of one round over the mean round time.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.image_corpus import write_photos
from tpm_fast.data.cache import CachedImages, ImageCache
from tpm_fast.data.dali import dali_unavailable
from tpm_fast.data.feed import PILImages
from tpm_fast.data.images import ImageSpec, normalize

SETS = 4  # 4 x 5 photographs per round, each set at its own random sizes
SPEC = ImageSpec(224)
PROVIDERS = ["authors", "pil_threads", "dali_cpu", "dali_gpu", "cache"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-photos")
    paths = []
    for k in range(SETS):
        (folder / str(k)).mkdir()
        paths += write_photos(folder / str(k), np.random.default_rng(k))
    return folder, paths


def _authors(paths, device):
    from transformers import ViTImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to the PIL backend"
        processor = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=SPEC.mean, image_std=SPEC.std)

    def run():
        pixels = []
        for path in paths:
            with Image.open(path) as im:
                pixels.append(processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"])
        return torch.cat(pixels).to(device)  # shape: (N, 3, 224, 224)

    return run


def _source(provider, folder, paths, device):
    cores = os.cpu_count() or 1
    if provider == "pil_threads":
        return PILImages(SPEC, threads=cores)
    if provider == "cache":
        cache = ImageCache(folder / "cache", SPEC.size)
        cache.build(paths, threads=cores, progress=False)
        return CachedImages(cache, SPEC)
    from tpm_fast.data.dali import DaliImages

    return DaliImages(SPEC, device if provider == "dali_gpu" else torch.device("cpu"), threads=cores)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_images(bench, benchmark, bench_device, photos, provider):
    if provider.startswith("dali") and (problem := dali_unavailable()):
        pytest.skip(problem)
    if provider == "dali_gpu" and bench_device.type != "cuda":
        pytest.skip("DALI's mixed (GPU) decoder needs CUDA")
    folder, paths = photos
    if provider == "authors":
        fn = _authors(paths, bench_device)
    else:
        source = _source(provider, folder, paths, bench_device)

        def fn():
            pixels, _ = source.load(paths)
            return normalize(pixels.to(bench_device), SPEC)  # shape: (N, 3, 224, 224)

    out = fn()
    assert out.shape == (len(paths), 3, 224, 224) and out.device.type == bench_device.type
    rounds = 5 if provider == "authors" else 10
    threads = 1 if provider == "authors" else os.cpu_count() or 1  # decoding threads (torch's: the conftest's)
    shape = {"images": len(paths)}
    bench(
        fn,
        group="images-224",
        provider=provider,
        dtype=torch.float32,
        shape=shape,
        rounds=rounds,
        decode_threads=threads,
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(len(paths) / benchmark.stats.stats.mean, 1)
