"""Autograd ops with backend dispatch: fused Triton kernels on CUDA, native C++ kernels on CPU, the PyTorch reference.

``tpm_fast.ops.prefix_attention`` and ``tpm_fast.ops.crf`` are the modules (their functions are re-exported by
``tpm_fast``); nothing is bound here, so ``from tpm_fast.ops import prefix_attention`` is always the module.
"""
