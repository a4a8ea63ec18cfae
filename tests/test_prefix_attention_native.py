"""The native C++ CPU prefix-K/V attention (``csrc/prefix_attention_cpu.cpp``, registered as
``torch.ops.tpm_fast_native.prefix_attention_fwd`` / ``_bwd``) against the contract of the Triton launchers
(`tpm_fast.kernels.prefix_attention`): output and all five gradients against the fp64 reference, lse in log2 units,
padding (mask, lengths, both; fully padded rows; exactly-zero gradients of padded keys), odd shapes (prime n,
n_k != n, m in {0, 1, 4, 16}, head dims that are not powers of 2), strided views, bf16 within the reference's own
bf16 error, dropout with the Triton kernels' Philox keep-mask, bit for bit, and the compiled GEMM microkernels
(broadcasts from memory, objdump). Skips without ``tpm_fast._C``."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tests.oracles import ATTENTION_CASES, attention_inputs, max_abs, max_err, philox_uniform
from tpm_fast.ops.prefix_attention import key_bounds
from tpm_fast.reference.prefix_attention import prefix_attention as reference

pytest.importorskip("tpm_fast._C")
native = torch.ops.tpm_fast_native


def _native(inputs, w, key_padding_mask=None, lengths=None, dropout_p=0.0, seed=None, scale=None):
    """Native forward and backward with grad_out = w (the gradients of sum(out * w)): (out, lse, grads)."""
    q, k, v, k_p, v_p = inputs
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = (key_padding_mask, lengths, seed, dropout_p, scale)
    out, lse = native.prefix_attention_fwd(q, k, v, k_p, v_p, *args)
    grads = native.prefix_attention_bwd(w.to(out.dtype), q, k, v, k_p, v_p, out, lse, *args)
    return out, lse, grads


def _autograd(fn, inputs, w, dtype):
    """fn(*leaves) and the gradients of sum(out * w), leaves = inputs cast to ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves)
    return out, grads


def _ref(inputs, w, dtype=torch.float64, **kw):
    return _autograd(lambda *x: reference(*x, **kw), inputs, w, dtype)


def _weights(like, seed):
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def _check_fp32(inputs, rtol=1e-5, scale=None, **kw):
    """Native fp32 vs the fp64 reference: forward and all five gradients, max error relative to 1 + max |truth|."""
    w = _weights(inputs[0], 1)
    out, lse, grads = _native(inputs, w, scale=scale, **kw)
    truth, truth_grads = _ref(inputs, w, scale=scale, **kw)
    assert out.dtype == inputs[0].dtype and out.shape == truth.shape and torch.isfinite(out).all()
    assert lse.dtype == torch.float32 and lse.shape == inputs[0].shape[:3] and lse.is_contiguous()
    assert max_err(out, truth) <= rtol * (1 + max_abs(truth))
    for g, t, x in zip(grads, truth_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape and torch.isfinite(g).all()
        assert max_err(g, t) <= rtol * (1 + max_abs(t)), (max_err(g, t), max_abs(t))
    return out, lse, grads


# (b, h, n, n_k, m, d): the shared cases, and head dims that are not powers of 2, n and m + n_k past one register
# tile (6 rows, 64 columns) and past a 16-lane vector
CASES = ATTENTION_CASES + [(3, 2, 13, 29, 4, 24), (2, 1, 11, 9, 16, 40), (3, 1, 131, 127, 16, 64)]


@pytest.mark.parametrize("b,h,n,n_k,m,d", CASES)
@pytest.mark.parametrize("padding", ["none", "lengths", "mask", "mask+lengths", "mask+bounds"])
def test_forward_and_grads_match_fp64_reference(b, h, n, n_k, m, d, padding):
    inputs = attention_inputs(b, h, n, n_k, m, d, seed=b + h + n + n_k + m + d)
    g = torch.Generator().manual_seed(n)
    lengths = torch.tensor([n_k, 0, 1][:b])  # full, fully padded, one token
    mask = torch.rand(b, n_k, generator=g) < 0.6  # not left-aligned; row 0 all visible, row 1 all hidden
    mask[0] = True
    if b > 1:
        mask[1] = False
    kw = {
        "none": {},
        "lengths": {"lengths": lengths},
        "mask": {"key_padding_mask": mask},
        "mask+lengths": {"key_padding_mask": mask, "lengths": torch.randint(0, n_k + 1, (b,), generator=g).int()},
        "mask+bounds": {"key_padding_mask": mask, "lengths": key_bounds(mask)},  # as prompted_bert passes them
    }[padding]
    out, lse, grads = _check_fp32(inputs, **kw)
    if padding in ("lengths", "mask") and b > 1:  # batch row 1 has no visible token
        assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()  # exactly 0, not just small
        if m == 0:  # no visible key at all: out 0, lse +inf, dq 0, never NaN
            assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] > 0).all()
            assert (grads[0][1] == 0).all()
    if padding == "lengths" and b > 2:  # batch row 2 sees its first token only
        assert (grads[1][2, :, 1:] == 0).all() and (grads[2][2, :, 1:] == 0).all()
    if "mask" in padding:
        hidden = ~mask  # shape: (B, n_k)
        if "lengths" in kw:
            hidden |= torch.arange(n_k) >= kw["lengths"].unsqueeze(1)
        assert (grads[1].permute(0, 2, 1, 3)[hidden] == 0).all() and (grads[2].permute(0, 2, 1, 3)[hidden] == 0).all()


