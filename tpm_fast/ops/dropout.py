"""Dropout with backend dispatch: the native CPU kernel (``tpm_fast._C``), else ``torch.nn.functional.dropout``.

On CPU, ``F.dropout`` draws its mask with ``bernoulli_`` (one Mersenne-Twister draw per element, ~8-11 ns each on
the AVX2 host) and keeps it for the backward. The native kernel draws from Philox 4x32-10 (the generator of the
fused attention's dropout, four words per counter, vectorized, parallel over 64-element blocks) and keeps only the
seed: the backward applies the same op to the gradient. Forward and backward of a (1343, 384) fp32 hidden state
(one TWITTER-2015 batch of 32 posts, MiniLM) took 2.8 ms against 4.1 ms on one thread, 2.0 ms against 4.4 ms on two
(AVX2 host, 2026-12-07; ``bench/test_dropout.py``, ``bench/README.md``).

The seed is one ``torch.randint`` draw from the default CPU generator (or ``generator``), so ``torch.manual_seed``
and a resumed run's restored generator state give the same masks. Masks differ from ``F.dropout``'s for the same
seed; their distribution is the same (each element kept with probability 1 - p, independently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tpm_fast.ops import backend as _backend
from tpm_fast.ops import native as _native

__all__ = ["dropout"]


def dropout(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.dropout(x, p, training)`` (not in place): the native kernel on CPU tensors where it is built.

    Args:
        x: any shape; the native kernel takes CPU fp32 / bf16 / fp16 (other dtypes and devices: ``F.dropout``).
        p: probability of zeroing an element, in [0, 1]; kept elements are scaled by 1 / (1 - p).
        training: False returns ``x`` itself, as ``F.dropout`` does.
        backend: ``"auto"`` or ``"native"`` (the kernel where it can run; ``"native"`` raises where it cannot),
            ``"reference"`` or ``"triton"`` (``F.dropout``: dropout has no Triton kernel here; CUDA's is fast).
        generator: the CPU generator of the seed (default: torch's default CPU generator).

    Returns:
        x's shape and dtype (contiguous on the native path), differentiable w.r.t. ``x``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    problem = _native_problem(x, p, _backend.check_backend(backend))
    if problem is not None:
        if backend == "native":
            raise ValueError(f"backend='native': {problem}")
        return F.dropout(x, p, True)
    seed = torch.randint(0, 2**62, (1,), generator=generator)  # shape: (1,) int64 on CPU, no host sync
    return _native.load().dropout(x, p, seed)


def _native_problem(x: Tensor, p: float, backend: str) -> str | None:
    """Why the native kernel does not run this call (None when it does)."""
    if backend in ("reference", "triton"):
        return f"backend={backend!r}"
    if p >= 1.0:
        return "p = 1 zeroes everything (F.dropout does it)"
    return _backend.native_unsupported("dropout", x.device, x.dtype)
