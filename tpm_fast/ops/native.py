"""The native extension ``tpm_fast._C`` (C++ CPU kernels from ``csrc/``): loading, fake implementations, autograd.

Importing ``tpm_fast._C`` registers ``torch.ops.tpm_fast_native.*`` (see ``csrc/bindings.cpp``); :func:`load` does
that once, then adds what ``torch.compile`` and autograd need: fake (meta) implementations and autograd formulas,
so each op is called directly (``torch.ops.tpm_fast_native.prefix_attention_fwd(...)``) in eager and compiled code.
Nothing is loaded at import time.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["load", "unavailable_reason"]

_STATE: dict = {}  # "ops": the op namespace once loaded; "reason": why it could not be


def unavailable_reason() -> str | None:
    """None when the native extension is loaded (loading it on first call), else why it is not available."""
    load()
    return _STATE.get("reason")


def load():
    """``torch.ops.tpm_fast_native`` with fakes and autograd registered, or None when the extension is missing."""
    if "ops" not in _STATE and "reason" not in _STATE:
        try:
            importlib.import_module("tpm_fast._C")
        except ImportError as err:  # not built (no compiler, skipped) or built against another torch
            _STATE["reason"] = f"tpm_fast._C is not available ({err}); reinstall with a C++ compiler to build it"
            return None
        _register()
        _STATE["ops"] = torch.ops.tpm_fast_native
    return _STATE.get("ops")


def _register() -> None:
    lib = "tpm_fast_native::"

    @torch.library.register_fake(lib + "prefix_attention_fwd")
    def _(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake(lib + "prefix_attention_bwd")
    def _(grad_out, q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed, dropout_p, scale):
        return tuple(torch.empty_like(t) for t in (q, k, v, k_p, v_p))

    @torch.library.register_fake(lib + "crf_forward")
    def _(emissions, tags, mask, start, end, transitions):
        b, n, t = emissions.shape
        return emissions.new_empty(b, dtype=torch.float32), emissions.new_empty((b, n, t), dtype=torch.float32)

    @torch.library.register_fake(lib + "crf_backward")
    def _(grad, tags, mask, end, transitions, alpha, grad_dtype):
        b, n, t = alpha.shape
        return alpha.new_empty((b, n, t), dtype=grad_dtype), alpha.new_empty((b, 2 * t + t * t))

    @torch.library.register_fake(lib + "crf_viterbi")
    def _(emissions, mask, start, end, transitions):
        b, n = emissions.shape[:2]
        return emissions.new_empty((b, n), dtype=torch.long), emissions.new_empty(b, dtype=torch.long)

    def attention_setup(ctx, inputs, output):
        q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p, scale = inputs
        ctx.save_for_backward(q, k, v, k_p, v_p, *output, key_padding_mask, lengths, seed)
        ctx.dropout_p, ctx.scale = dropout_p, scale
        ctx.mark_non_differentiable(output[1])

    def attention_backward(ctx, grad_out, _grad_lse):
        q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed = ctx.saved_tensors
        grads = torch.ops.tpm_fast_native.prefix_attention_bwd(
            grad_out, q, k, v, k_p, v_p, out, lse, key_padding_mask, lengths, seed, ctx.dropout_p, ctx.scale
        )
        return (*grads, None, None, None, None, None)

    torch.library.register_autograd(lib + "prefix_attention_fwd", attention_backward, setup_context=attention_setup)

    def crf_setup(ctx, inputs, output):
        emissions, tags, mask, start, end, transitions = inputs
        ctx.save_for_backward(tags, mask, end, transitions, output[1])
        ctx.dtypes = (emissions.dtype, start.dtype, end.dtype, transitions.dtype)
        ctx.mark_non_differentiable(output[1])

    def crf_backward(ctx, grad_out, _grad_alpha):
        tags, mask, end, transitions, alpha = ctx.saved_tensors
        d_em, *d_par = ctx.dtypes
        g_em, g_par = torch.ops.tpm_fast_native.crf_backward(grad_out, tags, mask, end, transitions, alpha, d_em)
        t = alpha.shape[2]
        g_start, g_end, g_trans = g_par.sum(0).split_with_sizes((t, t, t * t))  # one reduction over the batch
        grads = (g_start, g_end, g_trans.view(t, t))
        return (g_em, None, None, *(g.to(d) if g.dtype != d else g for g, d in zip(grads, d_par)))

    torch.library.register_autograd(lib + "crf_forward", crf_backward, setup_context=crf_setup)