def test_custom_scale_and_no_padding():
    _check_fp32(attention_inputs(2, 2, 23, 23, 5, 32, seed=11), scale=0.3)


def test_lse_in_log2_units():
    """lse = log2-unit logsumexp of the visible scaled scores (prefix always visible), +inf without any key."""
    b, h, n, m, d = 3, 2, 37, 16, 32
    q, k, v, k_p, v_p = attention_inputs(b, h, n, n, m, d, seed=14)
    lengths = torch.tensor([37, 20, 0])
    scale = 1 / math.sqrt(d)
    out, lse = native.prefix_attention_fwd(q, k, v, k_p, v_p, None, lengths, None, 0.0, scale)
    visible = torch.arange(n) < lengths[:, None]  # shape: (B, n)
    scores = torch.cat(
        [q @ k_p.transpose(2, 3), (q @ k.transpose(2, 3)).masked_fill(~visible[:, None, None], -math.inf)], 3
    )
    torch.testing.assert_close(lse, (scores * scale).logsumexp(-1) * math.log2(math.e), rtol=1e-5, atol=1e-5)
    # m = 0 and no visible token: out 0, lse +inf, finite zero gradients for that batch row
    out0, lse0 = native.prefix_attention_fwd(q, k, v, k_p[:, :, :0], v_p[:, :, :0], None, lengths, None, 0.0, scale)
    assert (out0[2] == 0).all() and (lse0[2] == math.inf).all() and torch.isfinite(lse0[:2]).all()
    do = torch.randn_like(q)
    grads0 = native.prefix_attention_bwd(
        do, q, k, v, k_p[:, :, :0], v_p[:, :, :0], out0, lse0, None, lengths, None, 0.0, scale
    )
    assert all(torch.isfinite(g).all() for g in grads0) and all((g[2] == 0).all() for g in grads0[:3])


@pytest.mark.parametrize("seed", range(12, 20))
def test_large_logits_within_reference_fp32_error(seed):
    """q, k scaled by 30: scores ~ 1e3, whose fp32 rounding unit (~1e-4) bounds any fp32 kernel's accuracy; the fp32
    reference itself loses digits. The output and the gradients stay within 2x / 3x its error plus one such unit
    (times their max): where a softmax row splits between near-tied keys, which kernel rounds luckier decides the rest
    (the baseline x86 path of ``ATEN_CPU_CAPABILITY=default`` has no FMA: 0.2 units where the reference had 0.03).
    Saturated rows, whose gradients vanish, held the backward to its rounding: P from the fp32 lse (~1e3) and
    delta from rowsum(dO * O) gave errors of ~2e-5 on gradients of 1e-10..1e-2 here (seeds 13-15)."""
    inputs = attention_inputs(2, 1, 37, 37, 4, 32, seed=seed, qk_scale=30.0)
    kw = {"lengths": torch.tensor([37, 9])}
    w = _weights(inputs[0], 2)
    out, _, grads = _native(inputs, w, **kw)
    ref32, ref32_grads = _ref(inputs, w, dtype=torch.float32, **kw)
    truth, truth_grads = _ref(inputs, w, **kw)
    q, k, _, k_p, _ = (x.double() for x in inputs)
    scores = q @ torch.cat([k_p, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])  # shape: (B, H, n, m + n)
    score_unit = torch.finfo(torch.float32).eps * scores.abs().max().item()
    assert max_err(out, truth) <= 2 * max_err(ref32, truth) + score_unit * max_abs(truth)
    for g, r, t in zip(grads, ref32_grads, truth_grads):
        assert torch.isfinite(g).all()
        assert max_err(g, t) <= 3 * max_err(r, t) + score_unit * max_abs(t) + 1e-5


