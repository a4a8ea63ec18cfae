"""Entity-level evaluation on first word pieces with seqeval (micro P/R/F1), the paper's protocol."""

from __future__ import annotations

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from torch import Tensor

from tpm_fast.data.labels import X_LABEL


def word_tags(tags: Tensor, first_piece: Tensor, n_words: list[int], labels: tuple[str, ...]) -> list[list[str]]:
    """Per-word tag strings from per-piece tag ids, keeping each word's first piece.

    Args:
        tags: (B, n) long tag ids (Viterbi output; padding positions are ignored).
        first_piece: (B, n) bool, True on the first piece of every word kept after truncation.
        n_words: words of each post before truncation; words cut off by truncation are tagged "O".
        labels: id -> tag string. "X" on a first piece (never gold there) counts as "O".

    Returns:
        B lists of ``n_words[b]`` tag strings.
    """
    out = []
    for row, keep, total in zip(tags.tolist(), first_piece.tolist(), n_words):
        words = [labels[t] for t, k in zip(row, keep) if k]
        words = ["O" if t == X_LABEL else t for t in words]
        out.append(words + ["O"] * (total - len(words)))
    return out


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """seqeval entity-level micro precision, recall, F1 and a per-type report (default conlleval mode).

    Returns:
        ``{"precision", "recall", "f1", "per_type": {type: {"precision", "recall", "f1-score", "support"}}}``.
    """
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {k: {m: float(v) for m, v in row.items()} for k, row in report.items() if "avg" not in k}
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "per_type": per_type,
    }


def entities(words: list[str], tags: list[str]) -> list[dict]:
    """Entities of one post: ``{"type", "start", "end" (exclusive word index), "text"}`` in reading order."""
    return [
        {"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start : end + 1])}
        for kind, start, end in get_entities(tags)
    ]
