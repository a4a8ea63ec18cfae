"""Linear-chain CRF ops: backend dispatch between the fused Triton kernels and the PyTorch reference.

Same arguments and semantics as `tpm_fast.reference.crf` (pytorch-crf: ``transitions[i, j]`` scores tag i -> tag j,
``start`` / ``end`` (T,), emissions (B, n, T), masks (B, n) bool), plus ``backend``:

- ``"auto"``: the Triton kernels on CUDA tensors when Triton is installed, the reference elsewhere;
- ``"triton"``: the kernels (CPU tensors only under ``TRITON_INTERPRET=1``); ``"reference"``: the reference.

On the Triton path only shapes and dtypes are validated (same ``ValueError`` messages as the reference); mask
contents are **not** checked, to avoid a host sync. The contract is the reference's: masks left-aligned with
``mask[:, 0]`` all True (each row's length is ``mask.sum(1)``, real tokens are the first ``length`` positions),
tags in ``[0, T)`` on real tokens (out-of-range tags are clamped, giving a wrong but memory-safe result).
Callers that want the content checks call ``tpm_fast.reference.crf.check_inputs`` first.
Inputs the kernels do not cover, any fp64 input (the kernels compute in fp32) and more than 64 tags (the register
tile's limit), run the reference under ``backend="auto"`` and raise ``ValueError`` under ``backend="triton"``.

The kernels are wrapped as torch custom ops (``tpm_fast::crf_forward``, ``tpm_fast::crf_backward``,
``tpm_fast::crf_viterbi``) with fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces
through them. Triton is imported lazily, when a kernel first runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpm_fast.ops._backend import resolve_backend
from tpm_fast.reference import crf as _ref

__all__ = ["crf_log_likelihood", "crf_log_partition", "crf_viterbi", "MAX_TRITON_TAGS"]

MAX_TRITON_TAGS = 64  # = tpm_fast.kernels.crf.MAX_TAGS (not imported here: triton stays optional)


# ---------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tpm_fast::crf_forward", mutates_args=())
def _crf_forward(
    emissions: Tensor, tags: Tensor | None, lengths: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B,) fp32 = gold - log Z, or log Z without tags; alpha (B, n, T) fp32; log_z (B,) fp32)."""
    from tpm_fast.kernels.crf import crf_forward

    return crf_forward(emissions, tags, lengths, start, end, transitions)


@_crf_forward.register_fake
def _(emissions, tags, lengths, start, end, transitions):
    b, n, t = emissions.shape
    f32 = dict(dtype=torch.float32, device=emissions.device)
    return emissions.new_empty(b, **f32), emissions.new_empty((b, n, t), **f32), emissions.new_empty(b, **f32)


