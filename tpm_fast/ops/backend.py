"""Which implementation a fused op runs: ``"auto"`` | ``"triton"`` | ``"native"`` | ``"reference"``, decided once per
module call.

- ``"reference"``: the pure-PyTorch reference (`tpm_fast.reference`), on any device.
- ``"triton"``: the fused kernels; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
  Inputs the kernels do not cover raise ``ValueError``.
- ``"native"``: the kernels of the extension ``tpm_fast._C`` (``csrc/``): C++ on CPU tensors (fp32 / bf16 attention
  inputs, fp32 / fp16 / bf16 CRF emissions, any head dim and tag count) and, where the extension was built with CUDA,
  the CUDA CRF (up to :data:`MAX_TAGS` tags; attention on CUDA is Triton's).
- ``"auto"``: on CUDA, Triton when Triton is importable, the inputs are covered (:func:`attention_unsupported`,
  :func:`crf_unsupported`), the device has bf16 (compute capability >= 8.0) for 16-bit inputs, and the op passed its
  first-use self-check on that device, else the reference (the native CUDA CRF is not picked by ``"auto"`` until a
  GPU benchmark shows it ahead of Triton's: :data:`AUTO_CUDA_NATIVE`). On CPU, the native kernels when the extension
  is built and takes the dtype, else the reference.

Self-check: the first time ``"auto"`` would pick Triton for an op on a device, the op's registered check runs a tiny
case (a few ms) against the reference, forward and backward. On a mismatch (or an error) it warns once, naming the
device, and ``"auto"`` uses the reference for that op on that device from then on. ``TPM_FAST_SELF_CHECK=0`` turns
it off. It never runs while ``torch.compile`` traces (call the op once eagerly first to have it checked).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "BACKENDS",
    "MAX_TAGS",
    "attention_unsupported",
    "check_backend",
    "crf_unsupported",
    "interpreting",
    "native_unavailable_reason",
    "native_unsupported",
    "register_self_check",
    "resolve",
    "self_check_passed",
    "triton_available",
]

BACKENDS = ("auto", "triton", "native", "reference")
MAX_TAGS = 64
"""Most tags the Triton CRF takes (its (T, T) tile lives in registers); more run the reference."""

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTO_DEVICE_TYPES = ("cuda",)
"""Device types on which ``"auto"`` may pick Triton (tests add ``"cpu"`` to exercise the self-check)."""
NATIVE_DTYPES = {
    "prefix_attention": (torch.float32, torch.bfloat16),
    "crf": (torch.float32, torch.float16, torch.bfloat16),
    "dropout": (torch.float32, torch.float16, torch.bfloat16),
}
"""Input dtypes the native CPU kernels take, per op."""
AUTO_CUDA_NATIVE: tuple[str, ...] = ()
"""Ops for which ``"auto"`` picks the native CUDA kernel over Triton's on CUDA tensors: the winner of
``bench/test_crf.py`` (providers ``native`` and ``triton``) on an H100/H200. Empty until such figures exist (no GPU
has been lent to this project yet), so CUDA runs Triton, the kernels whose GPU tests and reports exist."""

_TRITON: list[bool] = []  # filled on first use (not functools.cache: torch.compile traces through this)
_SELF_CHECKS: dict[str, Callable[[torch.device, torch.dtype], str | None]] = {}
_PASSED: dict[tuple[str, str, torch.dtype], bool] = {}


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


def attention_unsupported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton attention kernel cannot take inputs of this dtype / head dim (None when it can)."""
    if dtype not in KERNEL_DTYPES:
        return f"the Triton attention kernel takes fp32/fp16/bf16 inputs, got {dtype}"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"the Triton attention kernel needs a head dim that is a power of 2 in [16, 256], got {head_dim}"
    return None


def crf_unsupported(dtype: torch.dtype, num_tags: int) -> str | None:
    """Why the Triton CRF cannot take inputs of this (promoted) dtype / tag count (None when it can)."""
    if num_tags > MAX_TAGS:
        return f"the Triton CRF supports at most {MAX_TAGS} tags, got {num_tags}"
    if dtype not in KERNEL_DTYPES:
        return f"the Triton CRF computes in fp32: {dtype} inputs need backend='reference' (or 'auto')"
    return None


