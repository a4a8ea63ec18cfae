"""tpm_fast.layers.dropout: `Dropout` as a drop-in for nn.Dropout, `use_fast_dropout` over a BERT and TPM-MI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from tpm_fast.layers.dropout import Dropout, use_fast_dropout
from tpm_fast.model import TPMMI, TPMConfig
from tpm_fast.ops import native

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))


def _bert() -> BertModel:
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=20, hidden_dropout_prob=0.2)  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


def test_use_fast_dropout_replaces_every_nn_dropout():
    bert = _bert()
    before = [(name, m.p) for name, m in bert.named_modules() if isinstance(m, nn.Dropout)]
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    assert use_fast_dropout(bert) == len(before) == 1 + 2 * 3  # embeddings; per layer: attention probs, 2 outputs
    after = [(name, m.p) for name, m in bert.named_modules() if isinstance(m, nn.Dropout)]
    assert after == before and all(type(m) is Dropout for name, m in bert.named_modules() if "dropout" in name)
    assert bert.state_dict().keys() == state.keys() and all(torch.equal(bert.state_dict()[k], state[k]) for k in state)
    assert use_fast_dropout(bert, "reference") == len(before)  # idempotent: sets the backend
    assert {m.backend for m in bert.modules() if isinstance(m, Dropout)} == {"reference"}


@needs_native
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dropout_module_trains_and_evaluates_like_nn_dropout(backend):
    layer, x = Dropout(0.4, backend=backend), torch.randn(8, 50, requires_grad=True)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.6)
    assert ("native" in type(y.grad_fn).__name__) == (backend == "auto")
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept / 0.6)
    assert layer.eval()(x) is x
    inplace = Dropout(0.4, inplace=True)
    assert inplace(x.detach().clone()).grad_fn is None  # nn.Dropout's in-place path


@needs_native
def test_bert_and_tpm_mi_run_the_native_dropout():
    torch.manual_seed(0)
    bert = _bert()
    use_fast_dropout(bert)
    ids = torch.randint(0, 30, (3, 7))
    bert.train()(ids).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in bert.encoder.parameters())
    bert.eval()
    torch.testing.assert_close(bert(ids).last_hidden_state, bert(ids).last_hidden_state, rtol=0, atol=0)

    bert = dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = TPMMI(TPMConfig(bert=bert, image_mode="text"))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout and m.backend == "auto" for m in drops)
    model.backend = "reference"
    assert all(m.backend == "reference" for m in drops)


@needs_native
def test_dropout_module_compiles_fullgraph():
    """``--compile`` traces BERT's dropouts: the layer's dispatch and the native op in one graph, forward and
    backward (the extension is loaded before, as train.py's first lines do)."""
    native.load()
    layer, x = Dropout(0.2), torch.randn(8, 64, requires_grad=True)
    compiled = torch.compile(lambda x: layer(x) * 2, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    kept = y != 0
    assert 0.6 < kept.float().mean().item() < 0.95
    torch.testing.assert_close(x.grad, kept * 2 / 0.8)
