"""nn layers: CRF (drop-in for torchcrf.CRF), Dropout (for nn.Dropout), prompted BERT, image prefix encoder, the HF
attention adapter."""

from tpm_fast.layers.crf import CRF
from tpm_fast.layers.dropout import Dropout, use_fast_dropout
from tpm_fast.layers.hf_attention import apply_to_bert
from tpm_fast.layers.hf_attention import register as register_hf_attention
from tpm_fast.layers.image_prefix import ImagePrefix
from tpm_fast.layers.prompted_bert import pack_index, prompted_bert

__all__ = [
    "CRF",
    "Dropout",
    "ImagePrefix",
    "apply_to_bert",
    "pack_index",
    "prompted_bert",
    "register_hf_attention",
    "use_fast_dropout",
]
