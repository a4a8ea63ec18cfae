"""The native C++ CPU CRF kernels (``csrc/crf_cpu.cpp``, registered as ``torch.ops.tpm_fast_native.crf_*``) against
the contract of the Triton launchers (`tpm_fast.kernels.crf`): values and gradients against the reference
(`tpm_fast.reference.crf`, gradients by autograd in fp64), Viterbi paths against the reference and pytorch-crf
(same fp32 sums, so exactly equal), the launchers themselves where they run (GPU, or TRITON_INTERPRET=1 as set by
conftest), per-sequence parameter partials, padding, dtypes, strides, hard numerics (-1e4 / -inf constraints,
|emissions| ~ 1e4, columns far below a step's max, which the kernels' factorized fast path must hand to the
max-subtracted form, wide transition spans), NaN Viterbi, out-of-range tags and determinism across thread counts.
Skips without the extension ``tpm_fast._C``."""

from __future__ import annotations

import os

import pytest
import torch
import torchcrf

from tests.oracles import (
    confident_crf_case,
    crf_grad_errors,
    crf_inputs,
    native_cuda_crf_unavailable,
    viterbi_tie_case,
)
from tpm_fast.reference import crf as ref

pytest.importorskip("tpm_fast._C")
native = torch.ops.tpm_fast_native

F32, F64 = torch.float32, torch.float64


def _inputs(b, n, t, seed, dtype=torch.float32, scale=2.0, trans_scale=1.0, lengths=None):
    """`tests.oracles.crf_inputs` on CPU, emissions scaled by 2 unless told."""
    return crf_inputs(b, n, t, seed, dtype, scale, trans_scale, lengths)


def _rel_err(x, r):
    """max |x - r| / max(max |r|, 1)."""
    return ((x.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1.0)).item()


