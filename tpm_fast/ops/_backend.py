"""Backend choice shared by the fused ops: ``"auto"`` | ``"triton"`` | ``"reference"``.

``"auto"`` runs the Triton kernel on CUDA tensors when Triton is importable, the pure-PyTorch reference elsewhere.
``"triton"`` on CPU tensors runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

BACKENDS = ("auto", "triton", "reference")


_TRITON: list[bool] = []  # filled on first use (not functools.cache: torch.compile traces through this)


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    if not _TRITON:
        _TRITON.append(importlib.util.find_spec("triton") is not None)
    return _TRITON[0]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ``ValueError`` naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """Map a requested backend to ``"triton"`` or ``"reference"`` for these input tensors.

    Raises:
        ValueError: unknown backend, or ``"triton"`` asked for where it cannot run (no Triton, or CPU tensors
            without ``TRITON_INTERPRET=1``, or tensors on different devices).
    """
    if check_backend(backend) == "reference":
        return backend
    devices = {t.device for t in tensors}
    on_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not on_cuda and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return backend