def native_unavailable_reason() -> str | None:
    """None when the native extension ``tpm_fast._C`` is loaded (it is loaded on first call), else why not."""
    from tpm_fast.ops import native

    return native.unavailable_reason()


def native_unsupported(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the native kernel of ``op`` cannot take ``dtype`` inputs on ``device`` (None when it can)."""
    from tpm_fast.ops import native

    problem = native.unavailable_reason()
    if problem is None and device.type == "cuda" and (op != "crf" or not native.has_cuda()):
        built = "run on CPU tensors" if op != "crf" else "were built without CUDA"
        problem = f"the native {op} kernels {built}, got {device}"
    elif problem is None and device.type not in ("cpu", "cuda"):
        problem = f"the native kernels run on CPU (and, for the CRF, CUDA) tensors, got {device}"
    if problem is None and dtype not in NATIVE_DTYPES[op]:
        names = [str(d).removeprefix("torch.") for d in NATIVE_DTYPES[op]]
        problem = f"the native {op} kernel takes {names} inputs, got {dtype}"
    return problem


def _bf16_capable(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def register_self_check(op: str, check: Callable[[torch.device, torch.dtype], str | None]) -> None:
    """Register ``op``'s first-use check: ``check(device, dtype)`` runs a tiny case in ``dtype`` on ``device`` with
    the Triton backend against the reference and returns None when they match, else a short description of the
    mismatch."""
    _SELF_CHECKS[op] = check


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def self_check_passed(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Run ``op``'s self-check on ``device`` in ``dtype`` once (cached per op, device and dtype); False (after one
    warning) when the kernel mismatched."""
    if os.environ.get("TPM_FAST_SELF_CHECK", "1") == "0" or op not in _SELF_CHECKS:
        return True
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op, str(device), dtype)
    if key not in _PASSED:
        if torch.compiler.is_compiling():
            return True  # never trace the check into a graph
        try:
            problem = _SELF_CHECKS[op](device, dtype)
        except Exception as err:  # a kernel that does not compile or launch here is a failed check too
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            warnings.warn(
                f"tpm_fast: the Triton {op} kernel failed its first-use self-check on {_device_name(device)} "
                f"({str(dtype).removeprefix('torch.')}): "
                f"{problem}. Using the PyTorch reference for {op} on this device (TPM_FAST_SELF_CHECK=0 skips the "
                "check).",
                RuntimeWarning,
                stacklevel=3,
            )
        _PASSED[key] = problem is None
    return _PASSED[key]


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype, unsupported: str | None) -> str:
    """Map a requested backend to ``"triton"``, ``"native"`` or ``"reference"`` for one call of ``op``.

    Args:
        backend: one of :data:`BACKENDS`.
        op: the op's name (its self-check's key), e.g. ``"prefix_attention"``.
        device: the inputs' device; dtype: their (widest) float dtype.
        unsupported: why the kernels cannot take these inputs (:func:`attention_unsupported` /
            :func:`crf_unsupported`), or None.

    Raises:
        ValueError: unknown backend, ``"triton"`` where it cannot run (no Triton, CPU tensors without
            ``TRITON_INTERPRET=1``, inputs the kernels do not cover), or ``"native"`` where it cannot
            (:func:`native_unsupported`).
    """
    if backend == "triton" and unsupported is None and (interpreting() or device.type == "cuda") and triton_available():
        return backend  # the per-call fast path of an explicit backend (device.type builds a string: ~0.4 us)
    if check_backend(backend) == "reference":
        return backend
    auto, kind = backend == "auto", device.type
    if backend == "native" or (auto and (kind not in AUTO_DEVICE_TYPES or op in AUTO_CUDA_NATIVE)):
        problem = native_unsupported(op, device, dtype)
        if problem is None and kind == "cuda":
            problem = unsupported  # the CUDA CRF covers what the Triton CRF covers (tags, dtypes)
        if problem is None:
            return "native"
        if backend == "native":
            raise ValueError(f"backend='native': {problem}")
    if auto and kind in AUTO_DEVICE_TYPES:
        ok = (
            unsupported is None
            and triton_available()
            and (dtype == torch.float32 or _bf16_capable(device))
            and self_check_passed(op, device, dtype)
        )
        return "triton" if ok else "reference"
    if auto:
        return "reference"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if kind != "cuda" and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    if unsupported is not None:
        raise ValueError(unsupported)
    return backend
