"""tpm_fast.ops.dropout: the native CPU dropout against its Philox definition (numpy), bit for bit, forward and
backward, over shapes, dtypes, strides, seeds, threads and instruction sets; its statistics; the fallbacks to
F.dropout and the errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.oracles import philox_uniform
from tpm_fast.ops import native
from tpm_fast.ops.dropout import dropout

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))


def _keep(seed: int, n: int, p: float) -> torch.Tensor:
    """(n,) bool: element i = 64 * blk + 16 * w + l kept when word w of tl.rand4x(seed, 16 * blk + l) >= p."""
    i = np.arange(n)
    blk, w, lane = i // 64, i % 64 // 16, i % 16
    u = np.choose(w, philox_uniform(seed, 16 * blk + lane))
    return torch.from_numpy(u >= np.float32(p))


def _expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    kept = torch.tensor(1.0) / (1 - torch.tensor(p, dtype=torch.float32))  # 1 / (1 - p) in fp32, as the kernel
    keep = _keep(seed, x.numel(), p).view(x.shape)
    return torch.where(keep, (x.float() * kept).to(x.dtype), torch.zeros((), dtype=x.dtype))


@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (37, 29), (3, 5, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_kernel_is_its_philox_definition(shape, dtype, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
    p = 0.3
    y = native.load().dropout(x, p, torch.tensor([seed]))
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y, _expected(x, p, seed))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_statistics(p):
    """Each element kept with probability 1 - p (within 5 standard deviations over 2**18 elements), neighbours
    uncorrelated, kept elements scaled by 1 / (1 - p), so the mean is unchanged."""
    n = 2**18
    keep = (dropout(torch.ones(n), p) != 0).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    corr = torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5
    assert abs(dropout(torch.ones(n), p).mean().item() - 1) < 5 * sd / (1 - p)


def test_backward_applies_the_same_mask():
    x = torch.randn(6, 70, requires_grad=True)
    grad = torch.randn(6, 70)
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)).item()
    y = dropout(x, 0.25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, _expected(x.detach(), 0.25, seed))
    y.backward(grad)
    assert torch.equal(x.grad, _expected(grad, 0.25, seed))


def test_strides_threads_and_seeds():
    """A non-contiguous input is read in its logical order; the thread count does not change the mask; the default
    generator's state decides the seed (torch.manual_seed reproduces a mask, the next call draws another)."""
    x = torch.randn(300, 257)
    seed = torch.tensor([99])
    assert torch.equal(native.load().dropout(x.t(), 0.4, seed), native.load().dropout(x.t().contiguous(), 0.4, seed))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.load().dropout(x, 0.4, seed)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, native.load().dropout(x, 0.4, seed))
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(5)
    a, b = dropout(x, 0.4), dropout(x, 0.4)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.4)) and not torch.equal(a, b)


def test_every_instruction_set_gives_the_same_mask():
    """The layout does not depend on the vector width: the portable kernels (ATEN_CPU_CAPABILITY=default) give the
    bits of the ones picked here."""
    code = (
        "import torch, tpm_fast._C; x = torch.arange(1, 5001, dtype=torch.float32).view(50, 100); "
        "print(torch.ops.tpm_fast_native.dropout(x, 0.3, torch.tensor([77])).flatten().tolist())"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    x = torch.arange(1, 5001, dtype=torch.float32).view(50, 100)
    here = native.load().dropout(x, 0.3, torch.tensor([77]))
    assert out.strip() == str(here.flatten().tolist())
    assert torch.equal(here, _expected(x, 0.3, 77))


def test_fallbacks_and_errors():
    x = torch.randn(4, 9)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    for y in (dropout(x.double().requires_grad_(), 0.5), dropout(x.requires_grad_(), 0.5, backend="reference")):
        assert "native" not in type(y.grad_fn).__name__  # F.dropout
    assert "native" in type(dropout(x, 0.5).grad_fn).__name__
    with pytest.raises(ValueError, match="backend='native': the native dropout kernel takes"):
        dropout(x.double(), 0.5, backend="native")
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        dropout(x, 0.5, backend="fast")
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        native.load().dropout(x, 1.0, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="int64 seed"):
        native.load().dropout(x, 0.5, torch.tensor([1.0]))
    torch.testing.assert_close(F.dropout(x, 0.5, training=False), x)


def test_opcheck_and_compile():
    x = torch.randn(5, 40, requires_grad=True)
    torch.library.opcheck(native.load().dropout, (x, 0.3, torch.tensor([4])))
    compiled = torch.compile(lambda x, seed: native.load().dropout(x, 0.3, seed), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, torch.tensor([4])), native.load().dropout(x, 0.3, torch.tensor([4])))
