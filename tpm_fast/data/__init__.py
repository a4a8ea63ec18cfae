"""Data: readers (MNER-MI JSON lines, TWITTER CoNLL), word-piece alignment, images, dataset, synthetic corpus."""

from tpm_fast.data.dataset import IMAGE_MODES, MNERDataset, collate
from tpm_fast.data.images import MAX_IMAGES, DataWarning, ImageLoader, ImageSpec, ImageStats, repair_truncated_jpeg
from tpm_fast.data.labels import ENTITY_TYPES, LABEL2ID, LABELS, X_LABEL, normalize_label
from tpm_fast.data.readers import DataFormatError, Post, load_split, read_conll, read_mner_jsonl
from tpm_fast.data.synthetic import default_cache_dir, ensure_synthetic_corpus
from tpm_fast.data.text import encode_words, pad_text

__all__ = [
    "DataFormatError",
    "DataWarning",
    "ENTITY_TYPES",
    "IMAGE_MODES",
    "ImageLoader",
    "ImageSpec",
    "ImageStats",
    "LABEL2ID",
    "LABELS",
    "MAX_IMAGES",
    "MNERDataset",
    "Post",
    "X_LABEL",
    "collate",
    "default_cache_dir",
    "encode_words",
    "ensure_synthetic_corpus",
    "load_split",
    "normalize_label",
    "pad_text",
    "read_conll",
    "read_mner_jsonl",
    "repair_truncated_jpeg",
]
