"""Host overhead of the fused ops: the GPU-independent part of their cost, measured on CPU.

Provider ``triton_host`` runs a fused op's whole host path (validation, backend dispatch, autograd, allocations,
launch metadata) on CPU tensors with every Triton launch replaced by a no-op (launches counted on one call, then
timed with `tpm_fast.profiling.stub_triton_launches`, whose no-op does no counting), so the time is what the op
costs the host per call whatever the GPU does. At TPM-MI's sizes a layer's attention is a few microseconds of GPU
work, so this host time bounds the fused path's speed on a GPU. Beside it, on the same tiny tensors: HF eager
attention and SDPA (their full CPU cost, which on tiny tensors is mostly host overhead too), pytorch-crf (at B=32,
n=64, 10 tags), and ``function_floor``: a ``torch.autograd.Function`` that only allocates the fused op's outputs and
gradients (for the CRF: inside an ``nn.Module`` call, taking the batch mean inside the Function as the op's node
does, the loss's negation outside), the least any op written as a Python autograd.Function can cost.

Targets (this CPU, ratios in one run): attention fwd+bwd <= 0.5x SDPA and <= 0.35x HF eager; CRF fwd+bwd <=
0.01x pytorch-crf; Viterbi <= 0.02x pytorch-crf's decode.
"""

from __future__ import annotations

import pytest
import torch
import torchcrf

from bench.test_attention import hf_eager, sdpa_mask
from tpm_fast.layers.crf import CRF
from tpm_fast.ops import backend
from tpm_fast.ops.prefix_attention import prefix_attention
from tpm_fast.profiling import count_triton_launches, stub_triton_launches

B, H, N, M, D = 2, 2, 16, 4, 16  # tiny: the kernels' own work is negligible, the host path is what is timed
CRF_B, CRF_N, TAGS = 32, 64, 10


@pytest.fixture
def host_bench(bench, monkeypatch):
    """``host_bench(fn, **info)``: warms ``fn`` up, counts its Triton launches on one call, then times it with every
    launch a plain no-op (``backend="triton"`` accepted on CPU tensors, also without the interpreter)."""
    monkeypatch.setattr(backend, "interpreting", lambda: True)

    def run(fn, **info):
        with count_triton_launches(stub=True) as launches:
            fn()
            launches.clear()
            fn()
        with stub_triton_launches():
            bench(fn, launches_per_call=sum(launches.values()), **info)

    return run


def _fused(q, k, v, k_p, v_p, lengths):
    return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, backend="triton")


class _Floor(torch.autograd.Function):
    """An autograd.Function that only allocates what the fused op returns: the floor of any Python-level op."""

    @staticmethod
    def forward(ctx, q, k, v, k_p, v_p):
        ctx.save_for_backward(q, k, v, k_p, v_p)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def _fused_layer(q, k, v, k_p, v_p, lengths):
    """As ``prompted_bert`` calls layers 2..L: backend resolved and inputs validated once per forward."""
    return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, backend="triton", validate=False)


ATTENTION = {
    "hf_eager": hf_eager,
    "sdpa_mask": sdpa_mask,
    "triton_host": _fused,
    "triton_host_layer": _fused_layer,
    "function_floor": lambda q, k, v, k_p, v_p, lengths: _Floor.apply(q, k, v, k_p, v_p),
}


@pytest.mark.parametrize("provider", list(ATTENTION))
def test_attention_host(host_bench, provider):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_(True) for _ in range(3))
    k_p, v_p = (torch.randn(B, H, M, D, generator=g).requires_grad_(True) for _ in range(2))
    lengths = torch.tensor([N, N // 2])
    grad = torch.randn(B, H, N, D, generator=g)
    fn = ATTENTION[provider]

    def forward_backward():
        return torch.autograd.grad(fn(q, k, v, k_p, v_p, lengths), (q, k, v, k_p, v_p), grad)

    shape = {"B": B, "H": H, "n": N, "m": M, "d": D}
    host_bench(forward_backward, group="host-attention-forward_backward", provider=provider, dtype=q.dtype, shape=shape)


class _CRFFloor(torch.autograd.Function):
    """The CRF's counterpart of `_Floor`: allocates the (B,) log-likelihood and the four gradients and takes the
    batch mean (as the op's node does for ``reduction="mean"``), nothing else."""

    @staticmethod
    def forward(ctx, emissions, start, end, transitions):
        ctx.save_for_backward(emissions, start, end, transitions)
        return emissions.new_empty(emissions.shape[0]).mean()

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


class _CRFFloorModule(CRF):
    def forward(self, emissions, tags, mask, reduction="mean", validate=False):
        return _CRFFloor.apply(emissions, *self._params())  # the parameters read as CRF.forward reads them


@pytest.mark.parametrize("provider", ["pytorch-crf", "triton_host", "function_floor"])
@pytest.mark.parametrize("mode", ["forward_backward", "decode"])
def test_crf_host(host_bench, mode, provider):
    if provider == "function_floor" and mode == "decode":
        pytest.skip("the floor is of the autograd path")
    g = torch.Generator().manual_seed(0)
    if provider == "pytorch-crf":
        crf = torchcrf.CRF(TAGS, batch_first=True)
    elif provider == "function_floor":
        crf = _CRFFloorModule(TAGS, batch_first=True)
    else:
        crf = CRF(TAGS, batch_first=True, backend="triton")
    emissions = torch.randn(CRF_B, CRF_N, TAGS, generator=g).requires_grad_(True)
    tags = torch.randint(0, TAGS, (CRF_B, CRF_N), generator=g)
    lengths = torch.randint(CRF_N // 2, CRF_N + 1, (CRF_B,), generator=g)
    lengths[0] = CRF_N
    mask = torch.arange(CRF_N) < lengths[:, None]  # shape: (B, n)
    kw = {} if provider == "pytorch-crf" else {"validate": False}  # pytorch-crf checks the mask, with a host sync

    def forward_backward():
        emissions.grad = None
        (-crf(emissions, tags, mask, reduction="mean", **kw)).backward()

    def decode():
        if provider == "pytorch-crf":
            return crf.decode(emissions.detach(), mask)
        return crf.decode(emissions.detach(), mask, as_tensor=True, **kw)

    fn = forward_backward if mode == "forward_backward" else decode
    shape = {"B": CRF_B, "n": CRF_N, "T": TAGS}
    host_bench(fn, group=f"host-crf-{mode}", provider=provider, dtype=emissions.dtype, shape=shape)
