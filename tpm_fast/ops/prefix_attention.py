"""Prefix-K/V attention: validation + backend dispatch, and the autograd tiers of the Triton kernel.

Tiers, named apart as in flash-attention (``_flash_attn_forward`` / ``FlashAttnFunc`` / ``flash_attn_func``):

- raw launchers ``tpm_fast.kernels.prefix_attention.launch_prefix_attention_fwd`` / ``..._bwd`` (no autograd, no
  checks) and their allocation-free forms ``launch_fwd_into`` / ``launch_bwd_into``;
- the eager autograd node: ``tpm_fast._C.prefix_attention_autograd`` (C++, csrc/triton_autograd.cpp: allocations,
  saved tensors and the graph in C++, one Python launcher call per direction), or :class:`PrefixAttentionFunc`, the
  same in Python, where ``tpm_fast._C`` is not built;
- custom ops ``tpm_fast::prefix_attention_fwd`` / ``tpm_fast::prefix_attention_bwd`` with fake implementations and
  autograd, taken while ``torch.compile`` traces (``fullgraph=True`` works, dropout included);
- :func:`prefix_attention`, the public function: the one place inputs are validated and the backend resolved;
- the pure-PyTorch reference, :func:`tpm_fast.reference.prefix_attention.prefix_attention`.

Dropout on the Triton path: the Philox seed is a (1,) int64 tensor drawn on the inputs' device with ``torch.randint``
from ``generator`` (default: that device's default generator): no host sync, reproducible under
``torch.manual_seed``. Triton and the kernels are imported only when they launch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tpm_fast.ops import backend as _backend
from tpm_fast.ops import native as _native
from tpm_fast.reference.prefix_attention import check_inputs
from tpm_fast.reference.prefix_attention import prefix_attention as reference_prefix_attention

__all__ = ["PrefixAttentionFunc", "draw_dropout_seed", "key_bounds", "prefix_attention", "self_check"]


def draw_dropout_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """The Philox seed of one dropout call: (1,) int64 on ``device``, one ``torch.randint`` draw from ``generator``
    (default: ``device``'s default generator); no host sync."""
    if generator is None or generator.device == device:
        return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device)
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).to(device)


def key_bounds(key_padding_mask: Tensor) -> Tensor:
    """(B,) int32: 1 + the index of each row's last visible key (0 when none), the bound of the kernels' key loop.

    Compute it once per forward and pass it as ``lengths`` with the mask to every layer (3 small ops, no sync).
    """
    n = key_padding_mask.shape[1]
    cols = torch.arange(1, n + 1, device=key_padding_mask.device, dtype=torch.int32)  # shape: (n,)
    return (key_padding_mask * cols).amax(1) if n else cols.new_zeros(key_padding_mask.shape[0])


_KERNELS: list = []  # the launcher module, imported on first launch (Triton stays optional)


def _kernels():
    if not _KERNELS:
        from tpm_fast.kernels import prefix_attention

        _KERNELS.append(prefix_attention)
    return _KERNELS[0]


# ------------------------------------------------------------------------------------------------ eager autograd


