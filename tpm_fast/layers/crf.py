"""`CRF`: drop-in replacement for ``torchcrf.CRF`` (same parameters, state_dict, forward and decode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tpm_fast.ops import crf as ops
from tpm_fast.ops.backend import check_backend

_REDUCTIONS = ("none", "sum", "mean", "token_mean")
FORBIDDEN = -10000.0
"""Score given to a forbidden transition (exp(-1e4) is 0 in every float type; gradients stay finite)."""


class CRF(nn.Module):
    """Linear-chain CRF with pytorch-crf's interface, computed by `tpm_fast.ops.crf` (Triton kernels on CUDA).

    Args:
        num_tags: number of tags T.
        batch_first: inputs are (B, n, ...) when True, (n, B, ...) when False (pytorch-crf's default).
        backend: ``"auto"`` (Triton on CUDA, native C++ on CPU, else the PyTorch reference), ``"triton"``,
            ``"native"`` or ``"reference"``.

    Parameters ``start_transitions`` (T,), ``end_transitions`` (T,), ``transitions`` (T, T) (``[i, j]`` = i -> j),
    initialized uniform(-0.1, 0.1); a ``torchcrf.CRF`` state_dict loads as is. Masks are (B, n) bool, left-aligned,
    with the first timestep on: checked at each call (one host sync, as pytorch-crf does) unless ``validate=False``.
    Each call validates (or not) and picks the backend once, in the `tpm_fast.ops.crf` op it calls.
    """

    def __init__(self, num_tags: int, batch_first: bool = False, *, backend: str = "auto") -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.backend = check_backend(backend)
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        # allowed-transition constraints (from_labels): not in the state_dict, so torchcrf checkpoints load as is
        self.register_buffer("allowed_start", None, persistent=False)  # shape: (T,) bool
        self.register_buffer("allowed_transitions", None, persistent=False)  # shape: (T, T) bool
        self.reset_parameters()

    @classmethod
    def from_labels(cls, labels: Sequence[str], scheme: str = "BIO", **kwargs) -> CRF:
        """A CRF over ``labels`` that forbids what ``scheme`` forbids, in training and decoding.

        BIO: ``I-X`` may only follow ``B-X`` or ``I-X`` and never starts a sequence; every other tag (``O``, ``B-X``,
        and tags outside the scheme such as ``X`` or ``[CLS]``) may follow anything. Forbidden moves score
        :data:`FORBIDDEN`, so no decoded path takes one and their parameters get no gradient; a gold path that takes
        one (data not in BIO) gets a log-likelihood near -1e4: repair such data (IOB1 -> IOB2) first.

        Args:
            labels: tag names in id order, e.g. ``["O", "B-PER", "I-PER", ...]``.
            scheme: only ``"BIO"`` (also called IOB2).
            **kwargs: ``batch_first``, ``backend``.
        """
        if scheme.upper() not in ("BIO", "IOB2"):
            raise ValueError(f"unknown tagging scheme {scheme!r}: only 'BIO' is supported")
        crf = cls(len(labels), **kwargs)
        inside = [lab[2:] if lab.startswith("I-") else None for lab in labels]
        allowed = torch.ones(len(labels), len(labels), dtype=torch.bool)  # shape: (T_from, T_to)
        for j, etype in enumerate(inside):
            if etype is not None:
                allowed[:, j] = torch.tensor([lab in (f"B-{etype}", f"I-{etype}") for lab in labels])
        crf.allowed_transitions = allowed
        crf.allowed_start = torch.tensor([etype is None for etype in inside])
        return crf

    def reset_parameters(self) -> None:
        for p in (self.start_transitions, self.end_transitions, self.transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        constrained = ", constrained" if self.allowed_transitions is not None else ""
        return f"num_tags={self.num_tags}, batch_first={self.batch_first}, backend={self.backend}{constrained}"

    def _inputs(self, emissions: Tensor, tags: Tensor | None, mask: Tensor | None, validate: bool):
        """Batch-major emissions (B, n, T), tags (B, n) and mask (B, n) (default: all on); with ``validate`` the
        emissions' rank and tag count are checked here (the rest by the op)."""
        if validate and (emissions.dim() != 3 or emissions.size(2) != self.num_tags):
            raise ValueError(f"emissions must be 3-d with last dim {self.num_tags}, got {tuple(emissions.shape)}")
        if not self.batch_first:
            emissions = emissions.transpose(0, 1)
            tags = None if tags is None else tags.transpose(0, 1)
            mask = None if mask is None else mask.transpose(0, 1)
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        return emissions, tags, mask

    def _params(self) -> tuple[Tensor, Tensor, Tensor]:
        """start (T,), end (T,), transitions (T, T) with forbidden moves (`from_labels`) set to :data:`FORBIDDEN`
        (built once per call; their gradients are 0 there)."""
        params, allowed = self._parameters, self._buffers["allowed_transitions"]
        if len(params) == 3:  # read from the dicts: nn.Module.__getattr__ costs ~1 us an attribute on the hot path
            start, end, trans = params["start_transitions"], params["end_transitions"], params["transitions"]
        else:  # parametrized (torch.nn.utils.parametrize): through the attributes
            start, end, trans = self.start_transitions, self.end_transitions, self.transitions
        if allowed is not None:
            start = torch.where(self._buffers["allowed_start"], start, FORBIDDEN)
            trans = torch.where(allowed, trans, FORBIDDEN)
        return start, end, trans

    def forward(
        self,
        emissions: Tensor,
        tags: Tensor,
        mask: Tensor | None = None,
        reduction: str = "sum",
        *,
        validate: bool = True,
    ) -> Tensor:
        """Log-likelihood of ``tags``: emissions (.., .., T) float, tags long and mask bool in the module's layout.

        Returns (B,) for ``reduction="none"``, else a scalar (sum, mean over batch, or sum / number of real tokens).
        Computed in fp32 (fp64 if emissions are fp64); tags under a False mask are ignored.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"invalid reduction: {reduction!r}, expected one of {_REDUCTIONS}")
        emissions, tags, mask = self._inputs(emissions, tags, mask, validate)
        reduce = "sum" if reduction == "token_mean" else reduction  # none, sum and mean: by the op (fewer nodes)
        llh = ops.crf_log_likelihood(
            emissions, tags, mask, *self._params(), backend=self.backend, validate=validate, reduction=reduce
        )  # shape: (B,) for "none", else ()
        return llh / mask.sum() if reduction == "token_mean" else llh

    @torch.no_grad()
    def decode(self, emissions: Tensor, mask: Tensor | None = None, as_tensor: bool = False, *, validate: bool = True):
        """Viterbi paths: list of per-sequence tag lists (like torchcrf), or, with ``as_tensor``, batch-first
        ``(tags (B, n) long padded with 0, lengths (B,) long)`` computed without host synchronization (beyond the
        mask check, skipped with ``validate=False`` or no mask: the default mask is valid)."""
        checked = validate and mask is not None
        emissions, _, mask = self._inputs(emissions, None, mask, validate)
        tags, lengths = ops.crf_viterbi(emissions, mask, *self._params(), backend=self.backend, validate=checked)
        if as_tensor:
            return tags, lengths
        return [row[:k] for row, k in zip(tags.tolist(), lengths.tolist())]
