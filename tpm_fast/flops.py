"""Model FLOPs of a TPM-MI training step and the peak of the GPU it runs on, for model FLOPs utilization (MFU).

Counted as PaLM's MFU does: matrix products only (2 FLOPs per multiply-add), forward x 3 for forward + backward,
over the **real** work of the batch: unpadded word pieces, present images only. Padding, recomputation and
elementwise ops are not model FLOPs, so they lower the MFU. Per step:

- BERT, each of L layers, per real piece of a post with n_b pieces and m prefix slots:
  ``2 (4 d_t^2 + 2 d_t d_ff) + 4 d_t (m + n_b)`` (Q, K, V, output, FFN; scores and weighted sum over m + n_b keys);
- ViT, each of L_v layers, per token (197 for a 224x224 image in 16x16 patches + [CLS]):
  ``2 (4 d_v^2 + 2 d_v d_ff_v) + 4 d_v * tokens``, plus the patch projection ``2 * 3 p^2 d_v`` per patch (x 2, not
  x 3: the pixels need no gradient);
- image head per post: the temporal Transformer over m slots and the prefix MLP ``2 (d_v h + h L 2 d_t)`` per slot;
- the emission layer ``2 d_t T`` per piece (the CRF's O(T^2) per piece is negligible and not counted).

``bench/README.md`` states the same formula beside the figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Dense peak FLOP/s by (GPU name substring, compute dtype). fp32 means fp32 FMA (PyTorch's default "highest"
# matmul precision); "tf32" applies when torch.backends.cuda.matmul.allow_tf32 is on.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
}


def _layer_flops(d: int, d_ff: int, tokens: float, keys_x_tokens: float) -> float:
    """Forward FLOPs of one Transformer layer: ``tokens`` queries, ``keys_x_tokens`` = sum of keys per query."""
    return 2 * (4 * d * d + 2 * d * d_ff) * tokens + 4 * d * keys_x_tokens


def step_flops(model, batch: dict) -> float:
    """Model FLOPs of one training step (forward + backward) of ``model`` (a TPMMI) on a collated ``batch``.

    Args:
        model: a :class:`tpm_fast.model.TPMMI` (only its configs are read).
        batch: ``attention_mask`` (B, n) and ``image_post`` (N,) of the present images (CPU tensors avoid a sync).

    Returns:
        FLOPs as a float (no host sync beyond reading the mask's per-row sums).
    """
    images = batch["image_post"].shape[0] if model.images is not None else 0
    return posts_flops(model, batch["attention_mask"].sum(1), images)


def posts_flops(model, lengths: torch.Tensor, images: int) -> float:
    """Model FLOPs of a training step on posts of ``lengths`` (B,) word pieces with ``images`` present images."""
    bc = model.bert.config
    d_t, layers = bc.hidden_size, bc.num_hidden_layers
    lengths = lengths.double()  # shape: (B,)
    posts = lengths.numel()
    m = 0 if model.images is None else model.images.slots
    tokens = float(lengths.sum())
    fwd = layers * _layer_flops(d_t, bc.intermediate_size, tokens, float((lengths * (lengths + m)).sum()))
    fwd += 2 * d_t * len(model.config.labels) * tokens
    if model.images is None:
        return 3.0 * fwd
    vc = model.images.vit.config
    d_v, patches = vc.hidden_size, (vc.image_size // vc.patch_size) ** 2
    vit_tokens = images * (patches + 1)
    fwd += vc.num_hidden_layers * _layer_flops(d_v, vc.intermediate_size, vit_tokens, vit_tokens * (patches + 1))
    patch_projection = 2 * 3 * vc.patch_size**2 * d_v * patches * images  # its backward: the weight grad only
    enc = model.images.encoder.layers[0]
    fwd += len(model.images.encoder.layers) * _layer_flops(d_v, enc.linear1.out_features, posts * m, posts * m * m)
    hidden = model.images.project[0].out_features
    fwd += 2 * (d_v * hidden + hidden * layers * 2 * d_t) * posts * m
    return 3.0 * fwd + 2.0 * patch_projection


def padding_share(
    model, lengths: Sequence[int], images: Sequence[int], batch_size: int, seed: int = 0, packed: bool = False
) -> float:
    """Share of an epoch's model FLOPs that padding would add with random batches (each padded to its longest post).

    Args:
        model: a TPMMI (configs only).
        lengths, images: word pieces and present images of each training post.
        batch_size: posts per batch; ``seed`` seeds the one random epoch order that is measured.
        packed: BERT skips the padding (``prompted_bert``'s packing, the default on CPU): then padding costs only
            the attention over the padded (B, n) grid (its scores and weighted sum), not the projections or the FFN.

    Returns:
        padded FLOPs / all FLOPs, in [0, 1).
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))  # shape: (N,)
    pieces, counts = torch.as_tensor(lengths)[order], torch.as_tensor(images)[order]
    bc = model.bert.config
    m = 0 if model.images is None else model.images.slots
    real = padded = 0.0
    for batch, n_images in zip(pieces.split(batch_size), counts.split(batch_size)):
        flops = posts_flops(model, batch, int(n_images.sum()))
        real += flops
        if packed:  # forward x 3 of the attention's 4 d_t FLOPs per (query, key) pair, padded minus real pairs
            n = batch.double()  # shape: (b,)
            pairs = n.numel() * float(n.max() * (n.max() + m)) - float((n * (n + m)).sum())
            padded += flops + 3.0 * bc.num_hidden_layers * 4 * bc.hidden_size * pairs
        else:
            padded += posts_flops(model, batch.max().expand_as(batch), int(n_images.sum()))
    return 1.0 - real / padded


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` for ``precision`` ("fp32" | "bf16"), or None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None
