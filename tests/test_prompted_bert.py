"""The prompted BERT equals HF BertModel with a DynamicCache prefix on the same weights (outputs and gradients at
the real word pieces; padded positions are 0 and pass no gradient when padding is skipped)."""

import pytest
import torch
from transformers import DynamicCache

from tests.oracles import DEVICE, tiny_bert
from tpm_fast.layers.prompted_bert import pack_index, prompted_bert
from tpm_fast.ops.backend import native_unavailable_reason

SHAPES = [(3, 7, 4, 2, 4, 8), (1, 1, 1, 1, 2, 4), (5, 13, 3, 3, 3, 5)]  # B, n, m, L, H, d_h


def _case(batch, n, m, layers, heads, head_dim, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    bert = tiny_bert(layers, heads, head_dim).to(device, dtype)
    ids = torch.randint(0, 50, (batch, n), generator=g)
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    if batch > 2:
        lengths[1] = 0  # a fully padded post: prefix slots are still visible
    mask = (torch.arange(n)[None] < lengths[:, None]).to(device)  # shape: (B, n)
    shape = (batch, heads, m, head_dim)
    prefix = [
        tuple(torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_() for _ in "kv")
        for _ in range(layers)
    ]
    upstream = torch.randn(batch, n, heads * head_dim, generator=g, dtype=dtype).to(device)
    return bert, ids.to(device), mask, prefix, upstream * mask[..., None]  # upstream on the real pieces only


def _hf(bert, ids, mask, prefix, shift_positions=True):
    batch, n = ids.shape
    if prefix is None:
        return bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    m = prefix[0][0].shape[2]
    position_ids = None if shift_positions else torch.arange(n, device=ids.device).expand(batch, n)
    full_mask = torch.cat([torch.ones(batch, m, dtype=torch.long, device=ids.device), mask.long()], 1)  # (B, m + n)
    cache = DynamicCache([(k, v) for k, v in prefix])
    return bert(input_ids=ids, attention_mask=full_mask, cache=cache, position_ids=position_ids).last_hidden_state


def _assert_matches(ours, hf, mask, grads_ours, grads_hf, tol, packed):
    real = mask[..., None]
    torch.testing.assert_close(ours * real, hf * real, rtol=tol, atol=tol)
    if packed:
        assert not ours[~mask].any()  # padded positions are exactly 0
    for a, b in zip(grads_ours, grads_hf):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("batch,n,m,layers,heads,head_dim", SHAPES)
@pytest.mark.parametrize("shift_positions", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_matches_hf_dynamic_cache(batch, n, m, layers, heads, head_dim, shift_positions, packed):
    bert, ids, mask, prefix, upstream = _case(batch, n, m, layers, heads, head_dim, seed=batch * 100 + n)
    inputs = [*bert.parameters(), *[t for p in prefix for t in p]]
    index = pack_index(mask) if packed else None
    ours = prompted_bert(bert, ids, mask, prefix, shift_positions, pack=packed, token_index=index)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), inputs)
    hf = _hf(bert, ids, mask, prefix, shift_positions)
    grads_hf = torch.autograd.grad((hf * upstream).sum(), inputs)
    _assert_matches(ours, hf, mask, grads_ours, grads_hf, 1e-10, packed)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_backends_match_hf(backend, with_prefix):
    """Each attention backend in the packed prompted BERT (fp32) == HF (+ DynamicCache), outputs and gradients;
    without a prefix (text-only mode) == plain BertModel."""
    if backend == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    device = DEVICE if backend == "triton" else "cpu"
    bert, ids, mask, prefix, upstream = _case(3, 9, 4, 2, 2, 16, seed=7, dtype=torch.float32, device=device)
    prefix = prefix if with_prefix else None
    inputs = [*bert.parameters(), *([t for p in prefix for t in p] if prefix else [])]
    ours = prompted_bert(bert, ids, mask, prefix, backend=backend, token_index=pack_index(mask))
    grads_ours = torch.autograd.grad((ours * upstream).sum(), inputs)
    hf = _hf(bert, ids, mask, prefix)
    grads_hf = torch.autograd.grad((hf * upstream).sum(), inputs)
    _assert_matches(ours, hf, mask, grads_ours, grads_hf, 1e-5, packed=True)


def test_cpu_packs_without_a_token_index():
    bert, ids, mask, prefix, _ = _case(3, 7, 2, 1, 2, 4, seed=3)
    torch.testing.assert_close(
        prompted_bert(bert, ids, mask, prefix), prompted_bert(bert, ids, mask, prefix, token_index=pack_index(mask))
    )
    assert not prompted_bert(bert, ids, mask, prefix)[~mask].any()


def test_prefix_layer_count_checked():
    bert = tiny_bert(2, 2, 4).double()
    prefix = [(torch.zeros(1, 2, 4, 4, dtype=torch.float64),) * 2]
    with pytest.raises(ValueError, match="prefix has 1 layers, BERT has 2"):
        prompted_bert(bert, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), prefix)
