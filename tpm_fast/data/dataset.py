"""Torch dataset of posts (text + up to 4 images) and the batch collate function."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial

import torch
from torch.utils.data import Dataset

from tpm_fast.data.images import MAX_IMAGES, ImageLoader
from tpm_fast.data.readers import Post
from tpm_fast.data.text import encode_words, pad_text

IMAGE_MODES = ("text", "first", "multi")


class MNERDataset(Dataset):
    """Posts encoded for the tagger; images are loaded lazily in ``__getitem__``.

    Text is encoded once, in ``__init__`` (so bad text fails early). Images that fail to load are left out and
    their slot stays empty (see :class:`~tpm_fast.data.images.ImageLoader`).

    Args:
        posts: the posts (from :mod:`tpm_fast.data.readers`).
        tokenizer: a HF fast tokenizer.
        max_seq_length: maximum pieces per post, special tokens included.
        image_loader: loader for the images; a default ``ImageLoader()`` when None and images are used.
        image_mode: ``"text"`` (no images), ``"first"`` (first image only, slot 0), ``"multi"`` (up to 4).
    """

    def __init__(
        self,
        posts: Sequence[Post],
        tokenizer,
        max_seq_length: int = 128,
        image_loader: ImageLoader | None = None,
        image_mode: str = "multi",
    ) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; expected one of {IMAGE_MODES}")
        self.posts = list(posts)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.image_mode = image_mode
        self.image_loader = image_loader if image_loader is not None or image_mode == "text" else ImageLoader()
        self.encoded = [encode_words(p.words, p.labels, tokenizer, max_seq_length) for p in self.posts]

    @property
    def truncated(self) -> int:
        """Posts with words cut off by ``max_seq_length`` (those words are scored as "O")."""
        return sum(e["n_words_kept"] < e["n_words"] for e in self.encoded)

    @property
    def image_size(self) -> int:
        return self.image_loader.spec.size if self.image_loader is not None else 224

    @property
    def collate_fn(self):
        """``collate`` bound to this dataset's pad id and image size, for ``DataLoader(collate_fn=...)``."""
        return partial(collate, pad_id=self.tokenizer.pad_token_id, image_size=self.image_size)

    def __len__(self) -> int:
        return len(self.posts)

    def __getitem__(self, i: int) -> dict:
        """Returns ``{"encoded": encode_words(...) dict, "images": list of (3, S, S) float32 tensors (present images
        only), "slots": list[int] (slot 0..3 of each present image), "index": i, "image_events": the ImageStats
        counters this item's images added (so that counts made in DataLoader workers reach the main process)}``."""
        post = self.posts[i]
        if self.image_mode == "text":
            paths = []
        elif self.image_mode == "first":
            paths = post.images[:1]
        else:
            paths = post.images[:MAX_IMAGES]
        images, slots = [], []
        before = self.image_loader.stats.as_dict() if paths else {}
        for slot, path in enumerate(paths):
            img = self.image_loader.load(path)
            if img is not None:
                images.append(img)
                slots.append(slot)
        events = (
            {k: v - before[k] for k, v in self.image_loader.stats.as_dict().items() if v != before[k]} if paths else {}
        )
        return {"encoded": self.encoded[i], "images": images, "slots": slots, "index": i, "image_events": events}


def collate(items: list[dict], pad_id: int, image_size: int = 224) -> dict[str, torch.Tensor]:
    """Batch :meth:`MNERDataset.__getitem__` items.

    Args:
        items: B items.
        pad_id: token id for padded positions.
        image_size: S, used for the shape of ``pixel_values`` when the batch has no image.

    Returns:
        ``input_ids`` (B, n) long, ``attention_mask`` (B, n) bool, ``labels`` (B, n) long (0 at padding),
        ``first_piece`` (B, n) bool, ``pixel_values`` (N, 3, S, S) float32 with only the present images in
        post-major, slot-ascending order (N may be 0), ``image_post`` (N,) long post index in the batch,
        ``image_slot`` (N,) long slot index 0..3 (a failed image k leaves slot k empty, slots are not compacted),
        ``image_mask`` (B, 4) bool presence map (``image_mask[image_post, image_slot]`` is True), ``index`` (B,)
        long dataset indices, ``image_events`` dict of ImageStats counter -> count for the batch's images.
    """
    batch = pad_text([it["encoded"] for it in items], pad_id)
    b = len(items)
    images, posts, slots = [], [], []
    for p, it in enumerate(items):
        for img, slot in zip(it["images"], it["slots"], strict=True):
            images.append(img)
            posts.append(p)
            slots.append(slot)
    if images:
        pixel_values = torch.stack(images)  # shape: (N, 3, S, S)
    else:
        pixel_values = torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)
    image_post = torch.tensor(posts, dtype=torch.long)  # shape: (N,)
    image_slot = torch.tensor(slots, dtype=torch.long)  # shape: (N,)
    image_mask = torch.zeros((b, MAX_IMAGES), dtype=torch.bool)  # shape: (B, 4)
    image_mask[image_post, image_slot] = True
    batch.update(
        pixel_values=pixel_values,
        image_post=image_post,
        image_slot=image_slot,
        image_mask=image_mask,
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
        image_events=dict(sum((Counter(it.get("image_events", {})) for it in items), Counter())),
    )
    return batch
