"""tpm-fast: a fast, trustworthy training core for TPM-MI multimodal named-entity recognition.

Importing has no side effects (no CUDA calls, no downloads, no files written).
"""

from tpm_fast.layers import CRF, ImagePrefix, prompted_bert
from tpm_fast.model import TPMMI, TPMConfig, build_model, load_model, save_model
from tpm_fast.reference import prefix_attention

__version__ = "0.1.0"
__all__ = [
    "CRF",
    "ImagePrefix",
    "TPMConfig",
    "TPMMI",
    "build_model",
    "load_model",
    "prefix_attention",
    "prompted_bert",
    "save_model",
]