class PrefixAttentionFunc(torch.autograd.Function):
    """Eager autograd over the raw launchers in Python: the fallback of :func:`_eager` where ``tpm_fast._C`` (whose
    C++ node does the same with less host time) is not built. Inputs in the launch layout; ``plan`` from
    ``plan_launches``, shared with the backward."""

    @staticmethod
    def forward(ctx, q, k, v, k_p, v_p, plan):
        out, lse = _kernels().launch_fwd(plan, q, k, v, k_p, v_p)
        ctx.save_for_backward(q, k, v, k_p, v_p, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_p, v_p, out, lse = ctx.saved_tensors
        return (*_kernels().launch_bwd(ctx.plan, grad_out, q, k, v, k_p, v_p, out, lse), None)


def _eager(kernels, q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor, plan) -> Tensor:
    """The eager autograd path: the C++ node of ``tpm_fast._C`` (csrc/triton_autograd.cpp) when built, else
    :class:`PrefixAttentionFunc`; both launch through ``kernels.launch_fwd_into`` / ``launch_bwd_into``."""
    native = _native.extension()
    if native is None:
        return PrefixAttentionFunc.apply(q, k, v, k_p, v_p, plan)
    return native.prefix_attention_autograd(q, k, v, k_p, v_p, plan, kernels.launch_fwd_into, kernels.launch_bwd_into)


# ------------------------------------------------------------------------------------- custom ops (torch.compile)


@torch.library.custom_op("tpm_fast::prefix_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, n, d) like q, lse (B, H, n) fp32); see ``launch_prefix_attention_fwd``."""
    return _kernels().launch_prefix_attention_fwd(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale)


@_fwd_op.register_fake
def _(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tpm_fast::prefix_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk_p, dv_p) like (q, k, v, k_p, v_p); see ``launch_prefix_attention_bwd``."""
    return _kernels().launch_prefix_attention_bwd(
        grad_out, q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed, dropout_p, scale
    )


@_bwd_op.register_fake
def _(grad_out, q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed, dropout_p, scale):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_p, v_p))


def autograd_formulas(bwd_op):
    """(setup_context, backward) for ``torch.library.register_autograd`` of a forward op returning (out, lse) whose
    backward op is ``bwd_op`` (same arguments as ``tpm_fast::prefix_attention_bwd``): the Triton custom op here, the
    native one in :mod:`tpm_fast.ops.native`."""

    def setup_context(ctx, inputs, output):
        q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale = inputs
        ctx.save_for_backward(q, k, v, k_p, v_p, *output, key_padding_mask, lengths, seed)
        ctx.dropout_p, ctx.scale = dropout_p, scale
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed = ctx.saved_tensors
        grads = bwd_op(grad_out, q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed, ctx.dropout_p, ctx.scale)
        return (*grads, None, None, None, None, None)

    return setup_context, backward


_setup, _backward = autograd_formulas(_bwd_op)
_fwd_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------------ public API


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    key_padding_mask: Tensor | None = None,
    lengths: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Attention of n queries over m prefix slots plus n_k tokens (one softmax over the joined columns).

    Args:
        q: (B, H, n, d) queries; k, v: (B, H, n_k, d) token keys / values; k_p, v_p: (B, H, m, d) prefix keys /
            values, m >= 0, always visible. Any strides (e.g. heads split from a projection, slices of a joined HF
            key tensor): copied only when the kernel cannot read them in place.
        key_padding_mask: (B, n_k) bool, True = visible (any pattern); ``lengths``: (B,) int, tokens [0, len)
            visible. Both: ANDed (pass :func:`key_bounds` of the mask, computed once per forward, so the kernel
            skips key blocks past the last visible token). Neither: every token visible.
        dropout_p: attention-probability dropout in [0, 1), inverted scaling. Triton: Philox keep-mask from a seed
            drawn with :func:`draw_dropout_seed`; reference: ``bernoulli_`` on ``generator``.
        scale: score scale, default 1 / sqrt(d).
        backend: ``"auto"``, ``"triton"``, ``"native"`` or ``"reference"`` (see :mod:`tpm_fast.ops.backend`).
        validate: check shapes, dtypes, devices and dropout_p (no host sync) and resolve ``backend``; False trusts
            the caller (who validated once and passes a resolved backend, as ``prompted_bert`` does per layer).

    Returns:
        (B, H, n, d) in q's dtype (the widest input dtype if they differ); 0 for a query with no visible key
        (m = 0 and all tokens padded), never NaN.

    Raises:
        ValueError: bad shapes / devices / mask / lengths / dropout_p, unknown backend, or ``backend="triton"``
            where it cannot run (no Triton, CPU without TRITON_INTERPRET=1, fp64, head dim not a power of 2).
    """
    dtype = q.dtype
    mixed = not (k.dtype == dtype and v.dtype == dtype and k_p.dtype == dtype and v_p.dtype == dtype)
    if mixed:
        dtype = _widest(q, k, v, k_p, v_p)
    if validate or backend == "auto":
        if validate:
            check_inputs(q, k, v, k_p, v_p, key_padding_mask, lengths, dropout_p)
        unsupported = _backend.attention_unsupported(dtype, q.shape[3])
        backend = _backend.resolve(backend, "prefix_attention", q.device, dtype, unsupported)
    if backend == "reference":
        return reference_prefix_attention(
            q, k, v, k_p, v_p, key_padding_mask, lengths, dropout_p, scale, generator, validate=False
        )
    if mixed:
        q, k, v, k_p, v_p = (t.to(dtype) for t in (q, k, v, k_p, v_p))
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = draw_dropout_seed(q.device, generator) if dropout_p > 0.0 else None
    if backend == "native":  # C++ CPU kernel (any strides); autograd and fakes registered in tpm_fast.ops.native
        return _native.load().prefix_attention_fwd(
            q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale
        )[0]
    kernels = _kernels()
    q, k, v, k_p, v_p = kernels.canonical_inputs(q, k, v, k_p, v_p)
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale)[0]
    plan = kernels.plan_launches(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale)
    return _eager(kernels, q, k, v, k_p, v_p, plan)


def _widest(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ------------------------------------------------------------------------------------------------ first-use check


def self_check(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Run a tiny case (B=2, H=2, n=37, m=3, d=64, a padding mask and its bounds, no dropout) in ``dtype`` with the
    Triton backend against the reference on ``device``, forward and backward.

    Returns:
        None when the output and every gradient are within tolerance, else a description of the first mismatch.
    """
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 37, 64)] * 3 + [(2, 2, 3, 64)] * 2
    inputs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    mask = (torch.arange(37) < torch.tensor([[37], [20]])).to(device)  # shape: (2, 37)
    grad = torch.randn(2, 2, 37, 64, generator=g).to(device, dtype)
    results = []
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inside no_grad()
        for name in ("triton", "reference"):
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            out = prefix_attention(*leaves, key_padding_mask=mask, lengths=key_bounds(mask), backend=name)
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for what, got, want in zip(("out", "dq", "dk", "dv", "dk_p", "dv_p"), *results):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1.0)).item()
        if not err <= tol:  # NaN fails too
            return f"{what} differs from the reference by {err:.2e} (relative, tolerance {tol:.0e})"
    return None


_backend.register_self_check("prefix_attention", self_check)
