"""Paired approximate randomization test of the micro-F1 difference of two systems on the same posts.

Under the null hypothesis the two systems are exchangeable on every post: each of R random samples swaps the two
systems' predictions of each post with probability 1/2, and recomputes both micro-F1s from the summed per-post
entity counts. The p-value is two-sided with the usual add-one correction (Noreen 1989; Riezler and Maxwell 2005):
p = (c + 1) / (R + 1), c = the samples whose absolute F1 difference is at least the observed one.

Only posts where the two systems' counts differ can change a sample, so the samples draw a bit for those posts only
(numpy, in chunks of rows: R = 10000 over 5000 posts takes a fraction of a second).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # swap bits per chunk of samples (16 MB as float32): bounds the memory


@dataclass
class RandomizationResult:
    """Outcome of :func:`paired_randomization`.

    Attributes:
        f1_a, f1_b: the two systems' micro-F1 on the paired posts.
        difference: f1_a - f1_b.
        p_value: two-sided, (c + 1) / (R + 1).
        samples: R; posts: the paired posts; differing: posts whose counts differ between the systems.
    """

    f1_a: float
    f1_b: float
    difference: float
    p_value: float
    samples: int
    posts: int
    differing: int


def micro_f1(counts: np.ndarray) -> np.ndarray:
    """Micro-F1 from summed entity counts.

    Args:
        counts: (..., 3) true positives, false positives, false negatives.

    Returns:
        (...) float64: 2 TP / (2 TP + FP + FN), 0 where there are no entities at all.
    """
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def paired_randomization(a: np.ndarray, b: np.ndarray, samples: int = 10000, seed: int = 0) -> RandomizationResult:
    """Paired approximate randomization of micro-F1 over posts.

    Args:
        a, b: (N, 3) int per-post (TP, FP, FN) of systems A and B on the same N posts against the same gold
            (``tpm_fast.report.post_counts``).
        samples: R, the random samples (at least 1).
        seed: seed of the numpy generator (same inputs and seed: same p-value).

    Returns:
        :class:`RandomizationResult`.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"per-post counts must both be (N, 3); got {a.shape} and {b.shape}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    total_a, total_b = a.sum(0), b.sum(0)
    f1_a, f1_b = float(micro_f1(total_a)), float(micro_f1(total_b))
    observed = abs(f1_a - f1_b)
    delta = b - a  # what swapping a post moves from A's totals to B's (and back)
    delta = delta[np.any(delta != 0, axis=1)].astype(np.float32)  # (D, 3)
    rng = np.random.default_rng(seed)
    count = 0
    rows = max(1, CHUNK_ELEMENTS // max(1, len(delta)))
    for start in range(0, samples, rows):
        r = min(rows, samples - start)
        if len(delta):
            swap = np.unpackbits(rng.integers(0, 256, size=(r, -(-len(delta) // 8)), dtype=np.uint8), axis=1)
            # (r, 3): the swapped posts' summed deltas (float32 is exact: counts stay far below 2**24)
            moved = (swap[:, : len(delta)].astype(np.float32) @ delta).astype(np.float64)
        else:
            moved = np.zeros((r, 3))
        diff = np.abs(micro_f1(total_a + moved) - micro_f1(total_b - moved))
        count += int(np.count_nonzero(diff >= observed - 1e-12))  # ties count (identical systems: p = 1)
    return RandomizationResult(f1_a, f1_b, f1_a - f1_b, (count + 1) / (samples + 1), samples, len(a), len(delta))
