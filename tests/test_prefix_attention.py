"""tpm_fast.ops.prefix_attention (fused Triton kernel) against the reference, on CPU via TRITON_INTERPRET=1.

Interpreter block sizes are 16, so n = 37 spans three query / key blocks. bf16 and full-size runs need a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import tpm_fast.kernels.prefix_attention as kernels
from tests.oracles import ATTENTION_CASES, attention_inputs, max_abs, max_err
from tpm_fast.kernels.prefix_attention import (
    dropout_keep_mask,
    launch_prefix_attention_bwd,
    launch_prefix_attention_fwd,
)
from tpm_fast.ops.prefix_attention import draw_dropout_seed, key_bounds, prefix_attention
from tpm_fast.reference.prefix_attention import prefix_attention as reference

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _inputs(b, h, n, n_k, m, d, seed, dtype=torch.float32, qk_scale=1.0, device=DEVICE):
    return attention_inputs(b, h, n, n_k, m, d, seed, dtype, qk_scale, device)


def _out_and_grads(inputs, w, **kw):
    """prefix_attention output and the gradients of sum(out * w) for all five inputs (fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    fn = kw.pop("fn", prefix_attention)
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves)
    return out, grads


def _check_fp32(inputs, rtol=1e-5, **kw):
    """Triton (fp32 inputs) vs the reference in fp64: forward and all five gradients, relative max error."""
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(inputs[0].device)
    out, grads = _out_and_grads(inputs, w, backend="triton", **kw)
    truth, truth_grads = _out_and_grads([x.double() for x in inputs], w.double(), backend="reference", **kw)
    assert out.dtype == inputs[0].dtype and torch.isfinite(out).all()
    assert max_err(out, truth) <= rtol * (1 + max_abs(truth))
    for g, t in zip(grads, truth_grads):
        assert g.dtype == inputs[0].dtype and g.shape == t.shape and torch.isfinite(g).all()
        assert max_err(g, t) <= rtol * (1 + max_abs(t)), (max_err(g, t), max_abs(t))
    return out, grads


@pytest.mark.parametrize("b,h,n,n_k,m,d", ATTENTION_CASES)
@pytest.mark.parametrize("padding", ["lengths", "mask", "mask+bounds"])
def test_forward_and_grads_match_fp64_reference(b, h, n, n_k, m, d, padding):
    inputs = _inputs(b, h, n, n_k, m, d, seed=b + h + n + n_k + m + d)
    g = torch.Generator().manual_seed(n)
    lengths = torch.tensor([n_k, 0, 1][:b])  # full, fully padded, one token
    if padding == "lengths":
        kw = {"lengths": lengths.to(DEVICE)}
    else:  # not left-aligned, first row all visible, second row all hidden
        mask = torch.rand(b, n_k, generator=g) < 0.6
        mask[0] = True
        if b > 1:
            mask[1] = False
        kw = {"key_padding_mask": mask.to(DEVICE)}
        if padding == "mask+bounds":  # as prompted_bert passes them: the mask and its key bounds
            kw["lengths"] = key_bounds(kw["key_padding_mask"])
    out, grads = _check_fp32(inputs, **kw)
    if padding == "lengths" and b > 1:
        assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()  # fully padded row: zero dk, dv
        if m == 0:
            assert (out[1] == 0).all() and (grads[0][1] == 0).all()  # no visible key at all: 0, never NaN
        if b > 2:
            assert (grads[1][2, :, 1:] == 0).all() and (grads[2][2, :, 1:] == 0).all()


def test_no_padding_and_custom_scale():
    _check_fp32(_inputs(2, 2, 23, 23, 5, 32, seed=11), scale=0.3)


