"""Entity confidence from the CRF: the marginal probability that a span of positions carries given tags.

For a linear-chain CRF with scores ``start``, ``transitions``, ``end`` and emissions ``E``, the probability that the
positions ``s..e`` (inclusive) of a sequence carry the tags ``y_s..y_e`` (whatever the tags elsewhere) is

    P(y_s..y_e | x) = alpha_s(y_s) * prod_{i=s+1..e} exp(transitions[y_{i-1}, y_i] + E_i[y_i]) * beta_e(y_e) / Z

with the forward and backward sums ``alpha`` / ``beta`` in probability space (``alpha_s`` including ``E_s``). The same
number is the partition function of the CRF with every other tag removed at ``s..e`` (its emissions set to -inf)
divided by ``Z``: that is how it is computed here, by the CRF's own log-partition (the reference forward algorithm,
in fp64), with no second CRF implementation. For a decoded entity, tpm-predict takes the span of word pieces from
the first piece of its first word to the last piece of its last word, and the Viterbi tags there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpm_fast.reference.crf import crf_log_partition


@torch.no_grad()
def span_log_probs(
    emissions: Tensor, mask: Tensor, tags: Tensor, spans: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> Tensor:
    """log P(positions ``s..e`` of sequence ``b`` carry ``tags[b, s..e]``) for each span ``(b, s, e)``.

    Args:
        emissions: (B, n, T) float emission scores.
        mask: (B, n) bool, left-aligned, ``mask[:, 0]`` all True.
        tags: (B, n) long tags in [0, T) (e.g. the Viterbi path; read only inside the spans).
        spans: (E, 3) long rows ``(b, s, e)``, ``0 <= s <= e < length of sequence b`` (inclusive ends).
        start, end: (T,) start and end scores; transitions: (T, T), ``[i, j]`` = score of tag i -> tag j (with any
            forbidden moves already set, as ``CRF._params`` returns them).

    Returns:
        (E,) fp64 log probabilities (<= 0 up to rounding); exp of it is the span's marginal probability.

    Raises:
        ValueError: a span outside its sequence or with ``s > e``.
    """
    spans = spans.to(device=emissions.device, dtype=torch.long).reshape(-1, 3)
    if spans.numel() == 0:
        return emissions.new_zeros(0, dtype=torch.float64)
    em = emissions.double()
    params = [p.detach().double() for p in (start, end, transitions)]
    rows, first, last = spans.unbind(1)  # shape: (E,) each
    lengths = mask.sum(1)[rows]  # shape: (E,)
    if bool(((first < 0) | (first > last) | (last >= lengths) | (rows < 0) | (rows >= em.shape[0])).any()):
        raise ValueError(f"spans must satisfy 0 <= s <= e < the sequence's length, got {spans.tolist()}")
    log_z = crf_log_partition(em, mask, *params)  # shape: (B,)
    positions = torch.arange(em.shape[1], device=em.device)  # shape: (n,)
    inside = (positions >= first[:, None]) & (positions <= last[:, None])  # shape: (E, n)
    keep = torch.nn.functional.one_hot(tags[rows], em.shape[2]).bool() | ~inside[:, :, None]  # shape: (E, n, T)
    constrained = em[rows].masked_fill(~keep, float("-inf"))  # shape: (E, n, T)
    return crf_log_partition(constrained, mask[rows], *params) - log_z[rows]  # shape: (E,)
