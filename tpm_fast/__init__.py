"""tpm-fast: a fast, trustworthy training core for TPM-MI multimodal named-entity recognition.

Importing has no side effects (no CUDA calls, no downloads, no files written, nothing registered with
transformers until :func:`apply_to_bert` or :func:`register_hf_attention` is called).
"""

from tpm_fast.layers import (
    CRF,
    Dropout,
    ImagePrefix,
    apply_to_bert,
    pack_index,
    prompted_bert,
    register_hf_attention,
    use_fast_dropout,
)
from tpm_fast.model import TPMMI, TPMConfig, build_model, load_model, save_model
from tpm_fast.ops.crf import crf_log_likelihood, crf_viterbi
from tpm_fast.ops.dropout import dropout
from tpm_fast.ops.prefix_attention import key_bounds, prefix_attention
from tpm_fast.plain_engine import PlainEngine

__version__ = "0.3.0"
__all__ = [
    "CRF",
    "Dropout",
    "ImagePrefix",
    "PlainEngine",
    "TPMConfig",
    "TPMMI",
    "apply_to_bert",
    "build_model",
    "crf_log_likelihood",
    "crf_viterbi",
    "dropout",
    "key_bounds",
    "load_model",
    "pack_index",
    "prefix_attention",
    "prompted_bert",
    "register_hf_attention",
    "save_model",
    "use_fast_dropout",
]
