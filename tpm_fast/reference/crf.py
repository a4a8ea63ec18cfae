"""Pure-PyTorch linear-chain CRF, vectorized over the batch (loops over time only).

Semantics are those of pytorch-crf (``torchcrf.CRF``): ``transitions[i, j]`` scores moving from tag ``i`` to tag
``j``, ``start[j]`` / ``end[j]`` score the first / last tag, masks are (B, n) bool with ``mask[:, 0]`` all True.
Masks must be left-aligned (a prefix of each row is real); tags under ``mask == False`` are ignored (any value,
e.g. -100, is accepted there). Everything is computed in fp32 (fp64 when an input is fp64), whatever the dtype of
the emissions (fp16 / bf16 accepted).

The log partition has two exact implementations:

- ``"exp"`` (default when safe): the forward recursion in scaled probability space, one ``(B, T) @ (T, T)`` matmul
  per step, and a hand-written backward (forward-backward marginals; the transition gradient is one matmul over all
  steps). It is exact to rounding as long as every column of ``transitions`` and ``end`` spans less than
  ``_EXP_SPAN[dtype]`` (so no needed term underflows); deciding that costs one host sync on the (T, T) parameters.
- ``"log"``: the textbook log-space recursion with autograd through the time loop (used for wide spans, e.g.
  -1e4 / -inf constraint transitions).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_inputs", "check_shapes", "crf_log_likelihood", "crf_log_partition", "crf_viterbi", "crf_gold_score"]

# Largest column span of the transitions (and span of `end`) for which the scaled exp-space recursion keeps every
# term that matters above the underflow threshold with a wide margin (fp32 underflows near exp(-87), fp64 exp(-708)).
_EXP_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_shapes(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, tags: Tensor | None = None
) -> None:
    """Validate shapes and dtypes (no host sync).

    Raises:
        ValueError: naming the first problem.
    """
    if emissions.dim() != 3 or not emissions.is_floating_point():
        raise ValueError(f"emissions must be a 3-d float tensor (B, n, T), got {emissions.dim()}-d {emissions.dtype}")
    b, n, t = emissions.shape
    if n == 0:
        raise ValueError("sequence length must be >= 1")
    if start.shape != (t,) or end.shape != (t,) or transitions.shape != (t, t):
        raise ValueError(
            f"expected start/end of shape ({t},) and transitions ({t}, {t}) for {t} tags, got "
            f"{tuple(start.shape)}, {tuple(end.shape)}, {tuple(transitions.shape)}"
        )
    for p in (start, end, transitions):
        if not p.is_floating_point():
            raise ValueError(f"start, end and transitions must be float tensors, got {p.dtype}")
    if mask.shape != (b, n):
        raise ValueError(f"mask must have shape {(b, n)} (emissions' first two dims), got {tuple(mask.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"mask must be bool (or uint8), got {mask.dtype}")
    if tags is not None:
        if tags.shape != (b, n):
            raise ValueError(f"tags must have shape {(b, n)} (emissions' first two dims), got {tuple(tags.shape)}")
        if tags.dtype != torch.long:
            raise ValueError(f"tags must be torch.long, got {tags.dtype}")


def check_inputs(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, tags: Tensor | None = None
) -> Tensor:
    """`check_shapes`, then the mask and tag contents (one host sync); return the mask as bool.

    Raises:
        ValueError: naming the first problem (shape, dtype, first timestep off, mask not left-aligned, tag range).
    """
    check_shapes(emissions, mask, start, end, transitions, tags)
    mask = mask.bool()
    checks = [mask[:, 0].all(), ~(mask[:, 1:] & ~mask[:, :-1]).any()]
    if tags is not None:
        checks.append(((tags >= 0) & (tags < emissions.shape[2]) | ~mask).all())
    ok = torch.stack(checks).tolist()
    if not ok[0]:
        raise ValueError("mask of the first timestep must all be on")
    if not ok[1]:
        raise ValueError("mask must be left-aligned (each row: True then False)")
    if tags is not None and not ok[2]:
        raise ValueError(f"tags under the mask must lie in [0, {emissions.shape[2]})")
    return mask


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask.bool()


def crf_gold_score(emissions: Tensor, tags: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor):
    """Unnormalized score of the given tag paths (no validation; see `crf_log_likelihood`). Returns (B,) float."""
    dtype = _compute_dtype(emissions, start, end, transitions)
    em = emissions.to(dtype)
    tags = torch.where(mask, tags, 0)  # shape: (B, n), padded tags -> 0 (ignored below)
    last = mask.sum(1, keepdim=True) - 1  # shape: (B, 1)
    em_gold = em.gather(2, tags.unsqueeze(2)).squeeze(2)  # shape: (B, n)
    tr_gold = transitions.to(dtype)[tags[:, :-1], tags[:, 1:]]  # shape: (B, n-1)
    score = start.to(dtype)[tags[:, 0]] + end.to(dtype)[tags.gather(1, last).squeeze(1)]  # shape: (B,)
    score = score + torch.where(mask, em_gold, 0).sum(1) + torch.where(mask[:, 1:], tr_gold, 0).sum(1)
    return score


def _log_partition_log(em: Tensor, mask: Tensor, start: Tensor, end: Tensor, trans: Tensor) -> Tensor:
    """Log-space forward algorithm, autograd through the time loop. em (B, n, T) in the compute dtype."""
    alpha = start + em[:, 0]  # shape: (B, T)
    for t in range(1, em.shape[1]):
        nxt = torch.logsumexp(alpha.unsqueeze(2) + trans, dim=1) + em[:, t]  # shape: (B, T)
        alpha = torch.where(mask[:, t, None], nxt, alpha)
    return torch.logsumexp(alpha + end, dim=1)  # shape: (B,)


class _LogPartitionExp(torch.autograd.Function):
    """Scaled exp-space forward algorithm with a forward-backward (marginals) backward pass, time-major inside."""

    @staticmethod
    def forward(ctx, em: Tensor, mask: Tensor, start: Tensor, end: Tensor, trans: Tensor) -> Tensor:
        b, n, t = em.shape
        mask_t = mask.t().unsqueeze(2)  # shape: (n, B, 1)
        cmax = trans.amax(0)  # shape: (T,) per-column max of the transitions
        e_tr = (trans - cmax).exp()  # shape: (T, T) in (0, 1], every column has a 1
        shift = torch.cat([start.unsqueeze(0), cmax.expand(n - 1, t)]).unsqueeze(1)  # shape: (n, 1, T)
        a = torch.where(mask_t, em.transpose(0, 1), 0) + shift  # shape: (n, B, T)
        m_s = a.amax(2, keepdim=True)  # shape: (n, B, 1)
        x = (a - m_s).exp_().contiguous()  # shape: (n, B, T) scaled emissions, max 1 per step
        p = torch.empty_like(x)  # shape: (n, B, T) normalized alphas: p[s] ~ exp(alpha_s)
        z = torch.empty_like(m_s)  # shape: (n, B, 1) per-step normalizers
        q = x[0]
        for s in range(n):
            if s:
                q = torch.mm(p[s - 1], e_tr).mul_(x[s])  # shape: (B, T)
            torch.sum(q, 1, keepdim=True, out=z[s])
            torch.div(q, z[s], out=p[s])
        last = (mask.sum(1) - 1).view(1, b, 1)  # shape: (1, B, 1)
        emax = end.amax()
        e_end = (end - emax).exp()  # shape: (T,)
        p_last = p.gather(0, last.expand(1, b, t)).squeeze(0)  # shape: (B, T)
        log_z = torch.where(mask_t, z.log() + m_s, 0).sum((0, 2))  # shape: (B,)
        log_z = log_z + (p_last @ e_end).log() + emax
        ctx.save_for_backward(mask_t, e_tr, e_end, x, p, z, last)
        return log_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        mask_t, e_tr, e_end, x, p, z, last = ctx.saved_tensors
        n, b, t = x.shape
        is_last = torch.arange(n, device=x.device).view(n, 1, 1) == last  # shape: (n, B, 1)
        r = torch.empty_like(p)  # shape: (n, B, T) scaled betas: r[s] ~ exp(beta_s)
        r[n - 1] = e_end
        e_tr_t = e_tr.t()
        for s in range(n - 2, -1, -1):
            u = x[s + 1] * r[s + 1]  # shape: (B, T)
            u.div_(u.sum(1, keepdim=True))
            torch.where(is_last[s], e_end, torch.mm(u, e_tr_t), out=r[s])
        pr = p * r  # shape: (n, B, T)
        d = pr.sum(2, keepdim=True)  # shape: (n, B, 1)
        g = grad.view(1, b, 1)
        gamma = torch.where(mask_t, pr * (g / d), 0)  # shape: (n, B, T) unary marginals * grad
        # pairwise marginal (s >= 1): xi[i, j] = p[s-1, i] * e_tr[i, j] * w[s, j], w = x r / (z d)
        w = torch.where(mask_t[1:], x[1:] * r[1:] * (g / (z[1:] * d[1:])), 0)  # shape: (n-1, B, T)
        g_trans = e_tr * (p[:-1].reshape(-1, t).t() @ w.reshape(-1, t))  # shape: (T, T)
        g_start = gamma[0].sum(0)
        g_end = gamma.gather(0, last.expand(1, b, t)).squeeze(0).sum(0)
        return gamma.transpose(0, 1), None, g_start, g_end, g_trans


def crf_log_partition(
    emissions: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    method: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Log partition function log Z of a linear-chain CRF.

    Args:
        emissions: (B, n, T) float (fp16/bf16/fp32/fp64) emission scores.
        mask: (B, n) bool, True on real tokens, left-aligned, ``mask[:, 0]`` all True.
        start: (T,) start scores; end: (T,) end scores; transitions: (T, T), ``[i, j]`` = score of i -> j.
        method: "auto" (exp-space when the transition spans allow it, else log-space), "exp" or "log".
        validate: `check_inputs` first (one host sync); False checks nothing (for callers that already did).

    Returns:
        (B,) fp32 (fp64 if any input is fp64) log Z, differentiable w.r.t. emissions and the three parameters.
    """
    mask = check_inputs(emissions, mask, start, end, transitions) if validate else _as_bool(mask)
    return _log_partition(emissions, mask, start, end, transitions, method)


