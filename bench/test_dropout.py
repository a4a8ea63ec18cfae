"""Dropout of BERT's hidden states: ``torch.nn.functional.dropout`` (what HF BERT's ``nn.Dropout`` runs) against
tpm_fast's native CPU kernel (Philox, the mask regenerated from the seed in the backward), forward and
forward+backward, at the packed hidden states of a TWITTER-2015 batch (32 posts, ~1,340 word pieces) for MiniLM
(d = 384) and BERT-base (d = 768). On CUDA only ``F.dropout`` runs (the native kernel is CPU only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpm_fast.ops.backend import native_unsupported
from tpm_fast.ops.dropout import dropout

P = 0.1
SHAPES = [(1343, 384), (1343, 768)]


@pytest.mark.parametrize("provider", ["torch", "native"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout(bench, bench_device, shape, mode, provider):
    if provider == "native" and (problem := native_unsupported("dropout", bench_device, torch.float32)):
        pytest.skip(f"native: {problem}")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(bench_device).requires_grad_(True)
    grad = torch.ones_like(x)

    def forward():
        with torch.no_grad():
            return F.dropout(x, P, True) if provider == "torch" else dropout(x, P, backend="native")

    def forward_backward():
        y = F.dropout(x, P, True) if provider == "torch" else dropout(x, P, backend="native")
        return torch.autograd.grad(y, x, grad)

    fn = forward if mode == "forward" else forward_backward
    dims = {"T": shape[0], "d": shape[1]}
    bench(fn, group=f"dropout-{mode}-{shape[1]}", provider=provider, dtype=x.dtype, shape=dims)
