"""nn layers: CRF (drop-in for torchcrf.CRF), prompted BERT, image prefix encoder."""

from tpm_fast.layers.crf import CRF
from tpm_fast.layers.image_prefix import ImagePrefix
from tpm_fast.layers.prompted_bert import prompted_bert

__all__ = ["CRF", "ImagePrefix", "prompted_bert"]
