"""The native extension ``tpm_fast._C`` (C++ CPU kernels from ``csrc/``): loading, fake implementations, autograd.

Importing ``tpm_fast._C`` registers ``torch.ops.tpm_fast_native.*`` (see ``csrc/bindings.cpp``); :func:`load` does
that once, then adds what ``torch.compile`` and autograd need: fake (meta) implementations and autograd formulas,
so each op is called directly (``torch.ops.tpm_fast_native.prefix_attention_fwd(...)``) in eager and compiled code.
Nothing is loaded at import time.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["extension", "has_cuda", "load", "unavailable_reason"]

_STATE: dict = {}  # "ops": the op namespace once loaded; "reason": why it could not be


def unavailable_reason() -> str | None:
    """None when the native extension is loaded (loading it on first call), else why it is not available."""
    load()
    return _STATE.get("reason")


def has_cuda() -> bool:
    """True when ``tpm_fast._C`` is loaded and was built with the CUDA CRF kernels (``csrc/crf_cuda_*.cu``)."""
    if load() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("tpm_fast_native::crf_forward", "CUDA")


def extension():
    """The ``tpm_fast._C`` module itself (its C++ autograd nodes of the Triton path), or None when not built."""
    if "module" not in _STATE and "reason" not in _STATE:
        load()
    return _STATE.get("module")


def load():
    """``torch.ops.tpm_fast_native`` with fakes and autograd registered, or None when the extension is missing."""
    if "ops" not in _STATE and "reason" not in _STATE:
        try:
            module = importlib.import_module("tpm_fast._C")
        except ImportError as err:  # not built (no compiler, skipped) or built against another torch
            _STATE["reason"] = f"tpm_fast._C is not available ({err}); reinstall with a C++ compiler to build it"
            return None
        _register()
        _STATE["ops"], _STATE["module"] = torch.ops.tpm_fast_native, module
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

    @torch.library.register_fake(lib + "dropout")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def dropout_setup(ctx, inputs, output):
        ctx.p = inputs[1]
        ctx.save_for_backward(inputs[2])

    def dropout_backward(ctx, grad):  # the same mask and scale, regenerated from the seed
        return torch.ops.tpm_fast_native.dropout(grad, ctx.p, ctx.saved_tensors[0]), None, None

    torch.library.register_autograd(lib + "dropout", dropout_backward, setup_context=dropout_setup)

    from tpm_fast.ops import crf, prefix_attention  # the ops' own formulas, over the native backward ops

    ops = torch.ops.tpm_fast_native
    setup, backward = prefix_attention.autograd_formulas(ops.prefix_attention_bwd)
    torch.library.register_autograd(lib + "prefix_attention_fwd", backward, setup_context=setup)
    setup, backward = crf.autograd_formulas(ops.crf_backward)
    torch.library.register_autograd(lib + "crf_forward", backward, setup_context=setup)
