"""The fastest correct run configuration for the machine: image loader, threads, precision, ZeRO stage.

Each ``choose_*`` function returns its choice and the reason, which ``train.py`` prints in its first lines. The
rules come from measurements in ``bench/README.md`` (train-step benchmark, 2-rank scaling).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ZERO_STAGES = ("auto", "off", "0", "1", "2", "3")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUCKETING = ("auto", "on", "off")
IMAGE_LOADERS = ("auto", "dali", "pil", "cache")
BUCKET_MIN_SAVING = 0.25  # bucket only where random batches would spend this share of the FLOPs on padding
MODEL_STATE_BYTES = 16
"""fp32 weights + gradients + AdamW's two moments: bytes of model state per parameter without ZeRO."""


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask; containers and taskset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Ranks of this job on this machine (``LOCAL_WORLD_SIZE`` from the launcher; 1 when absent)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def choose_image_loader(
    requested: str, image_mode: str, device: torch.device, cache_dir: str | None
) -> tuple[str, str]:
    """The image source: ``"dali"``, ``"cache"``, ``"pil"`` or ``"none"`` (text only).

    ``auto``: DALI where it is installed and a GPU is present, else the cache when ``--image-cache`` names one,
    else PIL's thread pool.

    Raises:
        ValueError: ``dali`` without DALI installed, ``cache`` without a cache folder.
    """
    from tpm_fast.data.dali import dali_unavailable

    if image_mode == "text":
        return "none", "text only: no images"
    problem = dali_unavailable()
    if requested == "dali":
        if problem:
            raise ValueError(f"--image-loader dali: {problem}")
        return "dali", "--image-loader" + ("" if device.type == "cuda" else "; no GPU: DALI's CPU pipeline")
    if requested == "cache" and not cache_dir:
        raise ValueError("--image-loader cache needs --image-cache DIR")
    if requested in ("cache", "pil"):
        return requested, "--image-loader"
    if device.type == "cuda" and not problem:
        return "dali", "auto: DALI is installed and a GPU is present"
    why = "DALI not installed" if problem else "no GPU for DALI"
    if cache_dir:
        return "cache", f"auto: --image-cache given; {why}"
    return "pil", f"auto: no --image-cache; {why}"


