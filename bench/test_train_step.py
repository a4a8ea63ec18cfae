"""One full TPM-MI training step (batch in, loss, backward, optimizer step), providers side by side.

Group ``train-step-<mode>-B<b>``: ``text`` mode with a MiniLM-L6-sized BERT (BERT-CRF), ``multi`` mode with
BERT-base + ViT-B/16 (random weights; speed depends on sizes only). Posts are MNER-MI-like: 6-64 word pieces
(gamma-distributed, mean ~36), 1-4 images (probabilities 0.1/0.2/0.3/0.4, mean 3.0). Each timed round is one step
on the next of ``rounds`` batches taken at evenly spaced quantiles of their cost from one epoch over 2,000 such
posts (random or length-bucketed, as the provider batches), so that a few steps estimate the epoch's mean step.

Providers, a ladder where each step keeps the ones above it:

- ``authors``: the authors' recipe (``bench/authors_recipe.py``): padded to 64, ViT on all 4 slots, eager attention,
  pytorch-crf decoding every step, ``torch.optim.AdamW`` defaults, fp32;
- ``dynamic``: + each batch padded to its longest post, ViT on present images only;
- ``fused``: + TPM-MI itself (``tpm_fast.TPMMI``: prompted BERT with the fused prefix attention, the fused CRF, no
  decode in training; the kernels on CUDA, the PyTorch reference path on CPU), gradient clipping 1.0;
- ``bucketed``: + length-bucketed batches (``tpm_fast.data.bucketing.LengthBucketSampler``, as ``train.py`` does);
- ``fused_adamw``: + ``torch.optim.AdamW(fused=True)``;
- ``compile``: ``fused_adamw`` + ``torch.compile`` of the encoders (inductor; CUDA graphs on GPU);
- ``bf16``: ``fused_adamw`` + bf16 weights and activations with fp32 master weights (``PlainEngine(dtype=bf16)``,
  as DeepSpeed's bf16): only where the hardware has bf16 instructions;
- ``defaults``: what ``train.py`` picks on this device (bf16 by ``choose_precision``, bucketing by
  ``choose_bucketing``), fused AdamW, no engine on one rank.

and, in text mode, the training engine: ``plain`` (``fused_adamw`` in a plain loop: ``tpm_fast.PlainEngine``) vs
``zero0``..``zero3`` (the same model and optimizer through ``deepspeed.initialize`` at that ZeRO stage, one rank).

``extra_info`` per benchmark: ``samples_per_s`` (B / mean step time), ``peak_mb`` (CUDA: peak allocated; CPU: the
weights plus the growth of the process's peak RSS during the first step, which allocates gradients, optimizer
state and activations), ``kernel_ops`` and ``host_syncs`` of the second step (`tpm_fast.profiling.count_kernel_ops`,
the CPU proxy for GPU launch overhead), ``padding`` (padded share of the pieces over the epoch's batches),
``model_tflops`` (:func:`tpm_fast.flops.step_flops`) and, on CUDA, ``gpu_busy`` (kernel time / wall time of a
step) and, on GPUs whose peak is known, ``mfu``. On CPU, ``gpu_path_kernel_ops`` counts the same step on the Triton
backend with its launches stubbed: the launches the GPU path would make.

With ``--benchmark-disable`` (the CI smoke run) every provider runs once on the tiny BERT/ViT of the embedded
default (same code paths, seconds instead of minutes).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import os
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, ViTConfig

import tpm_fast.model as tpm_model
from bench import authors_recipe
from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import collate
from tpm_fast.engine import optimizer_and_schedule, to_device
from tpm_fast.flops import padding_share, peak_flops, step_flops
from tpm_fast.layers.prompted_bert import prompted_bert
from tpm_fast.model import TINY_BERT, TINY_VIT, TPMConfig, build_model
from tpm_fast.ops.backend import interpreting, triton_available
from tpm_fast.plain_engine import PlainEngine
from tpm_fast.profiling import count_kernel_ops, count_triton_launches
from tpm_fast.runtime import choose_bucketing, choose_precision, native_bf16

POOL, PAD_TO, VOCAB, SEED = 2000, 64, 30522, 0
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, intermediate_size=3072)
LADDER = ["authors", "dynamic", "fused", "bucketed", "fused_adamw", "compile", "bf16", "defaults"]
ENGINES = ["plain", "zero0", "zero1", "zero2", "zero3"]
ROUNDS = {("text", 4): 16, ("text", 32): 6, ("multi", 4): 4, ("multi", 32): 2}
CASES = [
    (mode, b, provider)
    for mode in ("text", "multi")
    for b in (4, 32)
    for provider in LADDER + (ENGINES if mode == "text" else [])
]


def posts(count: int = POOL, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Word pieces per post (6..64, mean ~36) and images per post (1..4, mean 3.0) of ``count`` MNER-MI-like posts."""
    g = np.random.default_rng(seed)
    lengths = np.clip(np.round(g.gamma(4.0, 8.0, count)) + 4, 6, PAD_TO).astype(int)
    images = g.choice([1, 2, 3, 4], count, p=[0.1, 0.2, 0.3, 0.4])
    return lengths, images