def test_large_logits_within_reference_fp32_error():
    """q, k scaled by 30: scores ~ 1e3. The fp32 reference itself loses digits; stay within 3x its error."""
    inputs = _inputs(2, 1, 37, 37, 4, 32, seed=12, qk_scale=30.0)
    kw = {"lengths": torch.tensor([37, 9], device=DEVICE)}
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out, grads = _out_and_grads(inputs, w, backend="triton", **kw)
    ref32, ref32_grads = _out_and_grads(inputs, w, backend="reference", **kw)
    truth, truth_grads = _out_and_grads([x.double() for x in inputs], w.double(), backend="reference", **kw)
    assert max_err(out, truth) <= 2 * max_err(ref32, truth) + 1e-5
    for g, r, t in zip(grads, ref32_grads, truth_grads):
        assert torch.isfinite(g).all()
        assert max_err(g, t) <= 3 * max_err(r, t) + 1e-5 * (1 + max_abs(t))


def test_non_contiguous_views_of_joined_hf_tensors():
    """k_p / k are slices of one joined (B, m + n, H, d) key tensor, q a transposed (B, n, H*d) projection."""
    b, h, n, m, d = 2, 2, 21, 3, 32
    g = torch.Generator().manual_seed(13)
    hidden_q = torch.randn(b, n, h * d, generator=g).to(DEVICE)
    joined_k, joined_v = (torch.randn(b, m + n, h, d, generator=g).to(DEVICE) for _ in range(2))
    q = hidden_q.view(b, n, h, d).transpose(1, 2)  # shape: (B, H, n, d), non-contiguous
    key, value = joined_k.transpose(1, 2), joined_v.transpose(1, 2)  # shape: (B, H, m + n, d)
    args = (q, key[:, :, m:], value[:, :, m:], key[:, :, :m], value[:, :, :m])
    assert not any(t.is_contiguous() for t in args)
    mask = (torch.rand(b, n, generator=g) < 0.7).to(DEVICE)
    leaves = [hidden_q.clone().requires_grad_(True), joined_k.clone().requires_grad_(True)]
    leaves.append(joined_v.clone().requires_grad_(True))
    outs, grads = [], []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        hq, jk, jv = (x.detach().to(dtype).requires_grad_(True) for x in leaves)
        key, value = jk.transpose(1, 2), jv.transpose(1, 2)
        qv = hq.view(b, n, h, d).transpose(1, 2)
        out = prefix_attention(
            qv, key[:, :, m:], value[:, :, m:], key[:, :, :m], value[:, :, :m], key_padding_mask=mask, backend=backend
        )
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (hq, jk, jv)))
    assert max_err(outs[0], outs[1]) <= 1e-5
    for g32, g64 in zip(*grads):
        assert max_err(g32, g64) <= 1e-5 * (1 + max_abs(g64))


