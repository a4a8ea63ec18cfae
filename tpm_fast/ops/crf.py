"""Linear-chain CRF ops: one validation and backend-dispatch point per op, over the fused Triton kernels or the
PyTorch reference.

Same arguments and semantics as `tpm_fast.reference.crf` (pytorch-crf: ``transitions[i, j]`` scores tag i -> tag j,
``start`` / ``end`` (T,), emissions (B, n, T), masks (B, n) bool or uint8), plus two keywords:

- ``backend``: ``"auto"`` | ``"triton"`` | ``"native"`` | ``"reference"``, resolved once per call by
  `tpm_fast.ops.backend.resolve` (``"auto"``: Triton on CUDA when it is installed, the inputs are covered and the
  kernels passed their first-use self-check on the device; the native C++ kernels on CPU when ``tpm_fast._C`` is
  built; the reference elsewhere). Inputs the Triton kernels do not cover
  (:func:`tpm_fast.ops.backend.crf_unsupported`: any fp64 input, more than ``MAX_TAGS`` tags) run the reference
  under ``"auto"`` on CUDA and raise ``ValueError`` under ``"triton"``.
- ``validate``: the same on both backends. True: shapes and dtypes, then mask contents (first timestep on,
  left-aligned) and tags in ``[0, T)`` on real tokens, as `tpm_fast.reference.crf.check_inputs` does (one host
  sync; while ``torch.compile`` traces, the content checks are ``torch._assert_async`` device asserts instead,
  which raise ``RuntimeError``). False: nothing is checked, on either backend; inputs outside the contract give
  unspecified (on the Triton path still memory-safe) results.

Tiers, named apart as in flash-attention: the raw launchers ``tpm_fast.kernels.crf.launch_crf_*`` (no autograd, no
validation); the eager autograd node ``tpm_fast._C.crf_autograd`` (C++, csrc/triton_autograd.cpp; where ``_C`` is
not built, `CRFLogLikelihoodFunc`, a ``torch.autograd.Function`` doing the same in Python) and the torch custom ops
``tpm_fast::crf_forward`` / ``crf_backward`` / ``crf_viterbi`` (with fake implementations and autograd, used while
``torch.compile`` traces, so ``fullgraph=True`` works); and the public functions below. Triton is imported lazily,
when a kernel first runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tpm_fast.ops import backend as _backend
from tpm_fast.ops import native as _native
from tpm_fast.reference import crf as _ref

__all__ = ["CRFLogLikelihoodFunc", "crf_log_likelihood", "crf_log_partition", "crf_viterbi", "self_check"]

_KERNELS: list = []  # tpm_fast.kernels.crf, imported on first use (triton stays optional)


def _kernels() -> ModuleType:
    if not _KERNELS:
        from tpm_fast.kernels import crf

        _KERNELS.append(crf)
    return _KERNELS[0]


def _param_grads(g_par: Tensor, t: int, dtypes: list[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """Split the (2T + T*T,) fp32 parameter gradient into start (T,), end (T,), transitions (T, T) views, each cast
    to its parameter's dtype only if that is not fp32."""
    g_start, g_end, g_trans = g_par.split_with_sizes((t, t, t * t))
    g_trans = g_trans.view(t, t)
    if dtypes[0] == dtypes[1] == dtypes[2] == torch.float32:
        return g_start, g_end, g_trans
    return tuple(g if d == torch.float32 else g.to(d) for g, d in zip((g_start, g_end, g_trans), dtypes))


# ---------------------------------------------------------------------------------------------- eager tier


class CRFLogLikelihoodFunc(torch.autograd.Function):
    """Eager autograd over the fused kernels in Python (forward: 1 launch; backward: 1 launch + one ``.sum(0)``): the
    fallback of `_eager` where ``tpm_fast._C`` (whose C++ node does the same with less host time) is not built.

    ``apply(emissions, tags, mask, start, end, transitions)``: arguments as in `crf_log_likelihood` (unchecked;
    ``tags=None`` for the log partition). Returns (B,) fp32 ``gold - log Z`` (``log Z`` without tags),
    differentiable w.r.t. emissions (grad in their dtype), start, end and transitions (grads in each one's dtype).
    """

    @staticmethod
    def forward(
        ctx: Any,
        emissions: Tensor,
        tags: Tensor | None,
        mask: Tensor,
        start: Tensor,
        end: Tensor,
        transitions: Tensor,
    ) -> Tensor:
        out, alpha = _kernels().launch_crf_forward(emissions, tags, mask, start, end, transitions)
        ctx.save_for_backward(tags, mask, end, transitions, alpha)
        ctx.dtypes = (emissions.dtype, start.dtype, end.dtype, transitions.dtype)
        return out  # shape: (B,) fp32

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        tags, mask, end, transitions, alpha = ctx.saved_tensors
        d_em, *d_par = ctx.dtypes
        g_em, g_par = _kernels().launch_crf_backward(grad, tags, mask, end, transitions, alpha, d_em)
        needs = ctx.needs_input_grad
        if not (needs[3] or needs[4] or needs[5]):
            return g_em, None, None, None, None, None
        return (g_em, None, None, *_param_grads(g_par.sum(0), alpha.shape[2], d_par))


