"""The prompted BERT equals HF BertModel with a DynamicCache prefix on the same weights (outputs and gradients)."""

import pytest
import torch
from transformers import DynamicCache

from tests.oracles import DEVICE, tiny_bert
from tpm_fast.layers.prompted_bert import prompted_bert

SHAPES = [(3, 7, 4, 2, 4, 8), (1, 1, 1, 1, 2, 4), (5, 13, 3, 3, 3, 5)]  # B, n, m, L, H, d_h


@pytest.mark.parametrize("batch,n,m,layers,heads,head_dim", SHAPES)
@pytest.mark.parametrize("shift_positions", [True, False])
def test_matches_hf_dynamic_cache(batch, n, m, layers, heads, head_dim, shift_positions):
    g = torch.Generator().manual_seed(batch * 100 + n)
    bert = tiny_bert(layers, heads, head_dim).double()
    ids = torch.randint(0, 50, (batch, n), generator=g)
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    if batch > 2:
        lengths[1] = 0  # a fully padded post: prefix slots are still visible
    mask = torch.arange(n)[None] < lengths[:, None]  # shape: (B, n)
    shape = (batch, heads, m, head_dim)
    prefix = [
        (
            torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True),
        )
        for _ in range(layers)
    ]
    ours = prompted_bert(bert, ids, mask, prefix, shift_positions)
    upstream = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), [*bert.parameters(), *[t for p in prefix for t in p]])

    position_ids = None if shift_positions else torch.arange(n).expand(batch, n)
    full_mask = torch.cat([torch.ones(batch, m, dtype=torch.long), mask.long()], 1)  # shape: (B, m + n)
    cache = DynamicCache([(k, v) for k, v in prefix])
    hf = bert(input_ids=ids, attention_mask=full_mask, cache=cache, position_ids=position_ids).last_hidden_state
    grads_hf = torch.autograd.grad((hf * upstream).sum(), [*bert.parameters(), *[t for p in prefix for t in p]])

    torch.testing.assert_close(ours, hf, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_ours, grads_hf):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_without_prefix_is_plain_bert():
    bert = tiny_bert(2, 2, 8).double()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    expected = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(prompted_bert(bert, ids, mask, None), expected)


def test_prefix_layer_count_checked():
    bert = tiny_bert(2, 2, 4).double()
    prefix = [(torch.zeros(1, 2, 4, 4, dtype=torch.float64),) * 2]
    with pytest.raises(ValueError, match="prefix has 1 layers, BERT has 2"):
        prompted_bert(bert, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), prefix)


@pytest.mark.parametrize("batch,n,m", [(3, 7, 4), (2, 1, 1)])
def test_triton_backend_matches_hf_dynamic_cache(batch, n, m):
    """The fused kernel in the prompted BERT (fp32; fp64 has no kernel) == HF + DynamicCache, outputs and grads."""
    g = torch.Generator().manual_seed(7 + n)
    bert = tiny_bert(2, 2, 16).to(DEVICE)
    ids = torch.randint(0, 50, (batch, n), generator=g)
    mask = torch.arange(n)[None] < torch.randint(1, n + 1, (batch,), generator=g)[:, None]  # shape: (B, n)
    mask[0] = True
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    prefix = [
        tuple(torch.randn(batch, 2, m, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2)) for _ in range(2)
    ]
    inputs = [*bert.parameters(), *[t for p in prefix for t in p]]
    ours = prompted_bert(bert, ids, mask, prefix, backend="triton")
    upstream = torch.randn(ours.shape, generator=g).to(DEVICE)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), inputs)
    full_mask = torch.cat([torch.ones(batch, m, dtype=torch.long, device=DEVICE), mask.long()], 1)
    hf = bert(input_ids=ids, attention_mask=full_mask, cache=DynamicCache(prefix)).last_hidden_state
    grads_hf = torch.autograd.grad((hf * upstream).sum(), inputs)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_ours, grads_hf):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