def _blocks(monkeypatch, block_m, block_n):
    """Make the launchers use these block sizes (the configuration cache is cleared before and after)."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernels, "block_config", lambda *_: {name: dict(cfg) for name in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(kernels, "_META", {})


def test_launcher_block_sizes_and_lse(monkeypatch):
    """Block sizes do not change the result; LSE = log2-unit logsumexp of the visible scaled scores (+inf: none)."""
    b, h, n, m, d = 3, 1, 37, 16, 32
    q, k, v, k_p, v_p = _inputs(b, h, n, n, m, d, seed=14)
    lengths = torch.tensor([37, 20, 0], device=DEVICE)
    scale = 1 / math.sqrt(d)
    do = torch.randn_like(q)
    results = []
    for block_m, block_n in ((16, 16), (32, 64)):
        _blocks(monkeypatch, block_m, block_n)
        out, lse = launch_prefix_attention_fwd(q, k, v, k_p, v_p, None, lengths, None, 0.0, scale)
        grads = launch_prefix_attention_bwd(do, q, k, v, k_p, v_p, out, lse, None, lengths, None, 0.0, scale)
        results.append((out, lse, *grads))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    out16, lse16 = results[0][:2]
    mask = torch.arange(n, device=DEVICE) < lengths[:, None]
    scores = torch.cat(
        [q @ k_p.transpose(2, 3), (q @ k.transpose(2, 3)).masked_fill(~mask[:, None, None], -math.inf)], 3
    )
    torch.testing.assert_close(lse16, (scores * scale).logsumexp(-1) * math.log2(math.e), rtol=1e-5, atol=1e-5)
    # m = 0 and no visible token: out 0, lse +inf, grads 0
    out0, lse0 = launch_prefix_attention_fwd(q, k, v, k_p[:, :, :0], v_p[:, :, :0], None, lengths, None, 0.0, scale)
    assert (out0[2] == 0).all() and torch.isinf(lse0[2]).all() and torch.isfinite(lse0[:2]).all()
    grads0 = launch_prefix_attention_bwd(
        do, q, k, v, k_p[:, :, :0], v_p[:, :, :0], out0, lse0, None, lengths, None, 0.0, scale
    )
    assert all(torch.isfinite(g).all() for g in grads0) and (grads0[0][2] == 0).all()


def test_output_keeps_the_projection_memory_order():
    """q split from a (B, n, H*d) projection: out (and dq) come back in that memory order, so merging the heads
    back is a view; mixed input dtypes run in the widest one."""
    b, h, n, d = 2, 3, 11, 16
    proj = torch.randn(b, n, h * d, device=DEVICE)
    q = proj.view(b, n, h, d).transpose(1, 2)
    k, v, k_p, v_p = _inputs(b, h, n, n, 2, d, seed=3)[1:]
    out = prefix_attention(q, k, v, k_p, v_p, backend="triton")
    assert out.stride() == q.stride()
    out.transpose(1, 2).view(b, n, h * d)  # a view: raises if a copy were needed
    mixed = prefix_attention(q, k.half(), v, k_p, v_p.half(), backend="triton")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference(q, k.half().float(), v, k_p, v_p.half().float()), rtol=1e-5, atol=1e-5)


def test_fp16_within_reference_fp16_error():
    """DESIGN 6: error vs fp64 truth at most 2x (forward) / 3x (backward) the reference's own fp16 error."""
    inputs = _inputs(2, 2, 37, 37, 4, 32, seed=15, dtype=torch.float16, qk_scale=2.0)
    mask = (torch.rand(2, 37, generator=torch.Generator().manual_seed(3)) < 0.7).to(DEVICE)
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, grads = _out_and_grads(inputs, w, backend="triton", key_padding_mask=mask)
    low, low_grads = _out_and_grads(inputs, w, backend="reference", key_padding_mask=mask)
    truth, truth_grads = _out_and_grads(
        [x.double() for x in inputs], w.double(), backend="reference", key_padding_mask=mask
    )
    assert out.dtype == torch.float16
    assert max_err(out, truth) <= 2 * max_err(low, truth) + 1e-3
    for g, lo, t in zip(grads, low_grads, truth_grads):
        assert g.dtype == torch.float16
        assert max_err(g, t) <= 3 * max_err(lo, t) + 1e-3


# --------------------------------------------------------------------------------------------------- dropout


def _dropout_truth(inputs, keep, p, lengths, scale=None):
    """fp64 PyTorch attention with the given (B, H, n, m + n_k) keep-mask."""
    q, k, v, k_p, v_p = inputs
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    visible = torch.arange(k.shape[2], device=q.device) < lengths[:, None]  # shape: (B, n_k)
    s_t = (q @ k.transpose(2, 3) * scale).masked_fill(~visible[:, None, None], -math.inf)
    probs = torch.cat([q @ k_p.transpose(2, 3) * scale, s_t], 3).softmax(-1) * keep / (1 - p)
    return probs @ torch.cat([v_p, v], 2)


