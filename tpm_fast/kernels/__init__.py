"""Triton kernels (installed as ``tpm_fast.kernels``). Populated by the fused attention and CRF work."""
