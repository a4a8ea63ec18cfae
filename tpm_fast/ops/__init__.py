"""Autograd ops with backend dispatch: the fused Triton kernels on CUDA, the PyTorch reference elsewhere.

``tpm_fast.ops.prefix_attention`` and ``tpm_fast.ops.crf`` are the modules (their functions are re-exported by
``tpm_fast``); nothing is bound here, so ``from tpm_fast.ops import prefix_attention`` is always the module.
"""
