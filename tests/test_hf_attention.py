"""The "tpm_prefix" transformers attention: HF BertModel + DynamicCache prefix, same outputs and gradients with and
without the patch, and the patched model really runs our kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertModel, DynamicCache

import tpm_fast
from tests.oracles import DEVICE, tiny_bert
from tpm_fast.kernels import prefix_attention as launchers
from tpm_fast.layers import hf_attention


def _inputs(bert: BertModel, b: int, n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = bert.config
    ids = torch.randint(0, cfg.vocab_size, (b, n), generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = torch.cat([torch.ones(b, m, dtype=torch.long), (torch.arange(n) < lengths[:, None]).long()], 1)
    shape = (b, cfg.num_attention_heads, m, cfg.hidden_size // cfg.num_attention_heads)
    prefix = [tuple(torch.randn(shape, generator=g) for _ in range(2)) for _ in range(cfg.num_hidden_layers)]
    return ids.to(DEVICE), mask.to(DEVICE), [tuple(t.to(DEVICE) for t in kv) for kv in prefix]


def _run(bert: BertModel, ids, mask, prefix):
    """Forward (new DynamicCache per call, HVPNeT style) + backward; returns the output and every gradient."""
    prefix = [tuple(t.clone().requires_grad_(True) for t in kv) for kv in prefix]
    hidden = bert(input_ids=ids, attention_mask=mask, cache=DynamicCache(prefix)).last_hidden_state
    weights = torch.linspace(-1, 1, hidden.numel(), device=hidden.device).view(hidden.shape)
    grads = torch.autograd.grad((hidden * weights).sum(), [*bert.parameters(), *[t for kv in prefix for t in kv]])
    return hidden, grads


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("b,n,m", [(3, 9, 4), (2, 1, 1), (4, 17, 3)])
def test_patched_bert_matches_hf(backend, b, n, m):
    bert = tiny_bert(attn="sdpa", vocab=60).to(DEVICE)
    patched = tpm_fast.apply_to_bert(copy.deepcopy(bert), backend=backend)
    assert patched.config._attn_implementation == "tpm_prefix"
    ids, mask, prefix = _inputs(bert, b, n, m, seed=b * 10 + n)
    expected, expected_grads = _run(bert, ids, mask, prefix)
    out, grads = _run(patched, ids, mask, prefix)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_patched_bert_calls_our_kernel(monkeypatch):
    """Spy on the Triton launchers themselves: one forward launch per layer, one backward launch per layer."""
    bert = tpm_fast.apply_to_bert(tiny_bert(layers=3, attn="sdpa", vocab=60).to(DEVICE), backend="triton")
    calls = []
    for name in ("launch_fwd_into", "launch_bwd_into"):
        real = getattr(launchers, name)
        monkeypatch.setattr(
            launchers, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    ids, mask, prefix = _inputs(bert, 2, 5, 2, seed=1)
    _run(bert, ids, mask, prefix)
    assert calls == ["launch_fwd_into"] * 3 + ["launch_bwd_into"] * 3


def test_from_pretrained_with_registered_name(tmp_path):
    bert = tiny_bert(attn="sdpa", vocab=60).to(DEVICE)
    bert.save_pretrained(tmp_path)
    hf_attention.register()
    loaded = BertModel.from_pretrained(
        tmp_path, attn_implementation="tpm_prefix", add_pooling_layer=False, local_files_only=True
    )
    assert loaded.config._attn_implementation == "tpm_prefix"
    loaded.to(DEVICE)
    ids, mask, prefix = _inputs(bert, 3, 6, 2, seed=2)
    expected, _ = _run(bert, ids, mask, prefix)
    out, _ = _run(loaded, ids, mask, prefix)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_no_padding_and_no_prefix():
    """Without padding the mask function hands over None; without a cache m = 0 (plain BERT self-attention)."""
    bert = tiny_bert(attn="sdpa", vocab=60)
    patched = tpm_fast.apply_to_bert(copy.deepcopy(bert), backend="reference")
    ids = torch.randint(0, 60, (2, 7))
    ones = torch.ones(2, 7, dtype=torch.long)
    expected = bert(input_ids=ids, attention_mask=ones).last_hidden_state
    out = patched(input_ids=ids, attention_mask=ones).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        tpm_fast.apply_to_bert(tiny_bert(attn="sdpa", vocab=60), backend="cuda")
