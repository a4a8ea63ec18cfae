"""tpm_fast.ops.crf (Triton kernels, run by the CPU interpreter here) against brute force, pytorch-crf and the
reference; validation and dispatch (one point per op), the launch / op budget, the first-use self-check, and memory
safety (NaN scores, any mask layout). GPU-only cases skip without CUDA."""

from __future__ import annotations

import pytest
import torch
import torchcrf

from tests.oracles import DEVICE, brute_force_crf, confident_crf_case, crf_grad_errors, crf_inputs, viterbi_tie_case
from tpm_fast.ops import backend
from tpm_fast.ops import crf as ops
from tpm_fast.profiling import count_kernel_ops, count_triton_launches
from tpm_fast.reference import crf as ref

# log(0) on padded / forbidden tags is expected inside the kernels (numpy warns under the interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _inputs(b, n, t, seed, dtype=torch.float32, scale=1.0, trans_scale=1.0, lengths=None, device=DEV):
    """`tests.oracles.crf_inputs` on the test device."""
    return crf_inputs(b, n, t, seed, dtype, scale, trans_scale, lengths, device)


def _req(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _grads(out, inputs):
    return torch.autograd.grad(out.sum(), inputs, retain_graph=True, materialize_grads=True)


def _paths(tags, lengths):
    return [row[:k] for row, k in zip(tags.tolist(), lengths.tolist())]


def _torchcrf(params, dtype=torch.float64):
    crf = torchcrf.CRF(params[2].shape[0], batch_first=False)  # torchcrf's default layout: (n, B, ...)
    crf.load_state_dict(dict(zip(["start_transitions", "end_transitions", "transitions"], params)))
    return crf.to(device=params[0].device, dtype=dtype)


def _rel_err(x, r):
    return ((x.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1.0)).item()


# ---------------------------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("b,n,t,seed", [(3, 4, 3, 0), (3, 3, 3, 1), (1, 1, 3, 2), (3, 4, 2, 3)])
def test_matches_brute_force(b, n, t, seed):
    em, tags, mask, params = _inputs(b, n, t, seed)
    em64, *p64 = _req(em.double().cpu(), *(p.double().cpu() for p in params))
    log_z_ref, best = brute_force_crf(em64, mask.cpu(), *p64)
    tags_cpu, mask_cpu = tags.cpu(), mask.cpu()
    gold = ref.crf_gold_score(em64, tags_cpu, mask_cpu, *p64)
    w = torch.randn(b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    leaves = _req(em, *params)
    log_z = ops.crf_log_partition(leaves[0], mask, *leaves[1:], backend="triton")
    assert log_z.dtype == torch.float32
    torch.testing.assert_close(log_z.double().cpu(), log_z_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(_grads(log_z * w.float().to(DEV), leaves), _grads(log_z_ref * w, [em64, *p64])):
        torch.testing.assert_close(a.double().cpu(), r, rtol=1e-5, atol=1e-5)

    leaves = _req(em, *params)
    llh = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton")
    torch.testing.assert_close(llh.double().cpu(), gold - log_z_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(_grads(llh * w.float().to(DEV), leaves), _grads((gold - log_z_ref) * w, [em64, *p64])):
        torch.testing.assert_close(a.double().cpu(), r, rtol=1e-5, atol=1e-5)

    paths, lengths = ops.crf_viterbi(em, mask, *params, backend="triton")
    assert paths.dtype == lengths.dtype == torch.long
    assert lengths.tolist() == mask.sum(1).tolist()
    assert _paths(paths, lengths) == best
    assert (paths[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------- pytorch-crf

TORCHCRF_CASES = [  # b, n, t, dtype, lengths (None: random with a full row and a length-1 row)
    (1, 1, 5, torch.float32, None),  # batch of one, one step
    (3, 2, 2, torch.float32, None),
    (4, 7, 5, torch.float32, None),
    (5, 13, 10, torch.float32, None),
    (3, 7, 10, torch.float32, [7, 7, 7]),  # all lengths equal
    (2, 13, 1, torch.float32, None),  # one tag
    (2, 3, 64, torch.float32, None),  # the largest tag set
    (3, 2, 17, torch.float32, None),  # BLOCK_T 32 with padded tags
    (4, 7, 10, torch.float16, None),
    (1, 13, 5, torch.float16, [13]),
]


@pytest.mark.parametrize("b,n,t,dtype,lengths", TORCHCRF_CASES)
def test_matches_pytorch_crf(b, n, t, dtype, lengths):
    em, tags, mask, params = _inputs(b, n, t, seed=b * 1000 + n * 10 + t, dtype=dtype, lengths=lengths, scale=2.0)
    crf = _torchcrf(params)  # fp64 on the exact inputs the kernels see
    em64 = em.double().transpose(0, 1).requires_grad_(True)  # shape: (n, B, T)
    tags_tm, mask_tm = tags.clamp_min(0).t(), mask.t()
    expected = crf(em64, tags_tm, mask_tm, reduction="none")
    g_ref = _grads(expected, [em64, *crf.parameters()])

    leaves = _req(em, *params)
    llh = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton")
    assert llh.shape == (b,) and llh.dtype == torch.float32
    torch.testing.assert_close(llh.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(llh.sum().double(), crf(em64, tags_tm, mask_tm), rtol=1e-5, atol=1e-4)  # "sum"
    grads = _grads(llh, leaves)
    assert grads[0].dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:])
    tol = dict(rtol=1e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), g_ref[0].transpose(0, 1), **tol)
    for a, r in zip(grads[1:], g_ref[1:]):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)
    assert (grads[0][~mask] == 0).all()

    paths, lengths_out = ops.crf_viterbi(em, mask, *params, backend="triton")
    assert _paths(paths, lengths_out) == _torchcrf(params, torch.float32).decode(em.float().transpose(0, 1), mask_tm)


def test_bf16_emissions():
    """bf16 emissions are read as fp32 in the kernels (exact); only the bf16 gradient's final rounding may differ
    (the interpreter's fp32 -> bf16 conversion is not round-to-nearest): within one bf16 ulp."""
    em, tags, mask, params = _inputs(3, 6, 5, seed=12, dtype=torch.bfloat16, scale=2.0)
    em32 = em.float().requires_grad_(True)
    expected = ref.crf_log_likelihood(em32, tags, mask, *params, method="log")
    leaf = em.detach().clone().requires_grad_(True)
    ours = ops.crf_log_likelihood(leaf, tags, mask, *params, backend="triton")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    (g,) = _grads(ours, [leaf])
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), _grads(expected, [em32])[0], rtol=2**-7, atol=1e-6)
    assert torch.equal(ops.crf_viterbi(em, mask, *params, backend="triton")[0], ref.crf_viterbi(em, mask, *params)[0])


def test_time_major_views_and_padding_tags_are_ignored():
    """Non-contiguous (transposed) emissions and tags, arbitrary tags / emissions on padding."""
    em, tags, mask, params = _inputs(4, 6, 5, seed=11)
    em_tm = em.transpose(0, 1).contiguous()  # shape: (n, B, T)
    tags_tm = tags.t().contiguous()
    base = ops.crf_log_likelihood(em, tags.clamp_min(0), mask, *params, backend="triton")
    em_noisy = em_tm.clone()
    em_noisy[~mask.t()] = 1e4  # padding must not leak
    ours = ops.crf_log_likelihood(em_noisy.transpose(0, 1), tags_tm.t(), mask, *params, backend="triton")
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
    paths, _ = ops.crf_viterbi(em_noisy.transpose(0, 1), mask, *params, backend="triton")
    torch.testing.assert_close(paths, ops.crf_viterbi(em, mask, *params, backend="triton")[0])


# ---------------------------------------------------------------------------------------------- hard numerics


@pytest.mark.parametrize("kind", ["scale1e4", "neg1e4", "neginf"])
def test_large_magnitudes_and_constraint_transitions(kind):
    """|emissions| ~ 1e4, and forbidden transitions (-1e4 / -inf), against the fp64 log-space reference; the
    kernels' error may be at most ~2x (value) / ~3x (grads) that of the reference computed in fp32."""
    scale = 1e4 if kind == "scale1e4" else 3.0
    em, tags, mask, params = _inputs(4, 7, 5, seed=21, scale=scale)
    if kind != "scale1e4":
        bad = -1e4 if kind == "neg1e4" else float("-inf")
        params[2][0, 1] = params[2][3, 2] = params[2][4, :3] = bad  # forbidden moves
        params[0][2] = bad  # cannot start with tag 2
        tags = torch.where(tags >= 0, tags % 2 * 3, tags)  # gold paths over tags {0, 3} only: all allowed
    leaves64 = _req(em.double(), *(p.double() for p in params))
    exp = ref.crf_log_likelihood(leaves64[0], tags, mask, *leaves64[1:], method="log")
    g_exp = _grads(exp, leaves64)
    leaves32 = _req(em, *params)
    base = ref.crf_log_likelihood(leaves32[0], tags, mask, *leaves32[1:], method="log")
    g_base = _grads(base, leaves32)
    leaves = _req(em, *params)
    ours = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton")
    assert torch.isfinite(ours).all()
    floor = 1e-6
    assert _rel_err(ours, exp) <= 2 * _rel_err(base, exp) + floor
    for a, lp, r in zip(_grads(ours, leaves), g_base, g_exp):
        assert torch.isfinite(a).all()
        assert _rel_err(a, r) <= 3 * _rel_err(lp, r) + floor
    paths, lengths = ops.crf_viterbi(em, mask, *params, backend="triton")
    ref_paths, _ = ref.crf_viterbi(em, mask, *params)
    assert _paths(paths, lengths) == _paths(ref_paths, lengths)


def _shifted_alpha_fp64(em, mask, start, trans):
    """The saved alphas' contract in fp64: forward log-potentials (B, n, T) by the textbook recursion, each step
    shifted by its max over the tags when that is finite (else left as it is), 0 on rows t >= length (as
    tests/test_crf_native.py's ``_alpha_fp64``, which the C++ kernel's alphas match)."""
    em, start, trans = em.double(), start.double(), trans.double()
    b, n, t = em.shape
    alpha = torch.zeros(b, n, t, dtype=torch.float64, device=em.device)
    alpha[:, 0] = start + em[:, 0]
    for s in range(1, n):
        alpha[:, s] = torch.logsumexp(alpha[:, s - 1].unsqueeze(2) + trans, dim=1) + em[:, s]
    shift = alpha.amax(2, keepdim=True)  # shape: (B, n, 1)
    alpha = alpha - torch.where(shift.isfinite(), shift, 0.0)
    return alpha.masked_fill(~mask.unsqueeze(2), 0.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the -inf row's gold - log Z
@pytest.mark.parametrize("with_tags", [True, False])
def test_saved_alphas_are_shifted_per_step(with_tags):
    """The forward saves each step's alphas shifted to max 0 (rows t >= length 0), and log Z adds the shifts back:
    a row made unreachable from step 3 on (all -inf emissions) stays -inf, unshifted, and its log Z is -inf."""
    from tpm_fast.kernels.crf import launch_crf_forward

    em, tags, mask, params = _inputs(4, 9, 6, seed=17, scale=4.0, lengths=[9, 9, 5, 1])
    em[1, 3:] = float("-inf")
    out, alpha = launch_crf_forward(em, tags.clamp_min(0) if with_tags else None, mask, *params)
    expected = _shifted_alpha_fp64(em, mask, params[0], params[2])
    real = mask.unsqueeze(2).expand_as(alpha)
    assert (alpha[~real] == 0).all()
    finite = expected.isfinite()
    assert torch.equal(alpha.isfinite(), finite) and (alpha[real & ~finite] == float("-inf")).all()
    assert torch.allclose(alpha[finite].double(), expected[finite], rtol=0, atol=1e-5)
    live = mask & finite.all(2)  # shape: (B, n) real rows before the -inf
    assert live.sum() == 9 + 3 + 5 + 1 and (alpha.amax(2)[live] == 0).all()
    rows, p64 = [0, 2, 3], [p.double() for p in params]
    log_z = ref.crf_log_partition(em[rows].double(), mask[rows], *p64)
    expected_out = ref.crf_gold_score(em[rows].double(), tags[rows], mask[rows], *p64) - log_z if with_tags else log_z
    torch.testing.assert_close(out[rows].double(), expected_out, rtol=1e-6, atol=1e-5)
    if not with_tags:
        assert out[1] == float("-inf")  # log Z of the unreachable row (not NaN)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confident_model_gradients_keep_fp32_precision(seed):
    """A trained tagger's batch (gold tags favoured by 8, paths scoring hundreds, -log-likelihood ~0.3): every
    gradient within 1e-5 of fp64 (~4e-7 here; the fp32 reference: ~1e-5 to 1e-4). Unshifted saved alphas and gold
    entries formed as 1 - gamma lost ~4e-4 to 2e-3 here (see tpm_fast/kernels/crf_bwd.py)."""
    errors = crf_grad_errors(*confident_crf_case(seed), backend="triton", device=DEVICE)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_ties_broken_like_pytorch_crf(seed):
    em, mask, params = viterbi_tie_case(seed)
    em, mask, params = em.to(DEV), mask.to(DEV), [p.to(DEV) for p in params]
    paths, lengths = ops.crf_viterbi(em, mask, *params, backend="triton")
    expected = _torchcrf(params, torch.float32).decode(em.transpose(0, 1), mask.t())
    assert _paths(paths, lengths) == expected


# ---------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_without_native_is_the_reference_and_errors(monkeypatch):
    from tpm_fast.ops import native

    monkeypatch.setattr(native, "_STATE", {"reason": "simulated: tpm_fast._C not built"})
    em, tags, mask, params = _inputs(3, 4, 5, seed=3, device="cpu")
    for backend_name in ("auto", "reference"):
        torch.testing.assert_close(
            ops.crf_log_likelihood(em, tags, mask, *params, backend=backend_name),
            ref.crf_log_likelihood(em, tags, mask, *params),
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            ops.crf_log_partition(em, mask, *params, backend=backend_name), ref.crf_log_partition(em, mask, *params)
        )
        assert (
            ops.crf_viterbi(em, mask, *params, backend=backend_name)[0].tolist()
            == ref.crf_viterbi(em, mask, *params)[0].tolist()
        )
    with pytest.raises(ValueError, match="backend"):
        ops.crf_log_likelihood(em, tags, mask, *params, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ops.crf_viterbi(em, mask, *params, backend="fast")
    for backend_name in ("triton", "reference"):
        with pytest.raises(ValueError, match="3-d float"):
            ops.crf_log_likelihood(em[0], tags, mask, *params, backend=backend_name)
        with pytest.raises(ValueError, match="3-d float"):
            ops.crf_viterbi(em.long(), mask, *params, backend=backend_name)
        with pytest.raises(ValueError, match="transitions"):
            ops.crf_log_partition(em, mask, params[0], params[1], params[2][:, :2], backend=backend_name)
        with pytest.raises(ValueError, match="mask must have shape"):
            ops.crf_log_likelihood(em, tags, mask[:, :2], *params, backend=backend_name)
        with pytest.raises(ValueError, match="mask must be bool"):
            ops.crf_log_likelihood(em, tags, mask.float(), *params, backend=backend_name)
        with pytest.raises(ValueError, match="tags must be torch.long"):
            ops.crf_log_likelihood(em, tags.int(), mask, *params, backend=backend_name)
        with pytest.raises(ValueError, match="tags must have shape"):
            ops.crf_log_likelihood(em, tags[:2], mask, *params, backend=backend_name)
        with pytest.raises(ValueError, match="sequence length"):
            ops.crf_log_partition(em[:, :0], mask[:, :0], *params, backend=backend_name)


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``backend="auto"`` may pick Triton on CPU tensors (run by the interpreter), with a fresh self-check cache."""
    monkeypatch.setattr(backend, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(backend, "_PASSED", {})
    monkeypatch.delenv("TPM_FAST_SELF_CHECK", raising=False)


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_fp64_and_many_tags_take_the_reference_or_raise(backend_name, auto_on_cpu):
    """Inputs the kernels do not cover: the reference under "auto" (even where auto would pick Triton), an error
    naming the limit under "triton"."""
    em, tags, mask, params = _inputs(2, 3, 5, seed=4)
    em64, p64 = em.double(), [p.double() for p in params]
    em, _, mask_many, params_many = _inputs(2, 2, backend.MAX_TAGS + 1, seed=5)
    if backend_name == "triton":
        with pytest.raises(ValueError, match="float64 inputs need"):
            ops.crf_log_likelihood(em64, tags, mask, *p64, backend=backend_name)
        with pytest.raises(ValueError, match="float64 inputs need"):  # the parameters' dtype counts too
            ops.crf_log_partition(em64.float(), mask, *p64, backend=backend_name)
        with pytest.raises(ValueError, match=f"at most {backend.MAX_TAGS} tags"):
            ops.crf_viterbi(em, mask_many, *params_many, backend=backend_name)
        return
    with count_triton_launches() as launches:
        out = ops.crf_log_likelihood(em64, tags, mask, *p64, backend=backend_name)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref.crf_log_likelihood(em64, tags, mask, *p64), rtol=0, atol=0)
        torch.testing.assert_close(
            ops.crf_log_partition(em, mask_many, *params_many, backend=backend_name),
            ref.crf_log_partition(em, mask_many, *params_many),
        )
    assert not launches


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_validate_means_the_same_on_both_backends(backend_name):
    """validate=True: mask contents and tag range are checked on both backends (same messages); validate=False:
    nothing is checked on either (a first-off or holey mask runs without error; out-of-range tags are clamped by the
    kernels, memory-safe, while the reference's indexing rejects them)."""
    em, tags, mask, params = _inputs(3, 5, 4, seed=13, lengths=[5, 3, 2])
    first_off, holey, bad_tags = mask.clone(), mask.clone(), tags.clone()
    first_off[1, 0] = False
    holey[0, 2] = False
    bad_tags[0, 1] = 4
    kw = dict(backend=backend_name)
    with pytest.raises(ValueError, match="first timestep"):
        ops.crf_log_likelihood(em, tags, first_off, *params, **kw)
    with pytest.raises(ValueError, match="left-aligned"):
        ops.crf_viterbi(em, holey, *params, **kw)
    with pytest.raises(ValueError, match="left-aligned"):
        ops.crf_log_partition(em, holey, *params, **kw)
    with pytest.raises(ValueError, match="tags under the mask"):
        ops.crf_log_likelihood(em, bad_tags, mask, *params, **kw)
    kw["validate"] = False
    assert ops.crf_log_likelihood(em, tags, first_off.to(torch.uint8), *params, **kw).shape == (3,)
    if backend_name == "triton":
        assert torch.isfinite(ops.crf_log_likelihood(em, bad_tags, mask, *params, **kw)).all()
    assert ops.crf_viterbi(em, holey, *params, **kw)[0].shape == (3, 5)
    good = ops.crf_log_likelihood(em, tags, mask.to(torch.uint8), *params, **kw)
    torch.testing.assert_close(good, ref.crf_log_likelihood(em, tags, mask, *params), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["triton", "native", "reference"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction_is_the_per_sequence_values_reduced(backend_name, reduction):
    """``reduction`` gives the (B,) values' sum or mean, with the same gradients, on every backend (the Triton path
    reduces inside its autograd node); an unknown reduction is an error before anything runs."""
    if backend_name == "native" and backend.native_unavailable_reason() is not None:
        pytest.skip(backend.native_unavailable_reason())
    em, tags, mask, params = _inputs(4, 6, 5, seed=17, lengths=[6, 4, 1, 3])
    kw = dict(backend=backend_name, validate=False)
    for op, args in ((ops.crf_log_likelihood, (tags, mask)), (ops.crf_log_partition, (mask,))):
        leaves, leaves_none = _req(em, *params), _req(em, *params)
        reduced = op(leaves[0], *args, *leaves[1:], reduction=reduction, **kw)
        per_seq = op(leaves_none[0], *args, *leaves_none[1:], **kw)
        expected = per_seq.sum() if reduction == "sum" else per_seq.mean()
        assert reduced.shape == () and torch.equal(reduced, expected)
        for a, b in zip(_grads(reduced, leaves), _grads(expected, leaves_none)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="invalid reduction: 'avg'"):
        ops.crf_log_likelihood(em, tags, mask, *params, reduction="avg", **kw)


def test_uint8_mask_and_no_tags_needed_for_partition():
    em, tags, mask, params = _inputs(3, 5, 4, seed=6)
    a = ops.crf_log_partition(em, mask.to(torch.uint8), *params, backend="triton")
    b = ref.crf_log_partition(em.double(), mask, *(p.double() for p in params), method="log")
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_torch_compile_fullgraph_matches_eager(reduction):
    em, tags, mask, params = _inputs(3, 5, 4, seed=8)

    def loss(em, start, end, trans):
        llh = ops.crf_log_likelihood(em, tags, mask, start, end, trans, backend="triton", reduction=reduction)
        paths, _ = ops.crf_viterbi(em, mask, start, end, trans, backend="triton")
        return llh, paths

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves_c, leaves_e = _req(em, *params), _req(em, *params)
    (llh_c, paths_c), (llh_e, paths_e) = compiled(*leaves_c), loss(*leaves_e)
    torch.testing.assert_close(llh_c, llh_e, rtol=0, atol=0)
    assert torch.equal(paths_c, paths_e)
    for a, b in zip(_grads(llh_c, leaves_c), _grads(llh_e, leaves_e)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_validates_with_device_asserts():
    """While torch.compile traces, validate=True keeps the content checks as device asserts (no host sync)."""
    em, tags, mask, params = _inputs(3, 5, 4, seed=8)
    compiled = torch.compile(
        lambda em, mask: ops.crf_log_partition(em, mask, *params, backend="triton"), backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(compiled(em, mask), ops.crf_log_partition(em, mask, *params, backend="triton"))
    mask[1, 0] = False
    with pytest.raises(RuntimeError, match="first timestep"):
        compiled(em, mask)


def test_opcheck():
    em, tags, mask, params = _inputs(3, 4, 3, seed=9)
    leaves = _req(em, *params)
    torch.library.opcheck(ops._crf_forward, (leaves[0], tags.clamp_min(0), mask, *leaves[1:]))
    torch.library.opcheck(ops._crf_forward, (em, None, mask.to(torch.uint8), *params))
    torch.library.opcheck(ops._crf_viterbi, (em, mask, *params))
    out, alpha = ops._crf_forward(em, tags, mask, *params)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops._crf_backward, (grad, tags, mask, params[1], params[2], alpha, em.dtype))
    torch.library.opcheck(ops._crf_backward, (grad, None, mask, params[1], params[2], alpha, torch.float16))


# ---------------------------------------------------------------------------------------------- launch budget


def _budget(fn):
    """(Triton launches, kernel-launching aten ops, host syncs) of one call of ``fn``, launches stubbed."""
    with count_triton_launches(stub=True) as launches:
        total, counts, syncs = count_kernel_ops(fn)
    return sum(launches.values()), total, counts, syncs


def test_launch_and_op_budget():
    """Log-likelihood forward + backward: 2 launches + the one ``.sum(0)`` of the parameter partials (budget: 6
    ops); Viterbi: exactly 1 launch, nothing else; the CRF layer with constraints, "sum" and backward: <= 6 ops
    (2 ``where`` forward and backward, the reduction, the partials' sum); no host sync anywhere."""
    b, n, t = 4, 6, 5
    em, tags, mask, params = _inputs(b, n, t, seed=31)
    leaves = _req(em, *params)
    w = torch.randn(b)

    def fwd_bwd():
        llh = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton", validate=False)
        torch.autograd.grad(llh, leaves, w)

    launches, total, counts, syncs = _budget(fwd_bwd)
    assert launches <= 2 and total <= 6 and not syncs, (launches, counts, syncs)

    launches, total, counts, syncs = _budget(
        lambda: ops.crf_viterbi(em, mask, *params, backend="triton", validate=False)
    )
    assert launches == 1 and total == 0 and not syncs, (launches, counts, syncs)

    from tpm_fast.layers.crf import CRF

    crf = CRF.from_labels(BIO, batch_first=True, backend="triton")
    em6 = torch.randn(b, n, len(BIO), requires_grad=True)
    tags6 = torch.randint(0, len(BIO), (b, n))
    leaves6 = [em6, *crf.parameters()]
    one = torch.ones(())

    def layer_fwd_bwd():
        torch.autograd.grad(crf(em6, tags6, mask, reduction="sum", validate=False), leaves6, one)

    launches, total, counts, syncs = _budget(layer_fwd_bwd)
    assert launches <= 2 and total <= 6 and not syncs, (launches, counts, syncs)


BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "X"]


# ---------------------------------------------------------------------------------------------- self-check


class _WrongKernel:
    """A Triton kernel whose first output (argument 6 of each CRF kernel: the forward's ``out``, the backward's
    emissions gradient, Viterbi's tags) comes out off by 1e-2 (1 for tags): launched as the real one, then shifted."""

    def __init__(self, kernel):
        self.kernel = kernel

    def run(self, *args, **kwargs):
        self.kernel.run(*args, **kwargs)
        args[6].add_(1 if args[6].dtype == torch.long else 1e-2)


def _perturbed(name, monkeypatch):
    """Replace the Triton kernel ``name`` of `tpm_fast.kernels.crf` (read by the Python launchers at each launch, by
    the C++ autograd node at each forward) by a wrong one."""
    from tpm_fast.kernels import crf as kernels

    monkeypatch.setattr(kernels, name, _WrongKernel(getattr(kernels, name)))


def _crf_checks():
    """Cached self-check outcomes of the CRF (keyed by op, device[, dtype])."""
    return [passed for key, passed in backend._PASSED.items() if key[:2] == ("crf", "cpu")]


def _self_check_warnings(record):
    return [w for w in record if "self-check" in str(w.message)]  # not the interpreter's numpy warnings


@pytest.mark.parametrize("name", ["_crf_forward_kernel", "_crf_backward_kernel", "_crf_viterbi_kernel"])
def test_self_check_rejects_a_wrong_kernel(name, auto_on_cpu, monkeypatch):
    """A kernel that fails the first-use self-check: "auto" warns once (naming the device) and uses the reference
    for the CRF on that device from then on."""
    import warnings

    _perturbed(name, monkeypatch)
    em, tags, mask, params = _inputs(3, 5, 4, seed=40)
    with pytest.warns(RuntimeWarning, match=r"crf kernel failed its first-use self-check on cpu") as record:
        llh = ops.crf_log_likelihood(em, tags, mask, *params)
    assert len(_self_check_warnings(record)) == 1
    assert _crf_checks() == [False]
    torch.testing.assert_close(llh, ref.crf_log_likelihood(em, tags, mask, *params), rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as record, count_triton_launches() as launches:
        warnings.simplefilter("always")
        paths, _ = ops.crf_viterbi(em, mask, *params)
    assert not _self_check_warnings(record)  # warned once only
    assert not launches and torch.equal(paths, ref.crf_viterbi(em, mask, *params)[0])


def test_self_check_passes_and_auto_picks_triton(auto_on_cpu):
    import warnings

    em, tags, mask, params = _inputs(3, 5, 4, seed=41)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert ops.self_check(torch.device("cpu"), dtype) is None
    with warnings.catch_warnings(record=True) as record, count_triton_launches() as launches:
        warnings.simplefilter("always")
        llh = ops.crf_log_likelihood(em, tags, mask, *params)
    assert not _self_check_warnings(record)
    assert _crf_checks() == [True]
    assert launches["_crf_forward_kernel"] >= 2  # the self-check's and this call's
    launches.clear()
    with count_triton_launches() as launches:
        torch.testing.assert_close(llh, ops.crf_log_likelihood(em, tags, mask, *params, backend="triton"))
        ops.crf_viterbi(em, mask, *params)
    assert launches == {"_crf_forward_kernel": 1, "_crf_viterbi_kernel": 1}


def test_self_check_off(auto_on_cpu, monkeypatch):
    """TPM_FAST_SELF_CHECK=0: no check runs, "auto" takes the (here wrong) kernel as is."""
    monkeypatch.setenv("TPM_FAST_SELF_CHECK", "0")
    _perturbed("_crf_forward_kernel", monkeypatch)
    em, tags, mask, params = _inputs(3, 5, 4, seed=42)
    with count_triton_launches() as launches:
        llh = ops.crf_log_likelihood(em, tags, mask, *params)
    assert launches == {"_crf_forward_kernel": 1} and not backend._PASSED
    expected = ref.crf_log_likelihood(em, tags, mask, *params)
    torch.testing.assert_close(llh, expected + 1e-2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- memory safety


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_viterbi_nan_emissions_stay_in_range(backend_name):
    """NaN scores: tags in [0, T) on real tokens, 0 on padding, no out-of-row read (which path is unspecified)."""
    b, n, t = 5, 9, 6
    em, _, mask, params = _inputs(b, n, t, seed=50, lengths=[9, 9, 5, 7, 1])
    em[0] = float("nan")  # a whole row
    em[2, 1:3] = float("nan")  # a few steps
    em[3, 4, 2] = float("nan")  # one score
    em[4] = float("nan")  # length-1 row
    paths, lengths = ops.crf_viterbi(em, mask, *params, backend=backend_name)
    assert lengths.tolist() == [9, 9, 5, 7, 1]
    assert ((paths >= 0) & (paths < t)).all()
    assert (paths[~mask] == 0).all()
    clean = ops.crf_viterbi(em[1:2], mask[1:2], *params, backend=backend_name)[0]
    assert torch.equal(paths[1], clean[0])  # rows without NaN are unaffected
    trans_nan = params[2].clone()
    trans_nan[1] = float("nan")
    paths, _ = ops.crf_viterbi(em[1:], mask[1:], params[0], params[1], trans_nan, backend=backend_name)
    assert ((paths >= 0) & (paths < t)).all()


def test_lengths_from_any_mask_layout():
    """The kernels read each row's length from the mask itself: time-major (transposed) bool masks and uint8 masks
    give the same results as a contiguous bool mask."""
    em, tags, mask, params = _inputs(4, 6, 5, seed=51)
    mask_view = mask.t().contiguous().t()  # shape: (B, n), strides (1, B)
    assert not mask_view.is_contiguous()
    expected = ops.crf_log_likelihood(em, tags, mask, *params, backend="triton")
    for m in (mask_view, mask.to(torch.uint8), mask_view.to(torch.uint8)):
        torch.testing.assert_close(ops.crf_log_likelihood(em, tags, m, *params, backend="triton"), expected)
        paths, lengths = ops.crf_viterbi(em, m, *params, backend="triton")
        assert lengths.tolist() == mask.sum(1).tolist()
        assert torch.equal(paths, ops.crf_viterbi(em, mask, *params, backend="triton")[0])


def test_long_rows_span_several_time_blocks():
    """n > 2 * BLOCK_N: row lengths, the gold score and the Viterbi padding are read / written in several blocks."""
    from tpm_fast.kernels.crf import BLOCK_N

    n = 2 * BLOCK_N + 22
    em, tags, mask, params = _inputs(4, n, 5, seed=53, lengths=[n, BLOCK_N + 1, BLOCK_N, 1])
    leaves, leaves_ref = _req(em, *params), _req(em, *params)
    ours = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton")
    expected = ref.crf_log_likelihood(leaves_ref[0], tags, mask, *leaves_ref[1:])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    for a, r in zip(_grads(ours, leaves), _grads(expected, leaves_ref)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    paths, lengths = ops.crf_viterbi(em, mask, *params, backend="triton")
    assert lengths.tolist() == [n, BLOCK_N + 1, BLOCK_N, 1]
    assert torch.equal(paths, ref.crf_viterbi(em, mask, *params)[0])


def test_low_precision_parameters():
    """fp16 / bf16 parameters: read as fp32 in the kernels, gradients returned in each parameter's dtype."""
    em, tags, mask, params = _inputs(3, 5, 4, seed=52)
    lp = [params[0].half(), params[1].bfloat16(), params[2].half()]
    leaves = _req(em, *lp)
    llh = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton")
    leaves32 = _req(em, *(p.float() for p in lp))
    expected = ref.crf_log_likelihood(leaves32[0], tags, mask, *leaves32[1:])
    torch.testing.assert_close(llh, expected, rtol=1e-5, atol=1e-5)
    grads = _grads(llh, leaves)
    assert [g.dtype for g in grads] == [torch.float32, torch.float16, torch.bfloat16, torch.float16]
    for a, r in zip(grads, _grads(expected, leaves32)):
        torch.testing.assert_close(a.float(), r, rtol=1e-2, atol=1e-3)  # 16-bit gradients: rounded


# ---------------------------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("b,n", [(32, 64), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(b, n, dtype):
    t = 10
    em, tags, mask, params = _inputs(b, n, t, seed=b + n, dtype=dtype, scale=3.0)
    leaves64 = _req(em.double(), *(p.double() for p in params))
    exp = ref.crf_log_likelihood(leaves64[0], tags, mask, *leaves64[1:])
    g_exp = _grads(exp, leaves64)
    leaves_lp = _req(em, *params)
    base = ref.crf_log_likelihood(leaves_lp[0], tags, mask, *leaves_lp[1:])  # reference's own fp32 error
    g_base = _grads(base, leaves_lp)
    leaves = _req(em, *params)
    ours = ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:])  # auto -> triton on CUDA
    floor = 1e-6
    assert _rel_err(ours, exp) <= 2 * _rel_err(base, exp) + floor
    for a, lp, r in zip(_grads(ours, leaves), g_base, g_exp):
        assert _rel_err(a, r) <= 3 * _rel_err(lp, r) + floor
    paths, lengths = ops.crf_viterbi(em, mask, *params)
    ref_paths, _ = ref.crf_viterbi(em, mask, *params)
    assert torch.equal(paths, ref_paths)
    torch.testing.assert_close(
        ops.crf_log_partition(em, mask, *params), ref.crf_log_partition(em, mask, *params), rtol=1e-5, atol=1e-3
    )
