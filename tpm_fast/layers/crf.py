"""`CRF`: drop-in replacement for ``torchcrf.CRF`` (same parameters, state_dict, forward and decode)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tpm_fast.reference.crf import crf_log_likelihood, crf_viterbi

_REDUCTIONS = ("none", "sum", "mean", "token_mean")


class CRF(nn.Module):
    """Linear-chain CRF with pytorch-crf's interface; the math lives in `tpm_fast.reference.crf`.

    Args:
        num_tags: number of tags T.
        batch_first: inputs are (B, n, ...) when True, (n, B, ...) when False (pytorch-crf's default).

    Parameters ``start_transitions`` (T,), ``end_transitions`` (T,), ``transitions`` (T, T) (``[i, j]`` = i -> j),
    initialized uniform(-0.1, 0.1); a ``torchcrf.CRF`` state_dict loads as is.
    """

    def __init__(self, num_tags: int, batch_first: bool = False) -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.start_transitions, self.end_transitions, self.transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}, batch_first={self.batch_first}"

    def _batch_major(self, emissions: Tensor, *others: Tensor | None) -> list[Tensor | None]:
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags:
            raise ValueError(f"emissions must be 3-d with last dim {self.num_tags}, got {tuple(emissions.shape)}")
        out = [emissions, *others]
        return out if self.batch_first else [x if x is None else x.transpose(0, 1) for x in out]

    def _params(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.start_transitions, self.end_transitions, self.transitions

    def forward(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None, reduction: str = "sum") -> Tensor:
        """Log-likelihood of ``tags``: emissions (.., .., T) float, tags long and mask bool in the module's layout.

        Returns (B,) for ``reduction="none"``, else a scalar (sum, mean over batch, or sum / number of real tokens).
        Computed in fp32 (fp64 if emissions are fp64); tags under a False mask are ignored.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"invalid reduction: {reduction!r}, expected one of {_REDUCTIONS}")
        emissions, tags, mask = self._batch_major(emissions, tags, mask)
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        llh = crf_log_likelihood(emissions, tags, mask, *self._params())  # shape: (B,)
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        return llh.mean() if reduction == "mean" else llh.sum() / mask.sum()

    def decode(self, emissions: Tensor, mask: Tensor | None = None, as_tensor: bool = False):
        """Viterbi paths: list of per-sequence tag lists (like torchcrf), or, with ``as_tensor``, batch-first
        ``(tags (B, n) long padded with 0, lengths (B,) long)`` without any per-sequence Python loop."""
        emissions, mask = self._batch_major(emissions, mask)
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        tags, lengths = crf_viterbi(emissions, mask, *self._params())
        if as_tensor:
            return tags, lengths
        return [row[:k] for row, k in zip(tags.tolist(), lengths.tolist())]