def test_edge_shapes():
    """No token keys (prefix only); no keys at all; a single query."""
    _check_fp32(attention_inputs(2, 2, 5, 0, 3, 16, seed=21))
    q, k, v, k_p, v_p = attention_inputs(2, 1, 5, 0, 0, 16, seed=22)
    out, lse, grads = _native([q, k, v, k_p, v_p], torch.randn_like(q))
    assert (out == 0).all() and (lse == math.inf).all() and (grads[0] == 0).all()
    _check_fp32(attention_inputs(2, 3, 1, 9, 2, 32, seed=23), lengths=torch.tensor([4, 9]))


def test_strided_views_of_projections_and_joined_keys():
    """q split into heads from a (B, n, H*d) projection, k_p / k slices of one joined (B, m + n, H, d) key tensor, v
    with a non-unit last-dim stride: read in place; out and dq follow q's (B, n, H, d) memory order."""
    b, h, n, m, d = 2, 3, 21, 3, 24
    g = torch.Generator().manual_seed(13)
    hidden_q = torch.randn(b, n, h * d, generator=g)
    joined_k = torch.randn(b, m + n, h, d, generator=g)
    joined_v = torch.randn(b, m + n, h, 2 * d, generator=g)[..., ::2]  # shape: (B, m + n, H, d), last stride 2
    q = hidden_q.view(b, n, h, d).transpose(1, 2)  # shape: (B, H, n, d), non-contiguous
    key, value = joined_k.transpose(1, 2), joined_v.transpose(1, 2)  # shape: (B, H, m + n, d)
    inputs = [q, key[:, :, m:], value[:, :, m:], key[:, :, :m], value[:, :, :m]]
    assert not any(t.is_contiguous() for t in inputs)
    mask = torch.rand(b, n, generator=g) < 0.7
    out, lse, grads = _check_fp32(inputs, key_padding_mask=mask, lengths=key_bounds(mask))
    assert out.stride() == q.stride() and grads[0].stride() == q.stride()
    out.transpose(1, 2).view(b, n, h * d)  # a view: raises if a copy were needed
    contiguous, _, contiguous_grads = _native([x.contiguous() for x in inputs], _weights(q, 1), mask, key_bounds(mask))
    torch.testing.assert_close(out, contiguous, rtol=0, atol=0)  # same arithmetic whatever the strides
    for a, c in zip(grads, contiguous_grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("b,h,n,n_k,m,d", [(2, 3, 37, 37, 4, 64), (2, 2, 19, 45, 16, 128), (3, 2, 7, 7, 0, 24)])
def test_bf16_within_reference_bf16_error(b, h, n, n_k, m, d):
    """Error vs fp64 truth at most 2x (forward) / 3x (backward) the reference's own bf16 error."""
    inputs = attention_inputs(b, h, n, n_k, m, d, seed=21, dtype=torch.bfloat16, qk_scale=2.0)
    mask = torch.rand(b, n_k, generator=torch.Generator().manual_seed(9)) < 0.7
    w = _weights(inputs[0], 10).bfloat16()
    out, _, grads = _native(inputs, w, key_padding_mask=mask)
    low, low_grads = _ref(inputs, w, dtype=torch.bfloat16, key_padding_mask=mask)
    truth, truth_grads = _ref(inputs, w, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    assert max_err(out, truth) <= 2 * max_err(low, truth) + 1e-2
    for g, lo, t in zip(grads, low_grads, truth_grads):
        assert g.dtype == torch.bfloat16
        assert max_err(g, t) <= 3 * max_err(lo, t) + 1e-2


def test_thread_count_does_not_change_results():
    inputs = attention_inputs(3, 4, 29, 31, 4, 32, seed=24)
    mask = torch.rand(3, 31, generator=torch.Generator().manual_seed(2)) < 0.8
    w = _weights(inputs[0], 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native(inputs, w, key_padding_mask=mask, dropout_p=0.1, seed=torch.tensor([5]))
        torch.set_num_threads(max(2, threads))
        many = _native(inputs, w, key_padding_mask=mask, dropout_p=0.1, seed=torch.tensor([5]))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip((one[0], one[1], *one[2]), (many[0], many[1], *many[2])):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_bad_inputs_raise():
    q, k, v, k_p, v_p = attention_inputs(2, 2, 5, 5, 3, 16, seed=0)
    with pytest.raises(RuntimeError):
        native.prefix_attention_fwd(q.double(), k.double(), v.double(), k_p.double(), v_p.double(), None, None, None,
                                    0.0, 0.25)  # fmt: skip
    with pytest.raises(RuntimeError):
        native.prefix_attention_fwd(q, k[:1], v[:1], k_p, v_p, None, None, None, 0.0, 0.25)
    with pytest.raises(RuntimeError):
        native.prefix_attention_fwd(q, k, v, k_p, v_p, torch.ones(2, 4, dtype=torch.bool), None, None, 0.0, 0.25)
    with pytest.raises(RuntimeError):
        native.prefix_attention_fwd(q, k, v, k_p, v_p, None, torch.tensor([5]), None, 0.0, 0.25)
    with pytest.raises(RuntimeError):
        native.prefix_attention_fwd(q, k, v, k_p, v_p, None, None, None, 1.0, 0.25)


# --------------------------------------------------------------------------------------------------- dropout


def _keep_mask(b, h, n, m, n_k, p, seed):
    """(B, H, n, m + n_k) bool: tl.rand(seed, ((b * H + h) * n + i) * (m + n_k) + j) >= p, prefix columns first."""
    offsets = np.arange(b * h * n * (m + n_k), dtype=np.int64).reshape(b, h, n, m + n_k)
    return torch.from_numpy(philox_uniform(seed, offsets)[0] >= np.float32(p))


def _triton_keep_mask(b, h, n, m, n_k, p, seed):
    """The Triton kernels' own keep-mask (dropout_keep_mask), where Triton can run: the CPU interpreter
    (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU) or CUDA; None elsewhere."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from tpm_fast.kernels.prefix_attention import dropout_keep_mask
    except ImportError:
        return None
    return dropout_keep_mask(b, h, n, m, n_k, p, torch.tensor([seed], device=device)).cpu()


def _native_keep_mask(b, h, n, m, n_k, p, seed, lengths):
    """The native forward's keep-mask, read off its output: with V = identity over the joined keys (d = m + n_k),
    out[..., j] = p_j * keep_j / (1 - p), and every visible p_j > 0 (small scores). Hidden columns read False."""
    d = m + n_k
    q, k, _, k_p, _ = attention_inputs(b, h, n, n_k, m, d, seed=seed % 1000, qk_scale=0.1)
    eye = torch.eye(d).expand(b, h, d, d)
    out, _ = native.prefix_attention_fwd(
        q, k, eye[:, :, m:].contiguous(), k_p, eye[:, :, :m].contiguous(), None, lengths, torch.tensor([seed]), p, 0.5
    )
    return out > 0


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 2, 2**40 + 12345])
def test_dropout_keep_mask_is_tritons_bit_for_bit(seed):
    """Same Philox stream as the Triton kernels: the numpy model equals dropout_keep_mask (where Triton runs), the
    native kernel's mask equals the numpy model on every visible column; seeds past 2**32 use the high key word."""
    b, h, n, m, n_k, p = 2, 3, 37, 3, 29, 0.3
    lengths = torch.tensor([29, 17])
    keep = _keep_mask(b, h, n, m, n_k, p, seed)
    triton_keep = _triton_keep_mask(b, h, n, m, n_k, p, seed)
    if triton_keep is not None:
        assert torch.equal(triton_keep, keep)
    visible = torch.cat([torch.ones(b, m, dtype=torch.bool), torch.arange(n_k) < lengths[:, None]], 1)
    got = _native_keep_mask(b, h, n, m, n_k, p, seed, lengths)  # shape: (B, H, n, m + n_k)
    assert torch.equal(got, keep & visible[:, None, None])
    assert abs(1 - keep.float().mean().item() - p) < 0.02


def _dropout_truth(inputs, keep, p, mask, lengths, scale):
    """fp64 PyTorch attention with the given (B, H, n, m + n_k) keep-mask over the joined columns."""
    q, k, v, k_p, v_p = inputs
    n_k = k.shape[2]
    visible = torch.arange(n_k) < lengths[:, None]  # shape: (B, n_k)
    if mask is not None:
        visible &= mask
    s_t = (q @ k.transpose(2, 3) * scale).masked_fill(~visible[:, None, None], -math.inf)
    probs = torch.cat([q @ k_p.transpose(2, 3) * scale, s_t], 3).softmax(-1) * keep / (1 - p)
    return probs @ torch.cat([v_p, v], 2)


@pytest.mark.parametrize("b,h,n,n_k,m,d", [(2, 2, 21, 21, 3, 16), (3, 1, 37, 29, 16, 24), (2, 2, 9, 13, 0, 64)])
def test_dropout_matches_torch_with_the_keep_mask(b, h, n, n_k, m, d):
    p, seed, scale = 0.3, 1234, 1 / math.sqrt(d)
    inputs = attention_inputs(b, h, n, n_k, m, d, seed=16)
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([n_k, n_k // 3, 0][:b])
    mask = torch.rand(b, n_k, generator=g) < 0.8
    mask[0, 0] = True
    keep = _triton_keep_mask(b, h, n, m, n_k, p, seed)
    keep = _keep_mask(b, h, n, m, n_k, p, seed) if keep is None else keep
    w = _weights(inputs[0], 5)
    out, _, grads = _native(inputs, w, key_padding_mask=mask, lengths=lengths, dropout_p=p, seed=torch.tensor([seed]))
    truth, truth_grads = _autograd(
        lambda *x: _dropout_truth(x, keep, p, mask, lengths, scale), inputs, w, torch.float64
    )
    truth = truth.nan_to_num(0.0)  # m = 0 and no visible token: 0 (the softmax of nothing is NaN)
    truth_grads = [t.nan_to_num(0.0) for t in truth_grads]
    assert max_err(out, truth) <= 1e-5 * (1 + max_abs(truth))
    for g_, t in zip(grads, truth_grads):
        assert max_err(g_, t) <= 1e-5 * (1 + max_abs(t))
    plain, _, _ = _native(inputs, w, key_padding_mask=mask, lengths=lengths)
    assert max_err(out, plain) > 1e-2  # dropout did something


def test_dropout_seeds():
    inputs = attention_inputs(1, 2, 16, 16, 2, 16, seed=17)
    w = _weights(inputs[0], 6)

    def run(seed):
        return _native(inputs, w, dropout_p=0.25, seed=torch.tensor([seed]))

    first = run(1)
    again = run(1)
    for a, c in zip((first[0], *first[2]), (again[0], *again[2])):
        assert torch.equal(a, c)
    assert not torch.allclose(first[0], run(2)[0])


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64", reason="needs objdump, x86-64")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_gemm_tiles_broadcast_from_memory(isa):
    """Compiled-code check of the GEMM microkernels (``tile<R, NV>``) of each x86 instruction set: FMAs fed by
    broadcasts from memory (``vbroadcastss``, or AVX-512's embedded ``{1to16}``), no scalar ``vaddss``. (``splat``
    as ``vf{} + x`` cost an add and a register broadcast per A element in the innermost loop: the AVX2 attention
    ran 1.5x slower.)"""
    import tpm_fast._C

    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", tpm_fast._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    tiles = {}
    for block in listing.split("\n\n"):  # one function per block: "<address> <name>:" then its instructions
        head, _, body = block.strip().partition("\n")
        if f"pa_cpu::isa_{isa}::tile<" in head:
            tiles[head] = body
    assert tiles, f"no isa_{isa}::tile<...> function in {tpm_fast._C.__file__} (inlined? then inspect gemm instead)"
    for name, body in tiles.items():
        rows = int(re.search(r"::tile<(\d+), \d+>", name).group(1))
        lines = body.splitlines()
        from_memory = [line for line in lines if re.search(r"vbroadcastss\s+[-0-9a-fx]*\(|\{1to", line)]
        from_registers = [line for line in lines if "vbroadcastss %xmm" in line]
        assert "vfmadd" in body and "vaddss" not in body, f"{name}: a scalar add in the microkernel"
        assert len(from_memory) >= rows, f"{name}: A not broadcast from memory"
        assert len(from_registers) <= 1, f"{name}: broadcasts from registers (alpha's is the one allowed)"