_REDUCE = {"none": 0, "sum": 1, "mean": 2}


def _reduce(out: Tensor, reduction: str) -> Tensor:
    return out if reduction == "none" else out.sum() if reduction == "sum" else out.mean()


def _eager(
    emissions: Tensor,
    tags: Tensor | None,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    reduction: str,
) -> Tensor:
    """The eager autograd path: the C++ node of ``tpm_fast._C`` (csrc/triton_autograd.cpp) when built, which also
    reduces over the batch (no reduction node of its own in the graph), else `CRFLogLikelihoodFunc`; both launch the
    same kernels with the same arithmetic."""
    native = _native.extension()
    if native is None:
        return _reduce(CRFLogLikelihoodFunc.apply(emissions, tags, mask.bool(), start, end, transitions), reduction)
    launch = _kernels().launch_spec(emissions.shape[2], tags is not None, emissions.shape[0])
    return native.crf_autograd(emissions, tags, mask, start, end, transitions, launch, _REDUCE[reduction])


# ---------------------------------------------------------------------------------------------- torch.compile tier


@torch.library.custom_op("tpm_fast::crf_forward", mutates_args=())
def _crf_forward(
    emissions: Tensor, tags: Tensor | None, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor]:
    """(out (B,) fp32 = gold - log Z, or log Z without tags; alpha (B, n, T) fp32)."""
    return _kernels().launch_crf_forward(emissions, tags, mask, start, end, transitions)


@_crf_forward.register_fake
def _(emissions, tags, mask, start, end, transitions):
    b, n, t = emissions.shape
    return emissions.new_empty(b, dtype=torch.float32), emissions.new_empty((b, n, t), dtype=torch.float32)