def test_dropout_matches_torch_with_the_materialized_keep_mask():
    b, h, n, m, d, p = 2, 2, 21, 3, 16, 0.3
    inputs = _inputs(b, h, n, n, m, d, seed=16)
    lengths = torch.tensor([21, 6], device=DEVICE)
    seed = draw_dropout_seed(torch.device(DEVICE), torch.Generator().manual_seed(7))
    keep = dropout_keep_mask(b, h, n, m, n, p, seed)
    assert keep.shape == (b, h, n, m + n) and keep.dtype == torch.bool
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = {"lengths": lengths, "dropout_p": p, "generator": torch.Generator().manual_seed(7)}
    out, grads = _out_and_grads(inputs, w, backend="triton", **kw)
    truth, truth_grads = _out_and_grads(
        [x.double() for x in inputs], w.double(), fn=lambda *x: _dropout_truth(x, keep, p, lengths)
    )
    assert max_err(out, truth) <= 1e-5 * (1 + max_abs(truth))
    for g, t in zip(grads, truth_grads):
        assert max_err(g, t) <= 1e-5 * (1 + max_abs(t))
    plain = prefix_attention(*inputs, lengths=lengths, backend="triton")
    assert max_err(out, plain) > 1e-2  # dropout did something


def test_dropout_seeds_and_drop_fraction():
    b, h, n, m, d, p = 1, 2, 16, 2, 16, 0.25
    inputs = _inputs(b, h, n, n, m, d, seed=17)

    def run(seed):
        return prefix_attention(*inputs, dropout_p=p, generator=torch.Generator().manual_seed(seed), backend="triton")

    first = run(1)
    assert torch.equal(first, run(1))
    assert not torch.allclose(first, run(2))

    def keep_mask(seed):
        return dropout_keep_mask(4, 4, 64, 5, 59, p, torch.tensor([seed], device=DEVICE))

    keep = keep_mask(123)
    assert abs(1 - keep.float().mean().item() - p) < 0.02
    assert not torch.equal(keep, keep_mask(124))
    assert torch.equal(keep, keep_mask(123))


