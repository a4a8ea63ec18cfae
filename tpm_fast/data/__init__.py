"""Data: readers (MNER-MI JSON lines, TWITTER CoNLL), word-piece alignment, images (PIL, the decoded-image cache in
``tpm_fast.data.cache``, DALI in ``tpm_fast.data.dali``), dataset, the image feed, synthetic corpus."""

from tpm_fast.data.dataset import IMAGE_MODES, MNERDataset, PostBatch, collate
from tpm_fast.data.feed import Batch, ImageFeed, PILImages
from tpm_fast.data.images import (
    MAX_IMAGES,
    DataWarning,
    ImageEvent,
    ImageLoader,
    ImageSpec,
    ImageStats,
    normalize,
    repair_truncated_jpeg,
)
from tpm_fast.data.labels import ENTITY_TYPES, LABEL2ID, LABELS, X_LABEL, normalize_label
from tpm_fast.data.readers import DataFormatError, Post, load_split, read_conll, read_mner_jsonl, resolve_layout
from tpm_fast.data.synthetic import default_cache_dir, ensure_synthetic_corpus
from tpm_fast.data.text import encode_words, pad_text

__all__ = [
    "Batch",
    "DataFormatError",
    "DataWarning",
    "ENTITY_TYPES",
    "IMAGE_MODES",
    "ImageEvent",
    "ImageFeed",
    "ImageLoader",
    "ImageSpec",
    "ImageStats",
    "LABEL2ID",
    "LABELS",
    "MAX_IMAGES",
    "MNERDataset",
    "PILImages",
    "Post",
    "PostBatch",
    "X_LABEL",
    "collate",
    "default_cache_dir",
    "encode_words",
    "ensure_synthetic_corpus",
    "load_split",
    "normalize",
    "normalize_label",
    "pad_text",
    "read_conll",
    "read_mner_jsonl",
    "repair_truncated_jpeg",
    "resolve_layout",
]