def _reference(em, tags, mask, params, dtype=F64):
    """Reference ``gold - log Z`` (or ``log Z`` without tags) on leaves cast to ``dtype``: (out (B,), leaves)."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (em, *params)]
    if tags is None:
        out = ref.crf_log_partition(leaves[0], mask, *leaves[1:], validate=False)
    else:
        out = ref.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], validate=False)
    return out, leaves


def _reference_partials(em, tags, mask, params, w):
    """fp64 reference gradients of ``sum_b w_b out_b``: emissions (B, n, T) and per-sequence parameter partials
    (B, 2T + T*T) laid out [start | end | transitions] (one autograd pass per sequence)."""
    out, leaves = _reference(em, tags, mask, params)
    g_em = torch.autograd.grad(out, leaves[0], w, retain_graph=True)[0]
    rows = []
    for b in range(out.shape[0]):
        gs = torch.autograd.grad(out[b] * w[b], leaves[1:], retain_graph=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return out, g_em, torch.stack(rows)


def _alpha_fp64(em, mask, start, trans):
    """The kernels' saved alphas in fp64: forward log-potentials (B, n, T) by the textbook recursion, each step shifted
    by its max over the tags (the kernels' contract: the shift drops out of every softmax), 0 on rows t >= length."""
    em, start, trans = em.double(), start.double(), trans.double()
    b, n, t = em.shape
    alpha = torch.zeros(b, n, t, dtype=F64)
    alpha[:, 0] = start + em[:, 0]
    for s in range(1, n):
        alpha[:, s] = torch.logsumexp(alpha[:, s - 1].unsqueeze(2) + trans, dim=1) + em[:, s]
    alpha = alpha - alpha.amax(2, keepdim=True)
    return alpha.masked_fill(~mask.unsqueeze(2), 0.0)


def _paths(tags, lengths):
    return [row[:k] for row, k in zip(tags.tolist(), lengths.tolist())]


def _torchcrf_decode(em, mask, params):
    crf = torchcrf.CRF(params[2].shape[0], batch_first=True)
    crf.load_state_dict(dict(zip(["start_transitions", "end_transitions", "transitions"], params)))
    return crf.decode(em.float(), mask)


# ---------------------------------------------------------------------------------------------- values and gradients

CASES = [  # b, n, t, dtype, lengths (None: random with a full row and a length-1 row)
    (1, 1, 1, torch.float32, None),
    (3, 13, 1, torch.float32, None),  # one tag
    (3, 2, 2, torch.float32, None),
    (5, 7, 5, torch.float32, None),
    (7, 37, 10, torch.float32, None),
    (3, 9, 10, torch.float32, [9, 9, 9]),  # all rows full
    (4, 1, 10, torch.float32, None),  # one step
    (5, 11, 17, torch.float32, None),  # padded tag blocks
    (3, 6, 64, torch.float32, None),
    (4, 9, 10, torch.bfloat16, None),
    (4, 9, 5, torch.float16, None),
]


@pytest.mark.parametrize("with_tags", [True, False])
@pytest.mark.parametrize("b,n,t,dtype,lengths", CASES)
def test_forward_backward_match_reference(b, n, t, dtype, lengths, with_tags):
    em, tags, mask, params = _inputs(b, n, t, seed=b * 1000 + n * 10 + t, dtype=dtype, lengths=lengths)
    tags = tags if with_tags else None
    w = torch.randn(b, generator=torch.Generator().manual_seed(t), dtype=F64)
    expected, g_em_ref, g_par_ref = _reference_partials(em, tags, mask, params, w)

    out, alpha = native.crf_forward(em, tags, mask, *params)
    assert out.shape == (b,) and out.dtype == torch.float32
    assert alpha.shape == (b, n, t) and alpha.dtype == torch.float32 and alpha.is_contiguous()
    assert _rel_err(out, expected) <= 1e-5
    assert _rel_err(alpha, _alpha_fp64(em, mask, params[0], params[2])) <= 1e-5
    assert (alpha[~mask] == 0).all()

    g_em, g_par = native.crf_backward(w.float(), tags, mask, params[1], params[2], alpha, dtype)
    assert g_em.shape == (b, n, t) and g_em.dtype == dtype and g_em.is_contiguous()
    assert g_par.shape == (b, 2 * t + t * t) and g_par.dtype == torch.float32
    assert (g_em[~mask] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # 16-bit: the final rounding
    assert _rel_err(g_em, g_em_ref) <= tol
    assert _rel_err(g_par, g_par_ref) <= 1e-5


def test_grad_any_dtype_and_stride():
    """An expanded scalar grad (stride 0) and an fp64 / strided grad, as autograd may pass them."""
    em, tags, mask, params = _inputs(5, 8, 6, seed=3)
    out, alpha = native.crf_forward(em, tags, mask, *params)
    ones = torch.ones(5)
    base = native.crf_backward(ones, tags, mask, params[1], params[2], alpha, torch.float32)
    expanded = native.crf_backward(torch.ones(()).expand(5), tags, mask, params[1], params[2], alpha, torch.float32)
    strided = native.crf_backward(torch.ones(10, dtype=F64)[::2], tags, mask, params[1], params[2], alpha, em.dtype)
    for a, b in zip(base, expanded):
        assert torch.equal(a, b)
    for a, b in zip(base, strided):
        assert torch.equal(a, b)


def test_bf16_emissions_read_exactly():
    """bf16 emissions are widened to fp32 (exact): the same values as fp32 emissions holding the same numbers; the
    bf16 gradient is the fp32 one rounded to nearest."""
    em, tags, mask, params = _inputs(4, 11, 10, seed=7, dtype=torch.bfloat16)
    out16, alpha16 = native.crf_forward(em, tags, mask, *params)
    out32, alpha32 = native.crf_forward(em.float(), tags, mask, *params)
    assert torch.equal(out16, out32) and torch.equal(alpha16, alpha32)
    w = torch.randn(4)
    g16 = native.crf_backward(w, tags, mask, params[1], params[2], alpha16, torch.bfloat16)
    g32 = native.crf_backward(w, tags, mask, params[1], params[2], alpha32, torch.float32)
    assert torch.equal(g16[0], g32[0].to(torch.bfloat16)) and torch.equal(g16[1], g32[1])
    assert torch.equal(native.crf_viterbi(em, mask, *params)[0], ref.crf_viterbi(em, mask, *params, validate=False)[0])


def test_parameter_dtypes_are_read_as_fp32():
    """fp64 / bf16 parameters are cast to fp32 on load, like the Triton launchers do."""
    em, tags, mask, params = _inputs(3, 7, 5, seed=8)
    for dtype in (F64, torch.bfloat16):
        cast = [p.to(dtype) for p in params]
        out, alpha = native.crf_forward(em, tags, mask, *cast)
        out_f, alpha_f = native.crf_forward(em, tags, mask, *(p.float() for p in cast))
        assert torch.equal(out, out_f) and torch.equal(alpha, alpha_f)
        grads = native.crf_backward(torch.ones(3), tags, mask, cast[1], cast[2], alpha, torch.float32)
        grads_f = native.crf_backward(torch.ones(3), tags, mask, cast[1].float(), cast[2].float(), alpha, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_f))


def test_strided_inputs_and_padding_ignored():
    """Non-contiguous (time-major) emissions and tags, a transposed mask, non-contiguous parameters; anything on
    padding (emissions 1e4, tags -100 or out of range) is never read."""
    em, tags, mask, params = _inputs(4, 6, 5, seed=11)
    base_fwd = native.crf_forward(em, tags.clamp_min(0), mask, *params)
    base_bwd = native.crf_backward(torch.ones(4), tags.clamp_min(0), mask, params[1], params[2], base_fwd[1], em.dtype)
    base_vit = native.crf_viterbi(em, mask, *params)
    em_tm = em.transpose(0, 1).contiguous()  # shape: (n, B, T)
    em_tm[~mask.t()] = 1e4
    tags_tm = tags.t().contiguous()
    tags_tm[~mask.t()] = 10**9
    mask_tm = mask.t().contiguous()
    trans_t = params[2].t().contiguous().t()  # same values, column-major
    em_wide = torch.zeros(4, 6, 10)[:, :, ::2]  # last-dim stride 2
    em_wide.copy_(em)
    for e in (em_tm.transpose(0, 1), em_wide):
        fwd = native.crf_forward(e, tags_tm.t(), mask_tm.t(), params[0], params[1], trans_t)
        assert all(torch.equal(a, b) for a, b in zip(fwd, base_fwd))
        bwd = native.crf_backward(torch.ones(4), tags_tm.t(), mask_tm.t(), params[1], trans_t, fwd[1], em.dtype)
        assert all(torch.equal(a, b) for a, b in zip(bwd, base_bwd))
        vit = native.crf_viterbi(e, mask_tm.t(), params[0], params[1], trans_t)
        assert all(torch.equal(a, b) for a, b in zip(vit, base_vit))


def test_out_of_range_tags_are_clamped():
    """Tags outside [0, T) on real tokens: memory-safe, the result of the clamped tags (the ops layer validates)."""
    em, tags, mask, params = _inputs(3, 7, 5, seed=12)
    bad = tags.clone()
    bad[0, 0], bad[0, 3], bad[1, 0] = -7, 99, 2**40
    out, alpha = native.crf_forward(em, bad, mask, *params)
    clamped = torch.where(mask, bad.clamp(0, 4), bad)
    out_c, alpha_c = native.crf_forward(em, clamped, mask, *params)
    assert torch.equal(out, out_c)
    g = native.crf_backward(torch.ones(3), bad, mask, params[1], params[2], alpha, em.dtype)
    g_c = native.crf_backward(torch.ones(3), clamped, mask, params[1], params[2], alpha_c, em.dtype)
    assert all(torch.equal(a, b) for a, b in zip(g, g_c))


def test_empty_batch():
    em, tags, mask, params = _inputs(1, 4, 3, seed=0)
    out, alpha = native.crf_forward(em[:0], tags[:0], mask[:0], *params)
    assert out.shape == (0,) and alpha.shape == (0, 4, 3)
    g_em, g_par = native.crf_backward(out, None, mask[:0], params[1], params[2], alpha, torch.bfloat16)
    assert g_em.shape == (0, 4, 3) and g_em.dtype == torch.bfloat16 and g_par.shape == (0, 15)
    best, lengths = native.crf_viterbi(em[:0], mask[:0], *params)
    assert best.shape == (0, 4) and lengths.shape == (0,)


def test_deterministic_across_threads():
    """Per-sequence work and partials: bit-identical results for any thread count and between runs."""
    em, tags, mask, params = _inputs(9, 23, 10, seed=13)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 3, 1):
            torch.set_num_threads(k)
            out, alpha = native.crf_forward(em, tags, mask, *params)
            grads = native.crf_backward(torch.ones(9), tags, mask, params[1], params[2], alpha, em.dtype)
            results.append((out, alpha, *grads, *native.crf_viterbi(em, mask, *params)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) on padded tags in the interpreter
@pytest.mark.parametrize("b,n,t,dtype", [(4, 9, 5, torch.float32), (3, 7, 17, torch.bfloat16), (2, 5, 1, F32)])
def test_matches_the_triton_launchers(b, n, t, dtype):
    """The contract itself: the Triton launchers (`tpm_fast.kernels.crf`, on the GPU when there is one, else on
    Triton's CPU interpreter) on the same inputs: outputs within fp32 rounding, identical padding and Viterbi paths."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    kernels = pytest.importorskip("tpm_fast.kernels.crf")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    em, tags, mask, params = _inputs(b, n, t, seed=51 + t, dtype=dtype)
    w = torch.randn(b, generator=torch.Generator().manual_seed(t))
    on_dev = [x.to(dev) for x in (em, tags, mask, w, *params)]
    for with_tags in (True, False):
        tg, tg_dev = (tags, on_dev[1]) if with_tags else (None, None)
        ours = native.crf_forward(em, tg, mask, *params)
        theirs = [x.cpu() for x in kernels.launch_crf_forward(on_dev[0], tg_dev, on_dev[2], *on_dev[4:])]
        for a, r in zip(ours, theirs):
            assert a.dtype == r.dtype and a.shape == r.shape and _rel_err(a, r) <= 1e-5
        assert torch.equal(ours[1][~mask], theirs[1][~mask])
        ours = native.crf_backward(w, tg, mask, params[1], params[2], ours[1], dtype)
        alpha_dev = theirs[1].to(dev)
        theirs = kernels.launch_crf_backward(on_dev[3], tg_dev, on_dev[2], on_dev[5], on_dev[6], alpha_dev, dtype)
        for a, r in zip(ours, (x.cpu() for x in theirs)):
            assert a.dtype == r.dtype and a.shape == r.shape
            assert _rel_err(a, r) <= (1e-5 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps)
        assert (ours[0][~mask] == 0).all()
    theirs = [x.cpu() for x in kernels.launch_crf_viterbi(on_dev[0], on_dev[2], *on_dev[4:])]
    for a, r in zip(native.crf_viterbi(em, mask, *params), theirs):
        assert torch.equal(a, r)


# ---------------------------------------------------------------------------------------------- hard numerics


CUDA_UNAVAILABLE = native_cuda_crf_unavailable()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(CUDA_UNAVAILABLE is not None, reason=str(CUDA_UNAVAILABLE))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["scale1e4", "neg1e4", "neginf"])
@pytest.mark.parametrize("with_tags", [True, False])
def test_large_magnitudes_and_constraint_transitions(kind, with_tags, device):
    """|emissions| ~ 1e4, and forbidden moves (-1e4 / -inf transitions and start): finite, and at most ~2x (value)
    / ~3x (grads) the error of the reference computed in fp32, against the fp64 reference; the CPU kernels and, on a
    GPU, the CUDA ones (csrc/crf_cuda_*.cu)."""
    scale = 1e4 if kind == "scale1e4" else 3.0
    em, tags, mask, params = _inputs(5, 9, 5, seed=21, scale=scale)
    if kind != "scale1e4":
        bad = -1e4 if kind == "neg1e4" else float("-inf")
        params[2][0, 1] = params[2][3, 2] = params[2][4, :3] = bad
        params[0][2] = bad
        tags = torch.where(tags >= 0, tags % 2 * 3, tags)  # gold paths over tags {0, 3} only: all allowed
    tags = tags if with_tags else None
    w = torch.ones(5, dtype=F64)
    expected, g_em_ref, g_par_ref = _reference_partials(em, tags, mask, params, w)
    base, leaves32 = _reference(em, tags, mask, params, torch.float32)
    g_base = torch.autograd.grad(base.sum(), leaves32, materialize_grads=True)
    g_base = [g_base[0], torch.cat([g.reshape(-1) for g in g_base[1:]])]

    em_d, tags_d, mask_d, *params_d = (None if x is None else x.to(device) for x in (em, tags, mask, *params))
    out, alpha = native.crf_forward(em_d, tags_d, mask_d, *params_d)
    g_em, g_par = native.crf_backward(w.float().to(device), tags_d, mask_d, params_d[1], params_d[2], alpha, em.dtype)
    out, g_em, g_par = out.cpu(), g_em.cpu(), g_par.cpu()
    assert torch.isfinite(out).all() and torch.isfinite(g_em).all() and torch.isfinite(g_par).all()
    floor = 1e-6
    assert _rel_err(out, expected) <= 2 * _rel_err(base, expected) + floor
    assert _rel_err(g_em, g_em_ref) <= 3 * _rel_err(g_base[0], g_em_ref) + floor
    assert _rel_err(g_par.sum(0), g_par_ref.sum(0)) <= 3 * _rel_err(g_base[1], g_par_ref.sum(0)) + floor
    if kind != "scale1e4":  # forbidden moves get exactly zero marginal
        g_trans = g_par[:, 2 * 5 :].view(5, 5, 5)
        assert (g_trans[:, 0, 1] == 0).all() and (g_trans[:, 4, :3] == 0).all() and (g_par[:, 2] == 0).all()
    paths, lengths = (x.cpu() for x in native.crf_viterbi(em_d, mask_d, *params_d))
    assert _paths(paths, lengths) == _paths(ref.crf_viterbi(em, mask, *params, validate=False)[0], lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confident_model_gradients_keep_fp32_precision(seed, device):
    """A trained tagger's batch (gold tags favoured by 8, paths scoring hundreds, -log-likelihood ~0.3): every
    gradient within 1e-5 of fp64 (the fp32 reference: ~1e-5 to 1e-4; kernels that keep unshifted alphas or form
    1 - gamma lose ~1e-3 here, which slowed training down: see csrc/crf_cpu.cpp)."""
    errors = crf_grad_errors(*confident_crf_case(seed), backend="native", device=device)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("bad", [-1e4, float("-inf")])
@pytest.mark.parametrize("with_tags", [True, False])
def test_columns_far_below_the_step_max(bad, with_tags):
    """Tag 9 may only follow tag 2 (or itself), tag 2 scores 200 below the best tag at every step, and tag 9 scores
    +400 from position 6 on: the likely paths pay for one tag 2 to enter tag 9. At each step tag 9's column then
    lies ~200 below the step's max (its terms underflow if shifted by the step's max instead of the column's own),
    while the other columns do not: values and gradients must stay within fp32 rounding of the fp64 reference."""
    t, pre, far = 12, 2, 9
    em, tags, mask, params = _inputs(5, 12, t, seed=31, scale=1.0, lengths=[12, 12, 9, 7, 3])
    em[:, :, pre] -= 200.0
    em[:, 6:, far] += 400.0
    params[2][:, far] = bad
    params[2][pre, far] = params[2][far, far] = 0.5
    params[0][far] = bad  # no start in tag 9
    tags = torch.where(tags >= 0, tags % 2, tags) if with_tags else None  # gold paths over tags {0, 1}
    w = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected, g_em_ref, g_par_ref = _reference_partials(em, tags, mask, params, w)
    out, alpha = native.crf_forward(em, tags, mask, *params)
    g_em, g_par = native.crf_backward(w.float(), tags, mask, params[1], params[2], alpha, em.dtype)
    assert _rel_err(out, expected) <= 1e-5
    assert _rel_err(g_em, g_em_ref) <= 1e-5 and _rel_err(g_par, g_par_ref) <= 1e-5
    alpha_ref = _alpha_fp64(em, mask, params[0], params[2])
    assert torch.equal(torch.isfinite(alpha), torch.isfinite(alpha_ref))  # -inf exactly where unreachable
    live = torch.isfinite(alpha_ref)
    assert _rel_err(alpha[live], alpha_ref[live]) <= 1e-5
    assert (g_em_ref[:2, :, pre].abs().amax(1) > 0.1 * w[:2].abs()).all()  # the case is what it claims


@pytest.mark.parametrize("trans_scale", [30.0, 100.0])
def test_wide_transition_spans(trans_scale):
    """Transition columns spanning far more than fp32's exp range (exp(-87) underflows): no term that matters is
    lost."""
    em, tags, mask, params = _inputs(4, 15, 7, seed=41, trans_scale=trans_scale)
    w = torch.ones(4, dtype=F64)
    for tg in (tags, None):
        expected, g_em_ref, g_par_ref = _reference_partials(em, tg, mask, params, w)
        out, alpha = native.crf_forward(em, tg, mask, *params)
        g_em, g_par = native.crf_backward(w.float(), tg, mask, params[1], params[2], alpha, em.dtype)
        assert _rel_err(out, expected) <= 1e-5
        assert _rel_err(g_em, g_em_ref) <= 1e-5 and _rel_err(g_par, g_par_ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- Viterbi


@pytest.mark.parametrize("b,n,t,dtype,lengths", CASES)
def test_viterbi_matches_reference_and_pytorch_crf(b, n, t, dtype, lengths):
    em, _, mask, params = _inputs(b, n, t, seed=b * 100 + n + t, dtype=dtype, lengths=lengths)
    best, lengths_out = native.crf_viterbi(em, mask, *params)
    assert best.shape == (b, n) and best.dtype == lengths_out.dtype == torch.int64
    assert lengths_out.tolist() == mask.sum(1).tolist()
    assert (best[~mask] == 0).all()
    ref_best, _ = ref.crf_viterbi(em, mask, *params, validate=False)
    assert torch.equal(best, ref_best)
    assert _paths(best, lengths_out) == _torchcrf_decode(em, mask, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_ties_broken_like_pytorch_crf(seed):
    em, mask, params = viterbi_tie_case(seed)
    best, lengths = native.crf_viterbi(em, mask, *params)
    assert _paths(best, lengths) == _torchcrf_decode(em, mask, params)
    assert torch.equal(best, ref.crf_viterbi(em, mask, *params, validate=False)[0])


def test_viterbi_nan_scores_stay_in_range():
    """NaN emissions or transitions: every tag in [0, T), padding 0, lengths right (the path is unspecified)."""
    em, _, mask, params = _inputs(6, 10, 7, seed=5)
    em[0, 3, 2] = em[2, 0] = float("nan")
    em[1] = float("nan")
    for trans in (params[2], torch.full_like(params[2], float("nan"))):
        best, lengths = native.crf_viterbi(em, mask, params[0], params[1], trans)
        assert ((best >= 0) & (best < 7)).all() and (best[~mask] == 0).all()
        assert lengths.tolist() == mask.sum(1).tolist()
    best, _ = native.crf_viterbi(em, mask, *params)
    assert torch.equal(best[3:], ref.crf_viterbi(em[3:], mask[3:], *params, validate=False)[0])  # rows without NaN


def test_inputs_of_other_dtypes_are_rejected():
    em, tags, mask, params = _inputs(2, 3, 4, seed=0)
    with pytest.raises(RuntimeError):
        native.crf_forward(em, tags.int(), mask, *params)
    with pytest.raises(RuntimeError):
        native.crf_viterbi(em, mask.float(), *params)
    with pytest.raises(RuntimeError):
        native.crf_forward(em.long(), None, mask, *params)
    with pytest.raises(RuntimeError):
        native.crf_viterbi(em, mask, params[0], params[1], params[2][:, :2])
