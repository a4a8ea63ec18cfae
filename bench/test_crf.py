"""CRF: pytorch-crf (the authors' baseline) vs tpm_fast's CRF on the PyTorch reference, the Triton kernels (CUDA
only: the interpreter's times mean nothing) and the native kernels (C++ on CPU; the CUDA CRF where ``tpm_fast._C``
was built with CUDA: on a GPU this pair decides ``tpm_fast.ops.backend.AUTO_CUDA_NATIVE``): log-likelihood forward,
forward+backward, decode.

pytorch-crf decodes to Python lists (one ``.item()`` per tag); tpm_fast decodes to a padded LongTensor.
"""

from __future__ import annotations

import pytest
import torch
import torchcrf

from tpm_fast.layers.crf import CRF
from tpm_fast.ops.backend import native_unsupported

NUM_TAGS = 10
SHAPES = [
    (32, 64),
    (32, 128),
    pytest.param(256, 64, marks=pytest.mark.big),
    pytest.param(256, 128, marks=pytest.mark.big),
]


def _setup(provider, b, n, device):
    g = torch.Generator().manual_seed(0)
    if provider == "pytorch-crf":
        crf = torchcrf.CRF(NUM_TAGS, batch_first=True).to(device)
    else:
        crf = CRF(NUM_TAGS, batch_first=True, backend=provider).to(device)
    emissions = torch.randn(b, n, NUM_TAGS, generator=g).to(device).requires_grad_(True)
    tags = torch.randint(0, NUM_TAGS, (b, n), generator=g).to(device)
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = (torch.arange(n) < lengths.unsqueeze(1)).to(device)  # shape: (B, n), padded like a real batch
    return crf, emissions, tags, mask


@pytest.mark.parametrize("provider", ["pytorch-crf", "reference", "triton", "native"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward", "decode"])
@pytest.mark.parametrize("b,n", SHAPES)
def test_crf(bench, bench_device, b, n, mode, provider):
    if provider == "triton" and bench_device.type != "cuda":
        pytest.skip("the Triton CRF is only benchmarked on CUDA")
    if provider == "native" and (problem := native_unsupported("crf", bench_device, torch.float32)):
        pytest.skip(f"native: {problem}")
    crf, emissions, tags, mask = _setup(provider, b, n, bench_device)

    def forward():
        with torch.no_grad():
            return crf(emissions, tags, mask, reduction="mean")

    def forward_backward():
        emissions.grad = None
        loss = -crf(emissions, tags, mask, reduction="mean")
        loss.backward()
        return loss

    def decode():
        if provider == "pytorch-crf":
            return crf.decode(emissions.detach(), mask)
        return crf.decode(emissions.detach(), mask, as_tensor=True)

    fn = {"forward": forward, "forward_backward": forward_backward, "decode": decode}[mode]
    shape = {"B": b, "n": n, "T": NUM_TAGS}
    bench(fn, group=f"crf-{mode}-B{b}-n{n}", provider=provider, dtype=emissions.dtype, shape=shape)
