"""tpm_fast.reference.crf against brute-force path enumeration and pytorch-crf."""

from __future__ import annotations

import pytest
import torch
import torchcrf

from tests.oracles import brute_force_crf, viterbi_tie_case
from tpm_fast.reference.crf import crf_gold_score, crf_log_likelihood, crf_log_partition, crf_viterbi

METHODS = ["auto", "exp", "log"]


def _inputs(b, n, t, seed, dtype=torch.float64, scale=1.0, trans_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    em = (torch.randn(b, n, t, generator=g, dtype=torch.float64) * scale).to(dtype)
    params = [torch.randn(*s, generator=g, dtype=torch.float64) * trans_scale for s in ((t,), (t,), (t, t))]
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    if b > 1:
        lengths[-1] = 1
    mask = torch.arange(n) < lengths.unsqueeze(1)  # shape: (B, n)
    tags = torch.randint(0, t, (b, n), generator=g)
    return em, tags, mask, params


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b,n,t", [(1, 1, 1), (1, 1, 3), (2, 3, 2), (3, 4, 3), (5, 3, 4), (2, 5, 2)])
def test_log_partition_and_grads_match_brute_force(b, n, t, method):
    em, tags, mask, params = _inputs(b, n, t, seed=b * 100 + n * 10 + t)
    em.requires_grad_(True)
    params = [p.requires_grad_(True) for p in params]
    ours = crf_log_partition(em, mask, *params, method=method)
    ref, _ = brute_force_crf(em, mask, *params)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_ours = torch.autograd.grad((ours * w).sum(), [em, *params], materialize_grads=True)
    g_ref = torch.autograd.grad((ref * w).sum(), [em, *params], materialize_grads=True)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("b,n,t", [(1, 1, 3), (3, 4, 3), (4, 5, 2), (2, 3, 5)])
def test_viterbi_and_likelihood_match_brute_force(b, n, t):
    em, tags, mask, params = _inputs(b, n, t, seed=7 + b + n + t)
    log_z, best = brute_force_crf(em, mask, *params)
    paths, lengths = crf_viterbi(em, mask, *params)
    assert paths.dtype == torch.long and lengths.tolist() == mask.sum(1).tolist()
    assert [row[:k] for row, k in zip(paths.tolist(), lengths.tolist())] == best
    assert (paths[~mask] == 0).all()
    llh = crf_log_likelihood(em, tags, mask, *params)
    torch.testing.assert_close(llh, crf_gold_score(em, tags, mask, *params) - log_z, rtol=1e-10, atol=1e-10)
    best_llh = crf_log_likelihood(em, paths, mask, *params)
    assert (best_llh >= llh - 1e-12).all() and (best_llh <= 0).all()


def _torchcrf(params, dtype=torch.float64):
    crf = torchcrf.CRF(params[2].shape[0], batch_first=True)
    crf.load_state_dict(dict(zip(["start_transitions", "end_transitions", "transitions"], params)))
    return crf.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "b,n,t,scale", [(1, 1, 10, 1.0), (7, 13, 10, 1.0), (32, 17, 5, 1.0), (3, 31, 11, 1.0), (4, 9, 10, 1e4)]
)
def test_matches_pytorch_crf_fp64(b, n, t, method, scale):
    em, tags, mask, params = _inputs(b, n, t, seed=n * t, scale=scale)
    crf = _torchcrf(params)
    em.requires_grad_(True)
    ours = crf_log_likelihood(em, tags, mask, *crf.parameters(), method=method)
    ref = crf(em, tags, mask, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-9 * scale)
    g_ours = torch.autograd.grad(ours.sum(), [em, *crf.parameters()], materialize_grads=True)
    g_ref = torch.autograd.grad(ref.sum(), [em, *crf.parameters()], materialize_grads=True)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
    paths, lengths = crf_viterbi(em, mask, *crf.parameters())
    assert [row[:k] for row, k in zip(paths.tolist(), lengths.tolist())] == crf.decode(em, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_ties_broken_like_pytorch_crf(seed):
    em, mask, params = viterbi_tie_case(seed)
    paths, lengths = crf_viterbi(em, mask, *params)
    expected = _torchcrf(params, torch.float32).decode(em, mask)
    assert [row[:k] for row, k in zip(paths.tolist(), lengths.tolist())] == expected


@pytest.mark.parametrize("trans_value", [-1e4, float("-inf")])
def test_wide_span_transitions_use_exact_log_space(trans_value):
    """Constraint-style transitions (forbidden = -1e4 / -inf) exceed the exp-space span: "auto" must stay exact."""
    em, tags, mask, params = _inputs(3, 4, 3, seed=5, scale=30.0)
    params[2][0, 1] = trans_value  # forbid 0 -> 1
    params[1][2] = -1e4 if trans_value == -1e4 else 0.0
    log_z, best = brute_force_crf(em, mask, *params)
    torch.testing.assert_close(crf_log_partition(em, mask, *params), log_z, rtol=1e-10, atol=1e-10)
    paths, lengths = crf_viterbi(em, mask, *params)
    assert [row[:k] for row, k in zip(paths.tolist(), lengths.tolist())] == best


def _rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,n,t", [(8, 23, 10), (1, 1, 7)])
def test_low_precision_error_within_pytorch_crf_own_error(b, n, t, dtype):
    em, tags, mask, params = _inputs(b, n, t, seed=3, scale=3.0)
    em_lp = em.to(dtype).requires_grad_(True)
    em64 = em_lp.detach().double().requires_grad_(True)  # the exact input the low-precision runs see
    params = [p.to(dtype).double() for p in params]
    crf64 = _torchcrf(params)
    ref = crf64(em64, tags, mask, reduction="none")
    g_ref = torch.autograd.grad(ref.sum(), [em64, *crf64.parameters()], materialize_grads=True)
    crf_lp = _torchcrf(params, dtype)
    base = crf_lp(em_lp, tags, mask, reduction="none")
    g_base = torch.autograd.grad(base.sum(), [em_lp, *crf_lp.parameters()], materialize_grads=True)
    lp_params = [p.detach().clone().requires_grad_(True) for p in crf_lp.parameters()]
    ours = crf_log_likelihood(em_lp, tags, mask, *lp_params)
    assert ours.dtype == torch.float32
    g_ours = torch.autograd.grad(ours.sum(), [em_lp, *lp_params], materialize_grads=True)
    assert g_ours[0].dtype == dtype
    floor = 1e-6
    assert _rel_err(ours, ref) <= 2 * _rel_err(base, ref) + floor
    for a, lp, r in zip(g_ours, g_base, g_ref):
        assert _rel_err(a, r) <= 3 * _rel_err(lp, r) + floor


def test_padding_tags_are_ignored_and_padding_emissions_do_not_leak():
    em, tags, mask, params = _inputs(4, 6, 5, seed=11)
    base = crf_log_likelihood(em, tags, mask, *params)
    em2, tags2 = em.clone(), tags.clone()
    em2[~mask] = float("nan")
    tags2[~mask] = -100
    for method in METHODS:
        torch.testing.assert_close(crf_log_likelihood(em2, tags2, mask, *params, method=method), base)
    assert crf_viterbi(em2, mask, *params)[0].equal(crf_viterbi(em, mask, *params)[0])


@pytest.mark.parametrize(
    "change,msg",
    [
        ("first_off", "first timestep"),
        ("not_left_aligned", "left-aligned"),
        ("tag_range", "tags under the mask"),
        ("tag_dtype", "torch.long"),
        ("mask_shape", "mask must have shape"),
        ("emissions_2d", "3-d float"),
        ("trans_shape", "transitions"),
    ],
)
def test_bad_inputs_raise(change, msg):
    em, tags, mask, params = _inputs(3, 4, 3, seed=2)
    mask = torch.ones_like(mask)
    if change == "first_off":
        mask[1, 0] = False
    elif change == "not_left_aligned":
        mask[1, 2] = False
    elif change == "tag_range":
        tags[2, 3] = 3
    elif change == "tag_dtype":
        tags = tags.int()
    elif change == "mask_shape":
        mask = mask[:, :2]
    elif change == "emissions_2d":
        em = em[0]
    elif change == "trans_shape":
        params[2] = params[2][:2]
    with pytest.raises(ValueError, match=msg):
        crf_log_likelihood(em, tags, mask, *params)
    if change not in ("tag_range", "tag_dtype"):
        with pytest.raises(ValueError, match=msg):
            crf_viterbi(em, mask, *params)


def test_validate_false_checks_nothing():
    """validate=False skips every check (for callers that validated already): a first-off mask runs, a uint8 mask is
    taken as bool; with a valid input the result is the validated one."""
    em, tags, mask, params = _inputs(3, 4, 3, seed=4)
    bad = mask.clone()
    bad[1, 0] = False
    with pytest.raises(ValueError, match="first timestep"):
        crf_log_partition(em, bad, *params)
    assert crf_log_partition(em, bad, *params, validate=False).shape == (3,)
    assert crf_viterbi(em, bad, *params, validate=False)[0].shape == (3, 4)
    u8 = mask.to(torch.uint8)
    torch.testing.assert_close(
        crf_log_likelihood(em, tags, u8, *params, validate=False), crf_log_likelihood(em, tags, mask, *params)
    )
    assert crf_viterbi(em, u8, *params, validate=False)[0].equal(crf_viterbi(em, mask, *params)[0])


def test_viterbi_nan_scores_give_tags_in_range():
    """NaN scores: every tag is in [0, T) (torch.max picks a NaN's index), padding 0; the path is unspecified."""
    em, _, mask, params = _inputs(4, 6, 5, seed=6)
    em[0] = float("nan")
    em[1, 2:4] = float("nan")
    params[2][3, 1] = float("nan")
    paths, lengths = crf_viterbi(em, mask, *params)
    assert ((paths >= 0) & (paths < 5)).all() and (paths[~mask] == 0).all()
    assert lengths.tolist() == mask.sum(1).tolist()