def _log_partition(emissions, mask, start, end, transitions, method: str) -> Tensor:
    dtype = _compute_dtype(emissions, start, end, transitions)
    em, start, end, trans = (x.to(dtype) for x in (emissions, start, end, transitions))
    if method == "auto":
        with torch.no_grad():
            span = torch.stack([(trans.amax(0) - trans.amin(0)).amax(), end.amax() - end.amin()]).amax()
            method = "exp" if bool(span <= _EXP_SPAN[dtype]) else "log"  # NaN -> log
    if method == "exp":
        return _LogPartitionExp.apply(em, mask, start, end, trans)
    if method == "log":
        return _log_partition_log(em, mask, start, end, trans)
    raise ValueError(f"method must be 'auto', 'exp' or 'log', got {method!r}")


def crf_log_likelihood(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    start: Tensor,
    end: Tensor,
    transitions: Tensor,
    *,
    method: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Log-likelihood log p(tags | emissions) per sequence (pytorch-crf ``reduction="none"``).

    Args:
        emissions: (B, n, T) float emission scores (any float dtype; computed in fp32 or fp64).
        tags: (B, n) long gold tags in [0, T) where ``mask`` is True (ignored elsewhere).
        mask: (B, n) bool, left-aligned, first timestep all True.
        start, end: (T,); transitions: (T, T) with ``[i, j]`` = score of tag i -> tag j.
        method, validate: see `crf_log_partition`.

    Returns:
        (B,) fp32 (fp64 if any input is fp64) gold path score minus log partition.
    """
    mask = check_inputs(emissions, mask, start, end, transitions, tags=tags) if validate else _as_bool(mask)
    gold = crf_gold_score(emissions, tags, mask, start, end, transitions)
    return gold - _log_partition(emissions, mask, start, end, transitions, method)


@torch.no_grad()
def crf_viterbi(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor, *, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """Best tag paths, with the same arithmetic and tie-breaking as ``torchcrf.CRF.decode``.

    Args:
        emissions: (B, n, T) float; mask: (B, n) bool, left-aligned, first timestep all True;
        start, end: (T,); transitions: (T, T). validate: see `crf_log_partition`.

    Returns:
        tags: (B, n) long, best path on real tokens, 0 on padding; lengths: (B,) long. The backtrace is vectorized
        (gather per step, no per-sequence loop, no host sync beyond input validation). NaN scores: ``torch.max``
        picks a NaN's index, so every tag is an index of the tag dimension, in [0, T) (which path is unspecified).
    """
    mask = check_inputs(emissions, mask, start, end, transitions) if validate else _as_bool(mask)
    dtype = _compute_dtype(emissions, start, end, transitions)
    em, start, end, trans = (x.to(dtype) for x in (emissions, start, end, transitions))
    b, n, t = em.shape
    trans_t = trans.t()  # shape: (T_to, T_from)
    em_t = em.transpose(0, 1).unsqueeze(3)  # shape: (n, B, T_to, 1)
    scores = torch.empty(n, b, t, dtype=dtype, device=em.device)  # shape: (n, B, T) best score ending in each tag
    history = torch.empty(n, b, t, dtype=torch.long, device=em.device)  # shape: (n, B, T) best previous tag
    torch.add(start, em[:, 0], out=scores[0])
    for s in range(1, n):
        # same sums as torchcrf ((score_i + trans_ij) + em_j, first max over i), laid out (B, j, i) for speed
        nxt = scores[s - 1].unsqueeze(1) + trans_t  # shape: (B, T, T)
        nxt += em_t[s]
        torch.max(nxt, 2, out=(scores[s], history[s]))
    lengths = mask.sum(1)  # shape: (B,)
    last = (lengths - 1).view(1, b, 1)
    best_last = (scores.gather(0, last.expand(1, b, t)).squeeze(0) + end).max(dim=1).indices  # shape: (B,)
    # past each sequence's end, "previous tag" is its best last tag: then one gather per step backtraces all rows
    steps = torch.arange(n, device=em.device).view(n, 1, 1)
    history = torch.where(steps >= last + 1, best_last.view(1, b, 1), history)
    out = torch.empty(n, b, 1, dtype=torch.long, device=em.device)  # shape: (n, B, 1)
    out[n - 1] = cur = best_last.view(b, 1)
    for s in range(n - 2, -1, -1):
        cur = torch.gather(history[s + 1], 1, cur, out=out[s])  # tag at s given the tag at s + 1
    return out.squeeze(2).t().masked_fill(~mask, 0), lengths