def epoch_batches(lengths: np.ndarray, b: int, bucket: bool) -> list[list[int]]:
    """The full batches of one epoch over the pool: random, or length-bucketed as ``train.py`` makes them."""
    if bucket:
        return [batch for batch in LengthBucketSampler(lengths.tolist(), b, seed=SEED) if len(batch) == b]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(SEED)).tolist()
    return [order[i : i + b] for i in range(0, len(order) - b + 1, b)]


def representative(batches: list[list[int]], lengths, images, k: int) -> list[list[int]]:
    """``k`` batches at evenly spaced quantiles of their cost (pieces after padding + ViT tokens), so that a few timed
    steps estimate the epoch's mean step; the warm-up step (the first) is the median one."""

    def cost(batch):
        pieces = len(batch) * max(int(lengths[i]) for i in batch)
        return pieces + (197 * sum(int(images[i]) for i in batch) if images is not None else 0)

    ranked = sorted(batches, key=cost)
    chosen = [ranked[int((j + 0.5) / (k - 1) * len(ranked))] for j in range(k - 1)] if k > 1 else []
    return [ranked[len(ranked) // 2], *chosen]


def padded_pieces(lengths: np.ndarray, batches: list[list[int]], pad_to: int | None) -> float:
    """Share of padded pieces over ``batches`` (padded to ``pad_to``, or to each batch's longest post)."""
    real = sum(int(lengths[i]) for batch in batches for i in batch)
    padded = sum(len(batch) * (pad_to or max(int(lengths[i]) for i in batch)) for batch in batches)
    return 1.0 - real / padded


def make_batch(index: list[int], lengths, images, mode: str, size: int, pad_to: int | None) -> dict:
    """Collate posts ``index`` as ``collate`` and the image feed do (random ids, labels, pixels); with ``pad_to``
    also pad to that many pieces and lay the images out as (B, 4, 3, S, S) slots with zero images (the authors')."""
    items = []
    for i in index:
        g = torch.Generator().manual_seed(1_000_003 * SEED + i)
        n = int(lengths[i])
        ids = torch.randint(1000, VOCAB, (n,), generator=g).tolist()
        encoded = {"input_ids": [101, *ids[1:-1], 102], "label_ids": torch.randint(0, 10, (n,), generator=g).tolist()}
        encoded["first_piece"] = [True] * n
        n_images = images[i] if mode == "multi" else 0
        items.append({"encoded": encoded, "images": [f"{i}_{k}.jpg" for k in range(n_images)], "index": i})
    posts = collate(items, pad_id=0)
    g = torch.Generator().manual_seed(SEED + index[0])
    image_post = torch.tensor(posts.image_post, dtype=torch.long)  # shape: (N,)
    image_slot = torch.tensor(posts.image_slot, dtype=torch.long)  # shape: (N,)
    image_mask = torch.zeros(len(index), 4, dtype=torch.bool)  # shape: (B, 4)
    image_mask[image_post, image_slot] = True
    pixels = torch.randn(len(posts.image_paths), 3, size, size, generator=g)  # shape: (N, 3, S, S)
    batch = dict(
        posts.tensors, pixel_values=pixels, image_post=image_post, image_slot=image_slot, image_mask=image_mask
    )
    if pad_to:
        extra = pad_to - batch["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "labels", "first_piece"):
            batch[key] = F.pad(batch[key], (0, extra))
        slots = torch.zeros(len(index), 4, 3, size, size)  # shape: (B, 4, 3, S, S)
        slots[batch["image_post"], batch["image_slot"]] = batch["pixel_values"]
        batch["slot_pixels"] = slots
    return batch


def configs(mode: str, smoke: bool) -> tuple[BertConfig, ViTConfig | None]:
    if smoke:
        bert, vit = dict(TINY_BERT), dict(TINY_VIT)
    else:
        bert, vit = dict(MINILM if mode == "text" else BERT_BASE), dict(VIT_B16)
    bert.update(vocab_size=VOCAB, max_position_embeddings=512)
    return BertConfig(**bert), ViTConfig(**vit) if mode == "multi" else None


def ours(mode: str, bert: BertConfig, vit: ViTConfig | None, fused_adamw: bool, device: torch.device):
    """TPM-MI with train.py's optimizer (two learning rates, fused AdamW or not) and clipping 1.0."""
    config = TPMConfig(image_mode=mode, bert=bert.to_dict(), vit=vit.to_dict() if vit else {})
    model = build_model(config, VOCAB).to(device).train()
    optimizer, _ = optimizer_and_schedule(model, 5e-5, 1e-3, 0.01, 1000, 0.0, fused=fused_adamw)
    return model, optimizer


@pytest.fixture(scope="module")
def distributed():
    """One rank for deepspeed.initialize (the engine providers), started as train.py starts it."""
    import deepspeed

    from tpm_fast.session import init_distributed

    if not torch.distributed.is_initialized():
        init_distributed()
    return deepspeed


def deepspeed_engine(deepspeed, model, optimizer, stage: int):
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def first_step_memory(step, device: torch.device, weights: int) -> float:
    """Run ``step`` once (the first step: it also creates the optimizer state) and return its peak memory in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD fixed at 64 KiB: every tensor is mmapped, freed memory leaves RSS
    libc.malloc_trim(0)  # freed memory of earlier benchmarks goes back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    step()
    return (weights + (_status_kb("VmHWM") - before) * 1024) / 2**20


def steady_step_ops(step) -> tuple[int, Counter, int]:
    """(aten kernel ops, host-sync ops, Triton launches) of one step after the first (the optimizer state exists, as
    in every step of an epoch but the first)."""
    with count_triton_launches() as launches:
        ops, _, syncs = count_kernel_ops(step)
    return ops, syncs, sum(launches.values())


def gpu_busy_share(step) -> float:
    """Share of one step's wall time during which the GPU runs kernels (the kernels of one stream do not overlap, so
    their durations add up)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    busy_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / 1e6 / wall


def triton_path_ops(model, step) -> tuple[int, int, int]:
    """(aten kernel ops, Triton launches, host syncs) of one step of ``model`` on the Triton backend with its launches
    stubbed: the GPU path's launch count, measured on the CPU. The step's results are garbage (run it last). BERT
    computes the padding, as on CUDA by default (CPU tensors would make it skip it)."""
    model.backend = "triton"
    padded = functools.partial(prompted_bert, pack=False)
    with count_triton_launches(stub=True) as launches, mock.patch.object(tpm_model, "prompted_bert", padded):
        ops, _, syncs = count_kernel_ops(step)
    return ops, sum(launches.values()), sum(syncs.values())


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.parametrize("mode,b,provider", CASES)
def test_train_step(bench, benchmark, bench_device, request, mode, b, provider):
    smoke = request.config.getoption("benchmark_disable")
    device = bench_device
    if provider == "bf16" and not native_bf16(device):
        pytest.skip(f"{device.type} has no native bf16 (e.g. an AVX2-only CPU): bf16 would be emulated")
    if provider == "authors" and mode == "multi" and b == 32 and not smoke and device.type == "cpu":
        need, have = 128 * 139 * 2**20 + 4 * 2**30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > 0.9 * have:  # measured: ViT-B/16 keeps ~139 MB of activations per image (eager, fp32)
            pytest.skip(f"the authors' recipe at B=32 runs 128 ViT images: ~{need / 2**30:.0f} GB, this machine has "
                        f"{have / 2**30:.0f} GB")  # fmt: skip
    torch.manual_seed(SEED)
    bert, vit = configs(mode, smoke)
    size = vit.image_size if vit else 224
    lengths, images = posts()
    bucket = provider not in ("authors", "dynamic", "fused")
    precision = "bf16" if provider == "bf16" else "fp32"
    if provider == "defaults":  # train.py's choices for this device, model and data
        counts = images.tolist() if mode == "multi" else [0] * len(lengths)
        share = padding_share(_flops_model(None, mode, bert, vit), lengths, counts, b, packed=device.type == "cpu")
        bucket, _ = choose_bucketing("auto", share)
        precision, _ = choose_precision("auto", device, bert.hidden_size)
    batches = epoch_batches(lengths, b, bucket)
    rounds = 1 if smoke else ROUNDS[(mode, b)]
    pad_to = PAD_TO if provider == "authors" else None
    picked = representative(batches, lengths, images if mode == "multi" else None, rounds + 1)  # + a warm-up step

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the weights' and images' dtype

    def to(batch):
        return to_device(batch, device, dtype)

    data = [to(make_batch(index, lengths, images, mode, size, pad_to)) for index in picked]
    authors = provider in ("authors", "dynamic")
    if authors:
        model, optimizer = authors_recipe.build(bert, vit, dynamic=provider == "dynamic")
        model.to(device)
        run = lambda batch: authors_recipe.step(model, optimizer, batch)  # noqa: E731
    else:
        model, optimizer = ours(mode, bert, vit, provider not in ("fused", "bucketed"), device)
        if provider.startswith("zero"):
            pytest.importorskip("deepspeed")
            engine = deepspeed_engine(request.getfixturevalue("distributed"), model, optimizer, int(provider[4:]))
        else:
            engine = PlainEngine(model, optimizer, gradient_clipping=1.0, dtype=dtype)
        if provider == "compile":
            model.emission_scores = torch.compile(model.emission_scores, dynamic=True)

        def run(batch):
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            return loss

    batches_iter = itertools.cycle(data)
    step = lambda: run(next(batches_iter))  # noqa: E731
    if provider == "compile":
        step()  # compilation happens here, not in the counted or timed steps
        batches_iter = itertools.cycle(data)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for t in (getattr(engine, "masters", None) or []) if not authors else []:
        weights += t.numel() * t.element_size()  # the fp32 master weights, allocated before the first step
    peak_mb = first_step_memory(step, device, weights)
    ops, syncs, launches = steady_step_ops(step)
    flops = sum(step_flops(_flops_model(model, mode, bert, vit), batch) for batch in data[1:]) / max(1, len(data) - 1)
    shape = {"B": b, "mode": mode, "bert": bert.hidden_size, "vit": vit.hidden_size if vit else None}
    bench(step, group=f"train-step-{mode}-B{b}", provider=provider, dtype=dtype, shape=shape,
          rounds=rounds)  # fmt: skip
    info = dict(
        peak_mb=round(peak_mb, 1),
        kernel_ops=ops + launches,
        host_syncs=sum(syncs.values()),
        padding=round(padded_pieces(lengths, batches, pad_to), 3),
        bucketed=bucket,
        model_tflops=round(flops / 1e12, 3),
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not smoke:
        mean = stats.stats.mean
        info["samples_per_s"] = round(b / mean, 3)
        peak = peak_flops(device, precision)
        if peak:
            info["mfu"] = round(flops / mean / peak, 4)
    if device.type == "cuda":
        info["gpu_busy"] = round(gpu_busy_share(step), 3)
    if hasattr(model, "images") and provider != "compile" and device.type == "cpu" and interpreting():
        if triton_available():  # the GPU path's launches, counted here with the kernels stubbed (after the timing)
            aten, triton_launches, gpu_syncs = triton_path_ops(model, step)
            info.update(gpu_path_kernel_ops=aten + triton_launches, gpu_path_triton_launches=triton_launches,
                        gpu_path_host_syncs=gpu_syncs)  # fmt: skip
    benchmark.extra_info.update(info)


_FLOPS_MODELS: dict = {}


def _flops_model(model, mode: str, bert: BertConfig, vit: ViTConfig | None):
    """A TPMMI of the same sizes (the authors' module has the same FLOPs per real piece and present image)."""
    if hasattr(model, "images"):
        return model
    key = (mode, bert.hidden_size, vit.hidden_size if vit else None)
    if key not in _FLOPS_MODELS:
        config = TPMConfig(image_mode=mode, bert=bert.to_dict(), vit=vit.to_dict() if vit else {})
        with torch.device("meta"):
            _FLOPS_MODELS[key] = build_model(config, VOCAB)
    return _FLOPS_MODELS[key]
