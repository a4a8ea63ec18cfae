"""Torch dataset of posts (text + up to 4 image paths) and the batch collate function.

The dataset encodes text only; images are loaded per batch by an image source (:mod:`tpm_fast.data.feed`), which
decodes a whole batch's images at once (a thread pool, the cache or DALI) instead of one image per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tpm_fast.data.images import MAX_IMAGES
from tpm_fast.data.readers import Post
from tpm_fast.data.text import encode_words, pad_text

IMAGE_MODES = ("text", "first", "multi")


@dataclass
class PostBatch:
    """A collated batch before its images are loaded.

    Attributes:
        tensors: ``input_ids`` (B, n) long, ``attention_mask`` (B, n) bool, ``labels`` (B, n) long (0 at padding),
            ``first_piece`` (B, n) bool, ``index`` (B,) long dataset indices.
        image_post: post index in the batch of each requested image, post-major, slot-ascending.
        image_slot: slot 0..3 of each requested image.
        image_paths: the file of each requested image (it may be missing or broken).
    """

    tensors: dict[str, torch.Tensor]
    image_post: list[int]
    image_slot: list[int]
    image_paths: list[Path]


class MNERDataset(Dataset):
    """Posts encoded for the tagger, with the image paths each post's mode uses.

    Text is encoded once, in ``__init__`` (so bad text fails early).

    Args:
        posts: the posts (from :mod:`tpm_fast.data.readers`).
        tokenizer: a HF fast tokenizer.
        max_seq_length: maximum pieces per post, special tokens included.
        image_mode: ``"text"`` (no images), ``"first"`` (first image only, slot 0), ``"multi"`` (up to 4).
    """

    def __init__(self, posts: Sequence[Post], tokenizer, max_seq_length: int = 128, image_mode: str = "multi") -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; expected one of {IMAGE_MODES}")
        self.posts = list(posts)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.image_mode = image_mode
        self.encoded = [encode_words(p.words, p.labels, tokenizer, max_seq_length) for p in self.posts]

    @property
    def truncated(self) -> int:
        """Posts with words cut off by ``max_seq_length`` (those words are scored as "O")."""
        return sum(e["n_words_kept"] < e["n_words"] for e in self.encoded)

    @property
    def collate_fn(self):
        """``collate`` bound to this dataset's pad id, for ``DataLoader(collate_fn=...)``."""
        return partial(collate, pad_id=self.tokenizer.pad_token_id)

    def image_paths(self, i: int) -> list[Path]:
        """The image files post ``i`` uses in this dataset's image mode (slot k = position k)."""
        limit = {"text": 0, "first": 1, "multi": MAX_IMAGES}[self.image_mode]
        return list(self.posts[i].images[:limit])

    def __len__(self) -> int:
        return len(self.posts)

    def __getitem__(self, i: int) -> dict:
        """Returns ``{"encoded": encode_words(...) dict, "images": image_paths(i), "index": i}``."""
        return {"encoded": self.encoded[i], "images": self.image_paths(i), "index": i}


def collate(items: list[dict], pad_id: int) -> PostBatch:
    """Batch :meth:`MNERDataset.__getitem__` items: text padded to the longest post, image requests flattened.

    Args:
        items: B items.
        pad_id: token id for padded positions.

    Returns:
        The :class:`PostBatch`.
    """
    tensors = pad_text([it["encoded"] for it in items], pad_id)
    tensors["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)  # shape: (B,)
    posts, slots, paths = [], [], []
    for p, it in enumerate(items):
        for slot, path in enumerate(it["images"]):
            posts.append(p)
            slots.append(slot)
            paths.append(path)
    return PostBatch(tensors, posts, slots, paths)
