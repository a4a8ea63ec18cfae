"""tpm_fast.reference.prefix_attention against the HF-style eager recipe (cat, matmul, additive mask, softmax)."""

from __future__ import annotations

import math

import pytest
import torch

from tpm_fast.reference.prefix_attention import prefix_attention


def _eager(q, k, v, k_p, v_p, key_padding_mask=None):
    """The authors' recipe: concatenate prefix and tokens, additive mask (finfo.min), softmax, matmul."""
    b, _, _, d = q.shape
    keys, values = torch.cat([k_p, k], 2), torch.cat([v_p, v], 2)  # shape: (B, H, m+n, d)
    scores = q @ keys.transpose(2, 3) / math.sqrt(d)  # shape: (B, H, n, m+n)
    if key_padding_mask is not None:
        visible = torch.cat([torch.ones(b, k_p.shape[2], dtype=torch.bool), key_padding_mask], 1)
        additive = torch.zeros(visible.shape, dtype=scores.dtype).masked_fill(~visible, torch.finfo(scores.dtype).min)
        scores = scores + additive[:, None, None]  # shape: (B, 1, 1, m+n) broadcast
    return torch.softmax(scores, -1) @ values


def _inputs(b, h, n, m, d, seed, dtype=torch.float32, scale=1.0, fully_padded=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    k_p, v_p = (torch.randn(b, h, m, d, generator=g) for _ in range(2))
    q = q * scale
    lengths = torch.randint(0 if fully_padded else 1, n + 1, (b,), generator=g)
    lengths[0] = n
    if b > 1 and fully_padded:
        lengths[-1] = 0  # fully padded row: prefix-only attention
    return [x.to(dtype) for x in (q, k, v, k_p, v_p)], lengths


SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 4, 8), (3, 2, 7, 1, 13), (2, 12, 17, 4, 64), (4, 1, 11, 3, 5)]


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("use_lengths", [True, False])
@pytest.mark.parametrize("b,h,n,m,d", SHAPES)
def test_forward_and_grads_match_eager_fp64(b, h, n, m, d, use_lengths, scale):
    inputs, lengths = _inputs(b, h, n, m, d, seed=b * h + n + m + d, scale=scale)
    inputs = [x.requires_grad_(True) for x in inputs]
    mask = torch.arange(n) < lengths.unsqueeze(1)  # shape: (B, n)
    kw = {"lengths": lengths} if use_lengths else {"key_padding_mask": mask}
    out = prefix_attention(*inputs, **kw)
    assert out.dtype == torch.float32 and out.shape == (b, h, n, d) and torch.isfinite(out).all()
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = _eager(*ref_inputs, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * scale)


def test_fully_padded_row_is_prefix_only_attention():
    (q, k, v, k_p, v_p), _ = _inputs(2, 3, 6, 4, 8, seed=3)
    out = prefix_attention(q, k, v, k_p, v_p, lengths=torch.tensor([6, 0]))
    prefix_only = torch.softmax(q[1] @ k_p[1].transpose(1, 2) / math.sqrt(8), -1) @ v_p[1]
    torch.testing.assert_close(out[1], prefix_only)


def test_arbitrary_masks_and_cross_lengths():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 2, 5, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 3, 2, 9, 8, generator=g, dtype=torch.float64)
    k_p, v_p = torch.randn(2, 3, 2, 3, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 9, generator=g) < 0.5  # not left-aligned, n_k != n
    torch.testing.assert_close(prefix_attention(q, k, v, k_p, v_p, mask), _eager(q, k, v, k_p, v_p, mask))
    torch.testing.assert_close(prefix_attention(q, k, v, k_p, v_p), _eager(q, k, v, k_p, v_p))


def test_no_prefix_slots():
    (q, k, v, k_p, v_p), lengths = _inputs(3, 2, 7, 0, 8, seed=5, dtype=torch.float64)
    mask = torch.arange(7) < lengths.unsqueeze(1)
    out = prefix_attention(q, k, v, k_p, v_p, lengths=lengths)
    real = lengths > 0
    torch.testing.assert_close(out[real], _eager(q, k, v, k_p, v_p, mask)[real])
    assert (out[~real] == 0).all() and not real.all()  # no visible key at all: zeros, never NaN


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,n,m,d", [(2, 3, 13, 4, 16), (3, 2, 7, 1, 64)])
def test_low_precision_error_within_eager_own_error(b, h, n, m, d, dtype):
    inputs, lengths = _inputs(b, h, n, m, d, seed=n + d, dtype=dtype, scale=3.0)
    mask = torch.arange(n) < lengths.unsqueeze(1)
    inputs = [x.requires_grad_(True) for x in inputs]
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    low_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = prefix_attention(*inputs, key_padding_mask=mask)
    assert out.dtype == dtype
    ref = _eager(*ref_inputs, key_padding_mask=mask)
    low = _eager(*low_inputs, key_padding_mask=mask)
    assert _err(out, ref) <= 2 * _err(low, ref) + 1e-3
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w.to(dtype)).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_inputs)
    low_grads = torch.autograd.grad((low * w.to(dtype)).sum(), low_inputs)
    for g, r, lo in zip(grads, ref_grads, low_grads):
        assert g.dtype == dtype
        assert _err(g, r) <= 3 * _err(lo, r) + 1e-3


def test_dropout_is_reproducible_and_p0_is_identity():
    (q, k, v, k_p, v_p), lengths = _inputs(2, 3, 9, 4, 8, seed=6)
    plain = prefix_attention(q, k, v, k_p, v_p, lengths=lengths)
    torch.testing.assert_close(prefix_attention(q, k, v, k_p, v_p, lengths=lengths, dropout_p=0.0), plain)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return prefix_attention(q, k, v, k_p, v_p, lengths=lengths, dropout_p=0.3, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2)) and not torch.allclose(run(1), plain)


def test_dropout_preserves_the_mean():
    b, h, n, m, d = 4, 4, 32, 4, 2
    (q, k, _, k_p, _), lengths = _inputs(b, h, n, m, d, seed=7)
    v, v_p = torch.ones(b, h, n, d), torch.ones(b, h, m, d)  # without dropout every output is exactly 1
    gen = torch.Generator().manual_seed(0)
    out = prefix_attention(q, k, v, k_p, v_p, lengths=lengths, dropout_p=0.25, generator=gen)
    assert out.std() > 0.05  # dropout happened
    assert abs(out.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"key_padding_mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, "one device"),
        ({"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)}, "key_padding_mask"),
        ({"key_padding_mask": torch.ones(2, 5)}, "key_padding_mask"),
        ({"lengths": torch.tensor([5])}, "lengths"),
    ],
)
def test_bad_inputs_raise(kwargs, msg):
    (q, k, v, k_p, v_p), _ = _inputs(2, 2, 5, 3, 4, seed=0)
    with pytest.raises(ValueError, match=msg):
        prefix_attention(q, k, v, k_p, v_p, **kwargs)
    with pytest.raises(ValueError, match="expected q"):
        prefix_attention(q[0], k, v, k_p, v_p)


def test_mask_and_lengths_are_anded():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    k_p, v_p = (torch.randn(2, 2, 2, 8, generator=g) for _ in range(2))
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)
    lengths = torch.tensor([4, 2])
    both = prefix_attention(q, k, v, k_p, v_p, key_padding_mask=mask, lengths=lengths)
    anded = mask & (torch.arange(5) < lengths[:, None])
    torch.testing.assert_close(both, prefix_attention(q, k, v, k_p, v_p, key_padding_mask=anded))