@torch.library.custom_op("tpm_fast::crf_backward", mutates_args=())
def _crf_backward(
    grad: Tensor,
    tags: Tensor | None,
    mask: Tensor,
    end: Tensor,
    transitions: Tensor,
    alpha: Tensor,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(grad_emissions (B, n, T) in ``grad_dtype``; per-sequence parameter partials (B, 2T + T*T) fp32)."""
    return _kernels().launch_crf_backward(grad, tags, mask, end, transitions, alpha, grad_dtype)


@_crf_backward.register_fake
def _(grad, tags, mask, end, transitions, alpha, grad_dtype):
    b, n, t = alpha.shape
    return alpha.new_empty((b, n, t), dtype=grad_dtype), alpha.new_empty((b, 2 * t + t * t))


def autograd_formulas(bwd_op):
    """(setup_context, backward) for ``torch.library.register_autograd`` of a forward op returning (out, alpha)
    whose backward op is ``bwd_op`` (same arguments as ``tpm_fast::crf_backward``): the Triton custom op here, the
    native one in :mod:`tpm_fast.ops.native`."""

    def setup_context(ctx, inputs, output):
        emissions, tags, mask, start, end, transitions = inputs
        ctx.save_for_backward(tags, mask, end, transitions, output[1])
        ctx.dtypes = (emissions.dtype, start.dtype, end.dtype, transitions.dtype)

    def backward(ctx, grad_out, _grad_alpha):
        tags, mask, end, transitions, alpha = ctx.saved_tensors
        d_em, *d_par = ctx.dtypes
        g_em, g_par = bwd_op(grad_out, tags, mask, end, transitions, alpha, d_em)
        # alpha is an internal output (saved for this backward); its incoming grad is ignored
        return (g_em, None, None, *_param_grads(g_par.sum(0), alpha.shape[2], d_par))

    return setup_context, backward


_setup, _backward = autograd_formulas(_crf_backward)
_crf_forward.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("tpm_fast::crf_viterbi", mutates_args=())
def _crf_viterbi(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor]:
    """((B, n) int64 best tags, 0 on padding; (B,) int64 lengths)."""
    return _kernels().launch_crf_viterbi(emissions, mask, start, end, transitions)


@_crf_viterbi.register_fake
def _(emissions, mask, start, end, transitions):
    return emissions.new_empty(emissions.shape[:2], dtype=torch.long), emissions.new_empty(
        emissions.shape[:1], dtype=torch.long
    )


# ---------------------------------------------------------------------------------------------- dispatch


def _validate(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, tags: Tensor | None = None
) -> Tensor:
    """`tpm_fast.reference.crf.check_inputs` (shapes, dtypes, then contents with one host sync); while
    ``torch.compile`` traces, the content checks become device asserts (a graph cannot hold a host sync)."""
    if not torch.compiler.is_compiling():
        return _ref.check_inputs(emissions, mask, start, end, transitions, tags)
    _ref.check_shapes(emissions, mask, start, end, transitions, tags)
    mask = mask.bool()
    torch._assert_async(mask[:, 0].all(), "mask of the first timestep must all be on")
    torch._assert_async((~(mask[:, 1:] & ~mask[:, :-1])).all(), "mask must be left-aligned (each row: True then False)")
    if tags is not None:
        in_range = ((tags >= 0) & (tags < emissions.shape[2]) | ~mask).all()
        torch._assert_async(in_range, f"tags under the mask must lie in [0, {emissions.shape[2]})")
    return mask


def _resolve(backend: str, emissions: Tensor, start: Tensor, end: Tensor, transitions: Tensor) -> str:
    """``"triton"`` or ``"reference"`` for these inputs (their promoted float dtype decides what is covered)."""
    dtype = emissions.dtype
    if start.dtype != dtype or end.dtype != dtype or transitions.dtype != dtype:
        dtype = torch.promote_types(torch.promote_types(dtype, start.dtype), end.dtype)
        dtype = torch.promote_types(dtype, transitions.dtype)
    unsupported = _backend.crf_unsupported(dtype, emissions.shape[2])
    return _backend.resolve(backend, "crf", emissions.device, dtype, unsupported)


def crf_log_likelihood(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    reduction: str = "none",
) -> Tensor:
    """Log-likelihood log p(tags | emissions) per sequence, or its sum or mean over the batch.

    Args:
        emissions: (B, n, T) float emission scores (fp16 / bf16 / fp32 on the Triton path; fp64 -> reference).
        tags: (B, n) long gold tags in [0, T) where ``mask`` is True (ignored elsewhere, any value).
        mask: (B, n) bool (or uint8), left-aligned, first timestep all True.
        start, end: (T,) float; transitions: (T, T) float with ``[i, j]`` = score of tag i -> tag j.
        backend: "auto" | "triton" | "native" | "reference" (see the module docstring).
        validate: check shapes, dtypes, mask and tag contents (one host sync) first; False checks nothing.
        reduction: ``"none"`` (pytorch-crf's name for per-sequence values), ``"sum"`` or ``"mean"`` over the batch
            (on the eager Triton path reduced inside its autograd node: one graph node fewer).

    Returns:
        (B,) fp32 (fp64 on the reference path with fp64 inputs) gold path score minus log Z, or its () sum or mean,
        differentiable w.r.t. emissions, start, end and transitions (grads in each input's dtype).

    Raises:
        ValueError: bad inputs (``validate``), unknown backend or reduction, or ``"triton"`` where it cannot run.
    """
    return _forward(emissions, tags, mask, start, end, transitions, backend, validate, reduction)


def crf_log_partition(
    emissions: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    reduction: str = "none",
) -> Tensor:
    """Log partition function log Z per sequence, or its sum or mean (same kernels, gold score skipped).

    Args: as `crf_log_likelihood` without ``tags``.

    Returns:
        (B,) fp32 (fp64 on the reference path with fp64 inputs) log Z, or its () sum or mean, differentiable w.r.t.
        emissions, start, end and transitions.
    """
    return _forward(emissions, None, mask, start, end, transitions, backend, validate, reduction)


def _forward(emissions, tags, mask, start, end, transitions, backend: str, validate: bool, reduction: str) -> Tensor:
    """`crf_log_likelihood` (``tags`` given) or `crf_log_partition` (``tags=None``): validate, resolve, dispatch."""
    if reduction not in _REDUCE:
        raise ValueError(f"invalid reduction: {reduction!r}, expected one of {tuple(_REDUCE)}")
    if validate:
        mask = _validate(emissions, mask, start, end, transitions, tags)
    chosen = _resolve(backend, emissions, start, end, transitions)
    if chosen == "reference":
        if tags is None:
            out = _ref.crf_log_partition(emissions, mask, start, end, transitions, validate=False)
        else:
            out = _ref.crf_log_likelihood(emissions, tags, mask, start, end, transitions, validate=False)
    elif chosen == "native":  # C++ CPU kernels; autograd and fakes registered in tpm_fast.ops.native
        out = _native.load().crf_forward(emissions, tags, mask.bool(), start, end, transitions)[0]
    elif torch.compiler.is_compiling():
        out = _crf_forward(emissions, tags, mask, start, end, transitions)[0]
    else:
        return _eager(emissions, tags, mask, start, end, transitions, reduction)
    return _reduce(out, reduction)


def crf_viterbi(
    emissions: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Best tag paths, with the same fp32 arithmetic and tie-breaking (first max index) as ``torchcrf.CRF.decode``.

    Args:
        emissions: (B, n, T) float; mask: (B, n) bool (or uint8), left-aligned, first timestep all True;
        start, end: (T,); transitions: (T, T). backend, validate: as `crf_log_likelihood`.

    Returns:
        tags: (B, n) long, best path on real tokens, 0 on padding; lengths: (B,) long (``mask.sum(1)``).
        Not differentiable; one launch, no host sync and no per-sequence loop on the Triton path. NaN scores give
        tags in [0, T) on both backends (which path is unspecified).
    """
    if validate:
        mask = _validate(emissions, mask, start, end, transitions)
    chosen = _resolve(backend, emissions, start, end, transitions)
    if chosen == "reference":
        return _ref.crf_viterbi(emissions, mask, start, end, transitions, validate=False)
    if chosen == "native":
        params = (start.detach(), end.detach(), transitions.detach())
        return _native.load().crf_viterbi(emissions.detach(), mask.bool(), *params)
    if torch.compiler.is_compiling():
        return _crf_viterbi(emissions.detach(), mask, start.detach(), end.detach(), transitions.detach())
    return _kernels().launch_crf_viterbi(emissions, mask, start, end, transitions)


# ---------------------------------------------------------------------------------------------- self-check


def self_check(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """First-use check of the Triton CRF on ``device`` (registered with `tpm_fast.ops.backend`): a tiny case
    (B=3, n=7, T=5, lengths 7 / 4 / 1) with emissions and parameters in ``dtype``, run with ``backend="triton",
    validate=False`` against the reference on the same values: the log-likelihood and its gradients w.r.t.
    emissions / start / end / transitions (reference in fp64, so no TF32 matmul setting matters), and the Viterbi
    tags and lengths (reference from the same inputs in fp32: the same sums, so exactly equal).

    Returns:
        None when the log-likelihood is within 1e-4 and each gradient within max(1e-4, eps of its dtype) (max abs
        error / max(max |reference|, 1)) and tags and lengths are equal, else a short description of the first
        mismatch.
    """
    g = torch.Generator().manual_seed(0)
    b, n, t = 3, 7, 5
    em = torch.randn(b, n, t, generator=g) * 2  # shape: (B, n, T)
    params = [torch.randn(*s, generator=g) * 0.5 for s in ((t,), (t,), (t, t))]
    mask = torch.arange(n) < torch.tensor([n, 4, 1]).unsqueeze(1)  # shape: (B, n)
    tags = torch.randint(0, t, (b, n), generator=g).masked_fill(~mask, -100)  # shape: (B, n)
    w = torch.randn(b, generator=g).to(device)  # shape: (B,) grad_outputs
    em, *params = (x.to(device, dtype) for x in (em, *params))
    mask, tags = mask.to(device), tags.to(device)
    results = []
    with torch.inference_mode(False), torch.enable_grad():  # a first call may come from inside no_grad()
        for impl, cast in (("triton", dtype), ("reference", torch.float64)):
            leaves = [x.to(cast).requires_grad_(True) for x in (em, *params)]
            llh = crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend=impl, validate=False)
            results.append((llh, *torch.autograd.grad(llh, leaves, w.to(llh.dtype))))
    names = ("log-likelihood", "grad of emissions", "grad of start", "grad of end", "grad of transitions")
    for name, ours, ref in zip(names, *results):
        tol = max(1e-4, torch.finfo(ours.dtype).eps)  # a gradient in a 16-bit dtype is rounded to it
        err = ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
        if not err <= tol:  # NaN fails too
            return f"{name} off by {err:.2e} (relative, tolerance {tol:.0e})"
    ours = crf_viterbi(em, mask, *params, backend="triton", validate=False)
    ref = _ref.crf_viterbi(em, mask, *params, validate=False)
    for name, a, r in zip(("Viterbi tags", "Viterbi lengths"), ours, ref):
        if not torch.equal(a, r):
            return f"{name} differ: {a.tolist()} vs the reference's {r.tolist()}"
    return None


_backend.register_self_check("crf", self_check)
