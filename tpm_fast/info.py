"""``python -m tpm_fast.info``: which backends this installation has, with versions, and why a missing one is missing.

Rows: torch (and its devices), Triton (compiled or interpreter), the native CPU kernels (``tpm_fast._C``), native
CUDA kernels, NVIDIA DALI, DeepSpeed (and whether its ops can be JIT-built), and the prefix-cache API of the
installed transformers. :func:`summary` is the one-line form that ``train.py`` prints first.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil

import torch

__all__ = ["backends", "main", "summary"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> tuple[bool, str]:
    from tpm_fast.ops import native
    from tpm_fast.ops.backend import interpreting, triton_available

    if not triton_available():
        return False, "not installed (pip install triton): CUDA runs the PyTorch reference"
    mode = "interpreter (TRITON_INTERPRET=1)" if interpreting() else "compiled"
    gpu = "" if torch.cuda.is_available() else "; no CUDA device: used on CUDA tensors only"
    node = "C++ autograd nodes" if native.extension() is not None else "Python autograd.Functions (no tpm_fast._C)"
    return True, f"{_version('triton')}, {mode}{gpu}; eager autograd: {node}"


def _native_cpu() -> tuple[bool, str]:
    from tpm_fast.ops import native

    reason = native.unavailable_reason()
    if reason is not None:
        return False, reason
    return True, f"tpm_fast._C: prefix attention and CRF on CPU tensors, {torch.get_num_threads()} thread(s)"


def _native_cuda() -> tuple[bool, str]:
    from tpm_fast.ops import backend, native

    reason = native.unavailable_reason()
    if reason is not None:
        return False, reason
    if not native.has_cuda():
        return False, "tpm_fast._C was built without CUDA (no CUDA torch / nvcc at install, or FORCE_CUDA unset)"
    auto = "picked by auto" if "crf" in backend.AUTO_CUDA_NATIVE else "auto keeps Triton's until GPU figures favour it"
    return True, f"tpm_fast._C: CRF on CUDA tensors ({auto}; backend='native' forces it)"


def _dali() -> tuple[bool, str]:
    version = next(
        (v for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali") if (v := _version(d))), None
    )
    if version is None or importlib.util.find_spec("nvidia") is None:
        return False, 'not installed (pip install -e ".[dali]"): images are decoded with PIL or read from the cache'
    return True, f"{version}: --image-loader dali (GPU decoding; a CPU pipeline without a GPU)"


def _deepspeed() -> tuple[bool, str]:
    version = _version("deepspeed")
    if version is None:
        return False, "not installed: `python train.py` trains without it on one rank"
    ninja = (
        "ninja found: its ops JIT-build on first use"
        if shutil.which("ninja")
        else "no ninja: its C++ ops cannot JIT-build"
    )
    return True, f"{version}; {ninja}"


def _prefix_cache() -> tuple[bool, str]:
    version = _version("transformers")
    if version is None:
        return False, "transformers is not installed"
    try:
        from transformers import DynamicCache

        kv = torch.zeros(1, 1, 1, 2)
        DynamicCache([(kv, kv)])  # transformers 5.x: a prefix cache from per-layer (key, value) pairs
    except Exception as err:  # noqa: BLE001 - any API mismatch
        return False, f"{version}: DynamicCache([(k, v), ...]) failed ({type(err).__name__}: {err})"
    return True, f"{version}: DynamicCache from (key, value) pairs"


def backends() -> list[tuple[str, bool, str]]:
    """(name, available, version or reason) for every backend and optional dependency."""
    cuda = torch.cuda.is_available()
    devices = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if cuda else "CPU only"
    return [
        ("torch", True, f"{torch.__version__}, {devices}"),
        ("triton", *_triton()),
        ("native CPU", *_native_cpu()),
        ("native CUDA", *_native_cuda()),
        ("DALI", *_dali()),
        ("DeepSpeed", *_deepspeed()),
        ("transformers prefix cache", *_prefix_cache()),
    ]


def summary() -> str:
    """One line: each backend as ``name: version`` or ``name: no``."""
    parts = [
        f"{name}: {detail.split(',')[0].split(';')[0].split(':')[0] if ok else 'no'}" for name, ok, detail in backends()
    ]
    return "backends: " + "; ".join(parts)


def main() -> None:
    rows = backends()
    width = max(len(name) for name, _, _ in rows)
    for name, ok, detail in rows:
        print(f"{name:<{width}}  {'yes' if ok else 'no ':<3}  {detail}")


if __name__ == "__main__":
    main()