@torch.library.custom_op("tpm_fast::crf_backward", mutates_args=())
def _crf_backward(
    grad: Tensor,
    tags: Tensor | None,
    lengths: Tensor,
    end: Tensor,
    transitions: Tensor,
    alpha: Tensor,
    log_z: Tensor,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_emissions (B, n, T) emissions' dtype; per-sequence grads of start, end (B, T), transitions (B, T, T))."""
    from tpm_fast.kernels.crf import crf_backward

    return crf_backward(grad, tags, lengths, end, transitions, alpha, log_z, grad_dtype)


@_crf_backward.register_fake
def _(grad, tags, lengths, end, transitions, alpha, log_z, grad_dtype):
    b, n, t = alpha.shape
    return (
        alpha.new_empty((b, n, t), dtype=grad_dtype),
        alpha.new_empty((b, t)),
        alpha.new_empty((b, t)),
        alpha.new_empty((b, t, t)),
    )


def _setup_context(ctx, inputs, output):
    emissions, tags, lengths, start, end, transitions = inputs
    _, alpha, log_z = output
    ctx.save_for_backward(tags, lengths, end, transitions, alpha, log_z)
    ctx.dtypes = (emissions.dtype, start.dtype, end.dtype, transitions.dtype)


def _backward(ctx, grad_out, _grad_alpha, _grad_log_z):
    tags, lengths, end, transitions, alpha, log_z = ctx.saved_tensors
    d_em, ds, de, dt = ctx.dtypes
    g_em, g_start, g_end, g_trans = _crf_backward(grad_out, tags, lengths, end, transitions, alpha, log_z, d_em)
    # alpha and log_z are internal outputs (saved for this backward); their incoming grads are ignored
    return g_em, None, None, g_start.sum(0).to(ds), g_end.sum(0).to(de), g_trans.sum(0).to(dt)


_crf_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("tpm_fast::crf_viterbi", mutates_args=())
def _crf_viterbi(emissions: Tensor, lengths: Tensor, start: Tensor, end: Tensor, transitions: Tensor) -> Tensor:
    """(B, n) int64 best tags, 0 on padding."""
    from tpm_fast.kernels.crf import crf_viterbi

    return crf_viterbi(emissions, lengths, start, end, transitions)


@_crf_viterbi.register_fake
def _(emissions, lengths, start, end, transitions):
    return emissions.new_empty(emissions.shape[:2], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- dispatch


def _use_triton(
    backend: str, emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, tags=None
) -> bool:
    """Resolve the backend; on the Triton path check shapes and dtypes (the reference checks its own inputs).
    Inputs the kernels do not cover (fp64, more than `MAX_TRITON_TAGS` tags) take the reference under ``"auto"``
    and raise under ``"triton"``."""
    params = (start, end, transitions)
    if resolve_backend(backend, emissions, mask, *params, *([] if tags is None else [tags])) != "triton":
        return False
    _ref.check_shapes(emissions, mask, *params, tags=tags)
    reason = None
    if emissions.shape[2] > MAX_TRITON_TAGS:
        reason = f"the Triton CRF supports at most {MAX_TRITON_TAGS} tags, got {emissions.shape[2]}"
    elif any(x.dtype == torch.float64 for x in (emissions, *params)):
        reason = "the Triton CRF computes in fp32: fp64 inputs need backend='reference' (or 'auto')"
    if reason is not None and backend == "triton":
        raise ValueError(reason)
    return reason is None


def crf_log_likelihood(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Log-likelihood log p(tags | emissions) per sequence (pytorch-crf ``reduction="none"``).

    Args:
        emissions: (B, n, T) float emission scores (fp16 / bf16 / fp32 on the Triton path; fp64 -> reference).
        tags: (B, n) long gold tags in [0, T) where ``mask`` is True (ignored elsewhere, any value).
        mask: (B, n) bool (or uint8), left-aligned, first timestep all True (not checked on the Triton path).
        start, end: (T,) float; transitions: (T, T) float with ``[i, j]`` = score of tag i -> tag j.
        backend: "auto" | "triton" | "reference" (see the module docstring).

    Returns:
        (B,) fp32 (fp64 on the reference path with fp64 inputs) gold path score minus log Z, differentiable w.r.t.
        emissions, start, end and transitions (grads in each input's dtype).
    """
    if not _use_triton(backend, emissions, mask, start, end, transitions, tags):
        return _ref.crf_log_likelihood(emissions, tags, mask, start, end, transitions)
    lengths = mask.sum(1)  # shape: (B,) int64, on device
    return _crf_forward(emissions, tags, lengths, start, end, transitions)[0]


def crf_log_partition(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, *, backend: str = "auto"
) -> Tensor:
    """Log partition function log Z per sequence (same kernels, gold score skipped).

    Args: as `crf_log_likelihood` without ``tags``.

    Returns:
        (B,) fp32 (fp64 on the reference path with fp64 inputs) log Z, differentiable w.r.t. emissions, start, end
        and transitions.
    """
    if not _use_triton(backend, emissions, mask, start, end, transitions):
        return _ref.crf_log_partition(emissions, mask, start, end, transitions)
    lengths = mask.sum(1)  # shape: (B,)
    return _crf_forward(emissions, None, lengths, start, end, transitions)[0]


def crf_viterbi(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Best tag paths, with the same fp32 arithmetic and tie-breaking (first max index) as ``torchcrf.CRF.decode``.

    Args:
        emissions: (B, n, T) float; mask: (B, n) bool, left-aligned, first timestep all True;
        start, end: (T,); transitions: (T, T). backend: as `crf_log_likelihood`.

    Returns:
        tags: (B, n) long, best path on real tokens, 0 on padding; lengths: (B,) long (``mask.sum(1)``).
        Not differentiable; no host sync and no per-sequence loop on the Triton path.
    """
    if not _use_triton(backend, emissions, mask, start, end, transitions):
        return _ref.crf_viterbi(emissions, mask, start, end, transitions)
    lengths = mask.sum(1)  # shape: (B,)
    tags = _crf_viterbi(emissions.detach(), lengths, start.detach(), end.detach(), transitions.detach())
    return tags, lengths
