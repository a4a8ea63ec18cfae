"""Word-piece encoding with label alignment, and dynamic padding.

Alignment follows the authors' code: the first piece of a word carries the word's label; [CLS], [SEP] and every
non-first piece carry ``X``. Alignment uses the fast tokenizer's ``word_ids()``.

A word that tokenizes to zero pieces (an empty string, whitespace, zero-width or control characters) would silently
vanish and shift the word/label alignment; such words are replaced by the tokenizer's unk token, so every word keeps
exactly one first piece (until truncation).
"""

from __future__ import annotations

import torch

from tpm_fast.data.labels import LABEL2ID, PAD_LABEL_ID, X_ID, X_LABEL


def _label_id(tag: str) -> int:
    if tag == X_LABEL or tag not in LABEL2ID:
        raise ValueError(f"unknown label {tag!r}: labels are the internal names the readers normalize to")
    return LABEL2ID[tag]


def encode_words(words: list[str], labels: list[str] | None, tokenizer, max_seq_length: int) -> dict:
    """Tokenize a pre-split post and align labels to word pieces.

    Args:
        words: the words of one post.
        labels: one internal tag name per word (as the readers normalize them), or None (every position gets X).
        tokenizer: a HF *fast* tokenizer (``word_ids()`` needed), e.g. ``BertTokenizer`` in transformers 5.
        max_seq_length: maximum number of pieces including special tokens; words past it are truncated.

    Returns:
        dict with ``input_ids`` (list[int], length n <= max_seq_length), ``label_ids`` (list[int], length n:
        the word's label id on its first piece, X elsewhere), ``first_piece`` (list[bool], length n, True only on
        the first piece of a word), ``n_words_kept`` (int, words whose first piece survived truncation),
        ``n_words`` (int).

    Raises:
        ValueError: labels of the wrong length, a non-fast tokenizer, or max_seq_length too small for one word.
    """
    if labels is not None and len(labels) != len(words):
        raise ValueError(f"{len(words)} words but {len(labels)} labels")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_words needs a fast tokenizer (word_ids() is required)")
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_seq_length < n_special + 1:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a word ({n_special} special tokens)")
    words = list(words)
    if words:
        pieces = tokenizer(words, add_special_tokens=False)["input_ids"]  # one entry per word
        for k, p in enumerate(pieces):
            if not p:
                words[k] = tokenizer.unk_token
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_seq_length)
    word_ids = enc.word_ids()
    input_ids = list(enc["input_ids"])
    label_ids, first_piece = [], []
    prev = None
    kept = 0
    for w in word_ids:
        first = w is not None and w != prev
        first_piece.append(first)
        if first:
            kept += 1
            label_ids.append(_label_id(labels[w]) if labels is not None else X_ID)
        else:
            label_ids.append(X_ID)
        prev = w
    return {
        "input_ids": input_ids,
        "label_ids": label_ids,
        "first_piece": first_piece,
        "n_words_kept": kept,
        "n_words": len(words),
    }


def pad_text(encoded: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of :func:`encode_words` outputs to its longest sequence.

    Args:
        encoded: B dicts from :func:`encode_words` (B >= 1).
        pad_id: token id written at padded positions (``tokenizer.pad_token_id``).

    Returns:
        ``input_ids`` (B, n) long (pad_id at padding), ``attention_mask`` (B, n) bool (True = real piece,
        left-aligned), ``labels`` (B, n) long (0 = "O" at padding), ``first_piece`` (B, n) bool (False at padding).
    """
    if not encoded:
        raise ValueError("pad_text needs at least one sequence")
    b = len(encoded)
    n = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)  # shape: (B, n)
    labels = torch.full((b, n), PAD_LABEL_ID, dtype=torch.long)  # shape: (B, n)
    attention_mask = torch.zeros((b, n), dtype=torch.bool)  # shape: (B, n)
    first_piece = torch.zeros((b, n), dtype=torch.bool)  # shape: (B, n)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(e["label_ids"], dtype=torch.long)
        attention_mask[i, :k] = True
        first_piece[i, :k] = torch.tensor(e["first_piece"], dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "first_piece": first_piece}