# -------------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_without_native_is_the_reference(monkeypatch):
    from tpm_fast.ops import native

    monkeypatch.setattr(native, "_STATE", {"reason": "simulated: tpm_fast._C not built"})
    inputs = _inputs(2, 2, 9, 9, 3, 16, seed=18, device="cpu")
    lengths = torch.tensor([9, 4])
    assert torch.equal(prefix_attention(*inputs, lengths=lengths), reference(*inputs, lengths=lengths))
    kw = {"lengths": lengths, "dropout_p": 0.2}
    auto = prefix_attention(*inputs, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(auto, reference(*inputs, generator=torch.Generator().manual_seed(0), **kw))
    inputs64 = [x.double() for x in inputs]  # fp64 and odd head dims: the reference, also on "auto"
    assert torch.equal(prefix_attention(*inputs64, backend="auto"), reference(*inputs64))


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_bad_inputs_raise_like_the_reference(backend):
    (q, k, v, k_p, v_p) = _inputs(2, 2, 5, 5, 3, 16, seed=0)
    bad = [
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"key_padding_mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, "one device"),
        ({"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)}, "key_padding_mask"),
        ({"key_padding_mask": torch.ones(2, 5)}, "key_padding_mask"),
        ({"lengths": torch.tensor([5])}, "lengths"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            reference(q, k, v, k_p, v_p, **kwargs)
        with pytest.raises(ValueError, match=msg):
            prefix_attention(q, k, v, k_p, v_p, backend=backend, **kwargs)
    with pytest.raises(ValueError, match="expected q"):
        prefix_attention(q[0], k, v, k_p, v_p, backend=backend)
    with pytest.raises(ValueError, match="mismatch"):
        prefix_attention(q, k[:1], v[:1], k_p, v_p, backend=backend)


def test_backend_errors():
    inputs = _inputs(1, 1, 5, 5, 2, 16, seed=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        prefix_attention(*[x.double() for x in inputs], backend="triton")
    with pytest.raises(ValueError, match="power of 2"):
        prefix_attention(*[x[..., :12] for x in inputs], backend="triton")


# -------------------------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_matches_eager():
    inputs = _inputs(2, 2, 19, 19, 4, 16, seed=19)
    mask = (torch.rand(2, 19, generator=torch.Generator().manual_seed(6)) < 0.7).to(DEVICE)

    def fn(q, k, v, k_p, v_p):  # dropout traces too: its seed is drawn on the device, no .item()
        return prefix_attention(q, k, v, k_p, v_p, key_padding_mask=mask, dropout_p=0.2, backend="triton")

    def seeded(f):
        return lambda *x: (torch.manual_seed(5), f(*x))[1]

    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    eager, eager_grads = _out_and_grads(inputs, w, fn=seeded(fn))
    compiled_fn = seeded(torch.compile(fn, backend="aot_eager", fullgraph=True))
    compiled, compiled_grads = _out_and_grads(inputs, w, fn=compiled_fn)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, c in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_opcheck_custom_ops():
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (tiny shapes)."""
    q, k, v, k_p, v_p = _inputs(1, 2, 5, 7, 3, 16, seed=20)
    lengths = torch.tensor([6], device=DEVICE)
    mask = torch.tensor([[True, False, True, True, False, True, False]], device=DEVICE)
    leaves = [x.requires_grad_(True) for x in (q, k, v, k_p, v_p)]
    for key_padding_mask in (None, mask):
        torch.library.opcheck(
            torch.ops.tpm_fast.prefix_attention_fwd.default, (*leaves, key_padding_mask, lengths, None, 0.0, 0.25)
        )
    seed = torch.tensor([3], device=DEVICE)
    out, lse = torch.ops.tpm_fast.prefix_attention_fwd(q, k, v, k_p, v_p, mask, lengths, seed, 0.1, 0.25)
    do = torch.randn_like(out)
    args = (do, q.detach(), k.detach(), v.detach(), k_p.detach(), v_p.detach(), out.detach(), lse, mask, lengths)
    torch.library.opcheck(torch.ops.tpm_fast.prefix_attention_bwd.default, (*args, seed, 0.1, 0.25))


# ------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not CUDA, reason="bf16 arithmetic is wrong under the Triton interpreter: GPU only")
@pytest.mark.parametrize("b,h,n,n_k,m,d", [(2, 3, 37, 37, 4, 64), (2, 2, 19, 45, 16, 128), (3, 2, 7, 7, 0, 32)])
def test_bf16_within_reference_bf16_error(b, h, n, n_k, m, d):
    inputs = _inputs(b, h, n, n_k, m, d, seed=21, dtype=torch.bfloat16, qk_scale=2.0)
    mask = (torch.rand(b, n_k, generator=torch.Generator().manual_seed(9)) < 0.7).to(DEVICE)
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    out, grads = _out_and_grads(inputs, w, backend="triton", key_padding_mask=mask)
    low, low_grads = _out_and_grads(inputs, w, backend="reference", key_padding_mask=mask)
    truth, truth_grads = _out_and_grads(
        [x.double() for x in inputs], w.double(), backend="reference", key_padding_mask=mask
    )
    assert out.dtype == torch.bfloat16
    assert max_err(out, truth) <= 2 * max_err(low, truth) + 1e-2
    for g, lo, t in zip(grads, low_grads, truth_grads):
        assert g.dtype == torch.bfloat16
        assert max_err(g, t) <= 3 * max_err(lo, t) + 1e-2


@pytest.mark.skipif(not CUDA, reason="full-size run: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,m", [(8, 128, 4), (2, 512, 16)])
def test_full_size_gpu(dtype, b, n, m):
    h, d = 12, 64
    inputs = _inputs(b, h, n, n, m, d, seed=22, dtype=dtype)
    lengths = torch.randint(0, n + 1, (b,), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    lengths[0] = n
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    out, grads = _out_and_grads(inputs, w, backend="triton", lengths=lengths)
    low, low_grads = _out_and_grads(inputs, w, backend="reference", lengths=lengths)
    truth, truth_grads = _out_and_grads([x.double() for x in inputs], w.double(), backend="reference", lengths=lengths)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_err(out, truth) <= 2 * max_err(low, truth) + tol
    for g, lo, t in zip(grads, low_grads, truth_grads):
        assert max_err(g, t) <= 3 * max_err(lo, t) + tol * (1 + max_abs(t))
