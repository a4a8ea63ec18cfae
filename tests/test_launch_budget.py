"""Launch budget of the Triton path, the CPU-side proxy for GPU launch overhead: Triton launches (kernels replaced by
no-ops at Triton's launch entry) and kernel-launching aten ops (``tpm_fast.profiling.count_kernel_ops``, which sees
inside custom ops and autograd), and no host sync anywhere in a training step.

Budgets: prefix attention fwd+bwd <= 3 launches and <= 4 other kernel ops; CRF fwd+bwd <= 2 launches and <= 6 ops
(tests/test_crf.py); Viterbi 1 launch; a whole TPM-MI training step at BERT-base + ViT-B/16 shapes: 3 launches per
layer + the CRF's, the key bounds computed once per forward, no host read and no sync op.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tpm_fast.kernels.prefix_attention as attention_kernels
import tpm_fast.model as model_module
from tpm_fast.data.labels import LABELS
from tpm_fast.layers.prompted_bert import pack_index, prompted_bert
from tpm_fast.model import TPMMI, TPMConfig
from tpm_fast.ops.prefix_attention import key_bounds, prefix_attention
from tpm_fast.plain_engine import PlainEngine
from tpm_fast.profiling import count_kernel_ops, count_triton_launches, forbid_host_reads

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU proxy: launches are stubbed on CPU tensors")


def _layer_inputs(b=2, n=9, h=3, d=16, m=4, seed=0):
    """q, k, v split into heads from (B, n, H*d) projections (as a BERT layer does), a prefix, a padding mask."""
    g = torch.Generator().manual_seed(seed)
    proj = [torch.randn(b, n, h * d, generator=g).requires_grad_(True) for _ in range(3)]
    prefix = [torch.randn(b, h, m, d, generator=g).requires_grad_(True) for _ in range(2)]
    mask = torch.arange(n) < torch.tensor([[n], [n - 3]])[:b]  # shape: (B, n)
    return proj, prefix, mask, (b, n, h, d)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_prefix_attention_layer_fwd_bwd_budget(dropout_p):
    proj, prefix, mask, (b, n, h, d) = _layer_inputs()
    bounds = key_bounds(mask)  # once per forward, outside the per-layer budget
    grad = torch.randn(b, n, h * d)

    def layer():
        q, k, v = (x.view(b, n, h, d).transpose(1, 2) for x in proj)
        out = prefix_attention(q, k, v, *prefix, mask, bounds, dropout_p, backend="triton", validate=False)
        context = out.transpose(1, 2).reshape(b, n, h * d)  # merge the heads back: a view on this path
        torch.autograd.grad(context, proj + prefix, grad)

    with count_triton_launches(stub=True) as launches:
        total, ops, syncs = count_kernel_ops(layer)
    assert sum(launches.values()) <= 3, launches
    assert total <= 4 and not syncs, (ops, syncs)
    assert ops.get("aten::copy_", 0) == 0, ops  # no layout copy of q / dO / the merged heads


def test_key_bounds_are_the_last_visible_key():
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert key_bounds(mask).tolist() == [4, 0, 1]
    assert key_bounds(mask[:, :0]).tolist() == [0, 0, 0]


BERT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=200,
    max_position_embeddings=80,
)  # fmt: skip
VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)


@pytest.mark.parametrize("packed", [True, False])
def test_training_step_at_bert_base_shapes_has_no_host_sync_and_its_launch_budget(monkeypatch, packed):
    """Packed: the batch carries the real pieces' index (as a CUDA caller passes it); padded: what CUDA runs by
    default (padding computed)."""
    if not packed:
        monkeypatch.setattr(model_module, "prompted_bert", functools.partial(prompted_bert, pack=False))
    torch.manual_seed(0)
    config = TPMConfig(bert=BERT_BASE, vit=VIT_B16)
    model = TPMMI(config, backend="triton").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine = PlainEngine(model, opt, gradient_clipping=1.0, skip_nonfinite=False)  # the non-finite check reads the norm
    b, n = 2, 20
    mask = torch.arange(n) < torch.tensor([[n], [13]])  # shape: (B, n), left-aligned as collate makes them
    image_mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    post, slot = image_mask.nonzero(as_tuple=True)
    batch = {
        "input_ids": torch.randint(1, 200, (b, n)) * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, len(LABELS), (b, n)) * mask,
        "pixel_values": torch.randn(len(post), 3, 224, 224),
        "image_post": post,
        "image_slot": slot,
        "image_mask": image_mask,
    }
    if packed:
        batch["token_index"] = pack_index(mask)  # made outside the step, where the mask is on the host
    bounds_seen, copied = [], []
    launch_fwd, canonical = attention_kernels.launch_fwd_into, attention_kernels.canonical_inputs

    def spy(plan, *args):
        bounds_seen.append(plan.tensors[1])  # lengths
        return launch_fwd(plan, *args)

    def spy_layout(*inputs):
        out = canonical(*inputs)
        copied.extend(a.data_ptr() != b.data_ptr() for a, b in zip(inputs, out))
        return out

    def step():
        with forbid_host_reads():
            loss = engine(batch)
            engine.backward(loss)
            engine.step()

    with count_triton_launches(stub=True):
        step()  # warm-up: the optimizer's first step allocates its state
    attention_kernels.launch_fwd_into, attention_kernels.canonical_inputs = spy, spy_layout
    try:
        with count_triton_launches(stub=True) as launches:
            _, ops, syncs = count_kernel_ops(step)
    finally:
        attention_kernels.launch_fwd_into, attention_kernels.canonical_inputs = launch_fwd, canonical
    layers = BERT_BASE["num_hidden_layers"]
    assert not syncs, syncs
    assert len(bounds_seen) == layers and all(t is bounds_seen[0] for t in bounds_seen)  # computed once, shared
    attention = {name: launches[name] for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")}
    assert attention == dict.fromkeys(attention, layers), launches
    assert sum(launches.values()) - 3 * layers <= 2, launches  # the CRF's forward + backward
    assert len(copied) == 5 * layers and not any(copied)  # q, k, v and the prefix are read in place, every layer
    assert "aten::select_backward" not in ops, ops  # the prefix's gradient is not scattered layer by layer