def choose_image_threads(
    requested: int | None, image_mode: str, device: torch.device, loader: str = "pil"
) -> tuple[int, str]:
    """Image-loading threads per rank beside the step (PIL's thread pool, DALI's CPU threads).

    They run beside the step, so on CPU they take cores from the model: one per rank with at least 2 cores (the
    decode of ~3 images per post keeps up with a CPU step), none for the decoded-image cache (a batch is a read and a
    normalization, so no core is kept for it); on CUDA up to 8 per rank, bounded by the rank's cores minus the main
    thread. Where 0 leaves intra-op threads on every core, the feed also assembles batches in the step's thread
    (:func:`feed_prefetch`).
    """
    if requested is not None:
        return requested, "--image-threads"
    if image_mode == "text":
        return 0, "text only: nothing to decode"
    per_rank = max(1, cpu_cores() // local_world_size())
    if device.type == "cuda":
        return max(1, min(8, per_rank - 1)), f"{per_rank} cores per rank"
    if loader == "cache":
        return 0, "the cache decodes nothing per batch: no core is kept for it"
    if per_rank < 2:
        return 0, "one core per rank: no decoding thread beside the feed's"
    return 1, f"{per_rank} cores per rank: one decodes images"


def feed_prefetch(image_threads: int, compute_threads: int, device: torch.device) -> int:
    """Batches the image feed assembles ahead of the step in a background thread (0: in the step's thread).

    Ahead (2) where a core is kept for loading (``image_threads`` > 0), the step runs on a GPU, or it computes on one
    thread (a background thread then only takes turns with it, and can fill its waits). On CPU without image threads
    and with intra-op threads on every core, a background thread takes turns with those threads on their cores while
    the others wait for them at their barriers: assembling in the step's thread trained the embedded default with the
    decoded-image cache ~1.5x faster on 2 cores (``bench/image_feed.py``, ``bench/README.md``).
    """
    return 2 if device.type == "cuda" or image_threads > 0 or compute_threads == 1 else 0


def configure_threads(image_threads: int, device: torch.device) -> tuple[int, str]:
    """Set torch's intra-op threads so that compute and image threads never exceed the cores (on CPU).

    Each rank gets ``cores // local ranks`` cores; its image-decoding threads take ``image_threads`` of them, the
    model the rest. Oversubscribed OpenMP threads spin waiting for a
    descheduled sibling and made whole epochs 5-10x slower on a 2-core machine. ``OMP_NUM_THREADS`` set by the user
    wins.
    """
    if "OMP_NUM_THREADS" in os.environ and "TPM_FAST_THREADS" not in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    per_rank = max(1, cpu_cores() // local_world_size())
    reserved = image_threads if device.type == "cpu" else 0
    threads = int(os.environ.get("TPM_FAST_THREADS", 0)) or max(1, per_rank - reserved)
    torch.set_num_threads(threads)
    return threads, f"{per_rank} cores per rank, {image_threads} image thread(s)"


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bf16 matrix products in hardware (CUDA sm_80+; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        return any(p() for p in probes if p is not None)
    try:  # older torch: read the CPU flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_precision(requested: str, device: torch.device, hidden_size: int) -> tuple[str, str]:
    """``bf16`` (bf16 weights and activations, fp32 master weights) where the hardware multiplies bf16 natively and
    the model is large enough for it to pay, else ``fp32``. ``fp16`` (DeepSpeed's, with dynamic loss scaling) only
    when asked for.

    Raises:
        ValueError: fp16 asked for off a GPU, or bf16 on a GPU without it.

    Below a hidden size of 256 the products are too small to gain on CPU: the embedded default (hidden 128) ran
    155 posts/s in bf16 against 181 in fp32.
    """
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("--fp16 is for GPUs without bf16 (DeepSpeed's loss-scaled fp16): on CPU use fp32 or bf16")
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--bf16: this GPU ({name}) has no bf16: use --fp16 (DeepSpeed's loss scaling) or fp32")
    if requested != "auto":
        if requested == "bf16" and device.type == "cpu" and not native_bf16(device):
            return requested, "asked for (this CPU has no bf16 instructions: slower than fp32)"
        return requested, "asked for"
    if not native_bf16(device):
        hint = "; --fp16 runs DeepSpeed's loss-scaled fp16" if device.type == "cuda" else ""
        return "fp32", f"{device.type} has no native bf16{hint}"
    if device.type == "cpu" and hidden_size < 256:
        return "fp32", f"hidden size {hidden_size} < 256: too small for bf16 to pay on CPU"
    return "bf16", "native bf16 on this " + ("GPU" if device.type == "cuda" else "CPU (AVX512-BF16/AMX)")


def choose_bucketing(requested: str, padding_share: float) -> tuple[bool, str]:
    """Length-bucketed training batches (True) or random ones, and why.

    Bucketing saves the compute that padding wastes, but it changes what a batch holds (posts of about one length):
    on the embedded corpus (where padding takes 11 % of the FLOPs) it widened the seed-to-seed spread of dev F1 and
    lowered its mean by ~2 points (``bench/README.md``). ``auto`` therefore buckets only where random batches would
    spend at least a quarter of the step's model FLOPs on padding (``tpm_fast.flops.padding_share``): text-only
    steps such as BERT-CRF on tweets on a GPU (~40 %), not steps dominated by ViT on the images (5-11 %), nor CPU
    steps, where BERT skips the padding (``prompted_bert``'s packing) and padding costs only attention FLOPs.
    """
    if requested != "auto":
        return requested == "on", "asked for"
    share = f"random batches would spend {padding_share:.0%} of the model FLOPs on padding"
    if padding_share >= BUCKET_MIN_SAVING:
        return True, share
    return False, f"{share}, < {BUCKET_MIN_SAVING:.0%}: not worth changing what a batch holds"


def device_memory(device: torch.device) -> int:
    """Bytes of memory of one rank's device: the GPU's, or the machine's RAM shared by the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // local_world_size()


def choose_zero_stage(
    requested: str, world: int, n_params: int, device: torch.device, precision: str = "fp32"
) -> tuple[str, str]:
    """``"off"`` (no DeepSpeed engine), or the ZeRO stage ``"0"``..``"3"`` to run DeepSpeed with.

    - One rank: ``off``. ZeRO partitions across ranks; with one there is nothing to partition and the engine only
      adds time per step (``bench/README.md``, one CPU rank, text mode: +9 % for stage 0 to +23 % for stage 3 at
      batch 32, +31 % to +184 % at batch 4).
    - Several ranks, fp32 model state (16 bytes a parameter) within a quarter of a rank's memory: stage 0, plain
      data parallel. ZeRO-1/2 move as many bytes per step (a reduce-scatter plus an all-gather = one all-reduce)
      and only save memory that is not short; on 2 CPU ranks stage 0 ran as fast as ZeRO-1 (``bench/scaling.py``).
      With bf16 or fp16 the fp32 master weights live in the ZeRO optimizer: ZeRO-1 (also on one rank for fp16,
      whose loss scaling only DeepSpeed does here).
    - Larger models: ZeRO-2 (gradients and optimizer state partitioned) while the weights fit, else ZeRO-3 (50 %
      more traffic: the weights are gathered in the forward and again in the backward).
    """
    if requested == "off" and precision == "fp16":
        raise ValueError("--fp16 needs DeepSpeed's loss scaling: use a --zero-stage from 0 to 3 (or auto)")
    if requested != "auto":
        return requested, "asked for"
    if world == 1 and precision == "fp16":
        return "1", "one rank, fp16: DeepSpeed's loss scaling, with the fp32 master weights in the ZeRO-1 optimizer"
    if world == 1:
        return "off", "one rank: ZeRO has nothing to partition, so the DeepSpeed engine is bypassed"
    memory, state = device_memory(device), MODEL_STATE_BYTES * n_params
    gb = f"{state / 2**30:.1f} GB of model state, {memory / 2**30:.0f} GB per rank"
    if state <= memory // 4:
        if precision in ("bf16", "fp16"):
            return "1", f"{world} ranks, {gb}: ZeRO-1 (data-parallel traffic; {precision} keeps fp32 masters there)"
        return "0", f"{world} ranks, {gb}: plain data parallel (ZeRO would save memory that is not short)"
    if 4 * n_params + (state - 4 * n_params) // world <= memory // 4:
        return "2", f"{world} ranks, {gb}: ZeRO-2 (gradients and optimizer state partitioned)"
    return "3", f"{world} ranks, {gb}: ZeRO-3 (weights partitioned too)"
