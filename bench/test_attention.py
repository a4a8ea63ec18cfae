"""Prefix-K/V attention: HF eager (the authors' recipe), SDPA with a bool mask, varlen flash attention (if
installed), tpm_fast's reference and our Triton kernel (CUDA only: the interpreter's times mean nothing).

All take q, k, v (B, H, n, d), prefix k_p, v_p (B, H, m, d) and per-post lengths; eager, SDPA and flash concatenate
the prefix into K/V as HF BertModel with a prefix cache does.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from tpm_fast.ops.backend import native_unavailable_reason
from tpm_fast.ops.prefix_attention import prefix_attention

H, D, M = 12, 64, 4
SHAPES = [(8, 64), (8, 128), (32, 64), pytest.param(32, 128, marks=pytest.mark.big)]


def hf_eager(q, k, v, k_p, v_p, lengths):
    b, n = q.shape[0], k.shape[2]
    keys, values = torch.cat([k_p, k], 2), torch.cat([v_p, v], 2)  # shape: (B, H, m+n, d)
    visible = torch.cat([torch.ones(b, k_p.shape[2], dtype=torch.bool, device=q.device), _mask(lengths, n)], 1)
    additive = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    additive = additive.masked_fill(~visible, torch.finfo(q.dtype).min)[:, None, None]  # shape: (B, 1, 1, m+n)
    scores = q @ keys.transpose(2, 3) / math.sqrt(q.shape[-1]) + additive  # shape: (B, H, n, m+n)
    return torch.softmax(scores, -1) @ values


def sdpa_mask(q, k, v, k_p, v_p, lengths):
    b, n = q.shape[0], k.shape[2]
    keys, values = torch.cat([k_p, k], 2), torch.cat([v_p, v], 2)  # shape: (B, H, m+n, d)
    visible = torch.cat([torch.ones(b, k_p.shape[2], dtype=torch.bool, device=q.device), _mask(lengths, n)], 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None])


def _sdpa_backend(name):
    """sdpa_mask forced onto one SDPA backend (CUDA): the best of them is the bar the fused kernel must clear."""

    def run(q, k, v, k_p, v_p, lengths):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, name)):
            return sdpa_mask(q, k, v, k_p, v_p, lengths)

    return run


def flash_varlen(q, k, v, k_p, v_p, lengths):
    """flash_attn_varlen_func on the real tokens only (queries unpadded, keys = prefix + real tokens), packing
    included in the time."""
    from flash_attn import flash_attn_varlen_func

    b, _, n, _ = q.shape
    m = k_p.shape[2]
    visible = _mask(lengths, n)  # shape: (B, n)
    kv_visible = torch.cat([torch.ones(b, m, dtype=torch.bool, device=q.device), visible], 1)  # shape: (B, m+n)
    q_packed = q.transpose(1, 2)[visible]  # shape: (tokens, H, d)
    k_packed = torch.cat([k_p, k], 2).transpose(1, 2)[kv_visible]  # shape: (m*B + tokens, H, d)
    v_packed = torch.cat([v_p, v], 2).transpose(1, 2)[kv_visible]
    cu_q = F.pad(lengths.cumsum(0), (1, 0)).int()
    cu_k = F.pad((lengths + m).cumsum(0), (1, 0)).int()
    return flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, n, n + m)


def reference(q, k, v, k_p, v_p, lengths):
    return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, backend="reference")


def triton(q, k, v, k_p, v_p, lengths):
    return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, backend="triton")


def native(q, k, v, k_p, v_p, lengths):
    return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, backend="native")


def _mask(lengths, n):
    return torch.arange(n, device=lengths.device) < lengths.unsqueeze(1)  # shape: (B, n)


PROVIDERS = {
    "hf_eager": hf_eager,
    "sdpa_mask": sdpa_mask,
    "sdpa_efficient": _sdpa_backend("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa_backend("CUDNN_ATTENTION"),
    "flash_varlen": flash_varlen,
    "reference": reference,
    "triton": triton,
    "native": native,
}
CUDA_ONLY = {"flash_varlen", "triton", "sdpa_efficient", "sdpa_cudnn"}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("b,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_attention(bench, bench_device, dtype, b, n, mode, provider):
    if bench_device.type != "cuda" and (dtype != torch.float32 and provider != "native" or provider in CUDA_ONLY):
        pytest.skip("bf16 attention and the GPU kernels are only benchmarked on CUDA")
    if provider == "flash_varlen" and (importlib.util.find_spec("flash_attn") is None or dtype == torch.float32):
        pytest.skip("flash_attn is not installed" if dtype != torch.float32 else "flash_attn has no fp32 kernels")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, H, n, D, generator=g).to(bench_device, dtype).requires_grad_(True) for _ in range(3))
    k_p, v_p = (torch.randn(b, H, M, D, generator=g).to(bench_device, dtype).requires_grad_(True) for _ in range(2))
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g).to(bench_device)
    fn = PROVIDERS[provider]
    if provider == "native" and (bench_device.type != "cpu" or native_unavailable_reason() is not None):
        pytest.skip(f"native: {native_unavailable_reason() or 'CPU tensors only'}")
    if provider.startswith("sdpa_"):
        try:
            fn(q, k, v, k_p, v_p, lengths)
        except RuntimeError as err:  # this SDPA backend does not take these inputs on this GPU
            pytest.skip(f"{provider}: {err}"[:200])

    def forward():
        with torch.no_grad():
            return fn(q, k, v, k_p, v_p, lengths)

    def forward_backward():
        out = fn(q, k, v, k_p, v_p, lengths)
        grads = torch.autograd.grad(out.sum(), (q, k, v, k_p, v_p))
        return grads

    shape = {"B": b, "H": H, "n": n, "m": M, "d": D}
    group = f"attention-{mode}-{str(dtype).removeprefix('torch.')}-B{b}-n{n}"
    run = forward if mode == "forward" else forward_backward
    bench(run, group=group, provider=provider, dtype=dtype, shape=shape)
