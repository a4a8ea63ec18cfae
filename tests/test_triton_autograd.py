"""csrc/triton_autograd.cpp: the C++ autograd nodes of the Triton path against the Python autograd.Functions they
stand in for (same launches, so the same bits), on CPU via TRITON_INTERPRET=1; graph, grad-mode and error
behaviour; Python references released with the graph."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.oracles import attention_inputs, crf_inputs
from tpm_fast.ops import crf as crf_ops
from tpm_fast.ops import native
from tpm_fast.ops import prefix_attention as attention_ops
from tpm_fast.ops.prefix_attention import draw_dropout_seed, key_bounds

pytestmark = [
    pytest.mark.filterwarnings("ignore:Dynamo detected a call"),
    pytest.mark.skipif(native.extension() is None, reason=str(native.unavailable_reason())),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _python_fallback(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"reason": "simulated: tpm_fast._C not built"})


def _attention(inputs, mask, lengths, dropout_p, seed, grad, **kw):
    """prefix_attention (Triton) output and its five gradients for fresh leaves; the dropout seed fixed."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = attention_ops.prefix_attention(
        *leaves, key_padding_mask=mask, lengths=lengths, dropout_p=dropout_p, generator=gen, backend="triton", **kw
    )
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("b,h,n,n_k,m,d", [(2, 2, 7, 7, 4, 16), (3, 1, 19, 5, 0, 32), (2, 2, 37, 37, 1, 16)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_node_matches_the_python_function(b, h, n, n_k, m, d, dropout_p, monkeypatch):
    inputs = attention_inputs(b, h, n, n_k, m, d, seed=n + m + d, device=DEVICE)
    mask = (torch.rand(b, n_k, generator=torch.Generator().manual_seed(n)) > 0.3).to(DEVICE)  # shape: (B, n_k)
    mask[:, 0] = True
    grad = torch.randn(b, h, d, n, generator=torch.Generator().manual_seed(d)).to(DEVICE).transpose(2, 3)  # strided
    ours = _attention(inputs, mask, key_bounds(mask), dropout_p, 7, grad)
    assert "PrefixAttention" in ours[0].grad_fn.name()
    _python_fallback(monkeypatch)
    theirs = _attention(inputs, mask, key_bounds(mask), dropout_p, 7, grad)
    assert type(theirs[0].grad_fn).__name__ == "PrefixAttentionFuncBackward"
    for a, t in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert a.shape == t.shape and a.stride() == t.stride() and torch.equal(a, t)


@pytest.mark.parametrize("with_tags", [True, False])
@pytest.mark.parametrize("param_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crf_node_matches_the_python_function(with_tags, param_grads, dtype, monkeypatch):
    em, tags, mask, params = crf_inputs(5, 9, 6, seed=11, dtype=dtype, device=DEVICE)
    w = torch.randn(5, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run():
        leaves = [em.detach().clone().requires_grad_(True)]
        leaves += [p.detach().clone().requires_grad_(param_grads) for p in params]
        if with_tags:
            out = crf_ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton", validate=False)
        else:
            out = crf_ops.crf_log_partition(leaves[0], mask, *leaves[1:], backend="triton", validate=False)
        wanted = leaves if param_grads else leaves[:1]
        return out, torch.autograd.grad(out, wanted, w), out.grad_fn.name()

    ours = run()
    assert "CRFLogLikelihood" in ours[2]
    _python_fallback(monkeypatch)
    theirs = run()
    assert theirs[2] == "CRFLogLikelihoodFuncBackward"
    assert torch.equal(ours[0], theirs[0])
    assert len(ours[1]) == len(theirs[1]) == (4 if param_grads else 1)
    for a, t in zip(ours[1], theirs[1]):
        assert a.dtype == t.dtype and a.shape == t.shape and torch.equal(a, t)
    assert ours[1][0].dtype == dtype


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_tags", [True, False])
@pytest.mark.parametrize("b", [5, 0])
def test_crf_node_reduces_like_python(reduction, with_tags, b, monkeypatch):
    """``reduction="sum"/"mean"``: the node returns the scalar itself (no reduction node in the graph) and gives
    what the Python path gives reducing its (B,) afterwards, bit for bit (empty batch: mean NaN, grads empty / 0)."""
    em, tags, mask, params = crf_inputs(5, 9, 6, seed=12 + b, device=DEVICE)
    em, tags, mask = em[:b], tags[:b].clamp_min(0), mask[:b]
    scale = torch.tensor(-1.7, device=DEVICE)  # the scalar's incoming grad

    def run():
        leaves = [x.detach().clone().requires_grad_(True) for x in (em, *params)]
        gold = (tags,) if with_tags else ()
        op = crf_ops.crf_log_likelihood if with_tags else crf_ops.crf_log_partition
        out = op(leaves[0], *gold, mask, *leaves[1:], backend="triton", validate=False, reduction=reduction)
        return out, torch.autograd.grad(out, leaves, scale), out.grad_fn.name()

    ours = run()
    assert "CRFLogLikelihood" in ours[2] and ours[0].shape == ()
    _python_fallback(monkeypatch)
    theirs = run()
    assert theirs[2] == ("SumBackward0" if reduction == "sum" else "MeanBackward0")
    assert torch.equal(ours[0], theirs[0]) or (b == 0 and ours[0].isnan() and theirs[0].isnan())
    for a, t in zip(ours[1], theirs[1]):
        assert a.dtype == t.dtype and a.shape == t.shape and torch.equal(a, t)


def _crf_run(em, tags, mask, params, w):
    """crf_log_likelihood (Triton) and the gradients of ``(out * w).sum()`` w.r.t. fresh leaves of em and params."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (em, *params)]
    out = crf_ops.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:], backend="triton", validate=False)
    return out, torch.autograd.grad(out, leaves, w)


@pytest.mark.parametrize("layout", ["strided", "uint8_mask", "empty_batch"])
def test_crf_node_launch_arguments(layout, monkeypatch):
    """The C++ node builds the launch arguments itself: strided emissions (last dim too, copied), tags, mask and
    transitions, a uint8 mask and an empty batch give what the Python launchers give, bit for bit."""
    em, tags, mask, params = crf_inputs(4, 11, 5, seed=len(layout), device=DEVICE)
    tags = tags.clamp_min(0)
    if layout == "empty_batch":
        em, tags, mask = em[:0], tags[:0], mask[:0]
    elif layout == "strided":
        em = em.transpose(1, 2).contiguous().transpose(1, 2)  # shape: (B, n, T), stride(2) = n
        tags = torch.cat([tags, tags], 1)[:, ::2]  # shape: (B, n), stride(1) = 2
        mask = mask.t().contiguous().t()  # shape: (B, n), column-major
        params[2] = params[2].t().contiguous().t()  # shape: (T, T), column-major
    elif layout == "uint8_mask":
        mask = mask.to(torch.uint8) * 3  # nonzero = on
    w = torch.randn(em.shape[0], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ours = _crf_run(em, tags, mask, params, w)
    assert "CRFLogLikelihood" in ours[0].grad_fn.name()
    _python_fallback(monkeypatch)
    theirs = _crf_run(em, tags, mask, params, w)
    for a, t in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert a.shape == t.shape and torch.equal(a, t)


def test_crf_launch_errors_propagate(monkeypatch):
    em, tags, mask, params = crf_inputs(3, 6, 4, seed=3, device=DEVICE)
    leaves = [x.requires_grad_(True) for x in (em, *params)]
    kernels = crf_ops._kernels()

    class Failing:
        def run(self, *args, **kwargs):
            raise KeyError("injected launch failure")

    def llh():
        return crf_ops.crf_log_likelihood(leaves[0], tags.clamp_min(0), mask, *leaves[1:], backend="triton")

    monkeypatch.setattr(kernels, "_crf_forward_kernel", Failing())
    with pytest.raises(KeyError, match="injected launch failure"):  # forward: the Python exception itself
        llh()
    monkeypatch.undo()
    out = llh()
    monkeypatch.setattr(kernels, "_crf_backward_kernel", Failing())
    out2 = llh()
    torch.autograd.grad(out.sum(), leaves)  # its kernels were taken when its forward ran: unaffected
    with pytest.raises(Exception, match="injected launch failure"):  # backward: raised through the engine
        torch.autograd.grad(out2.sum(), leaves)


def test_crf_node_releases_its_launch_spec():
    em, tags, mask, params = crf_inputs(2, 5, 3, seed=4, device=DEVICE)
    leaves = [x.requires_grad_(True) for x in (em, *params)]
    kernels = crf_ops._kernels()

    class Backward:  # the backward kernel, in an object that a weak reference can watch
        def run(self, *args, **kwargs):
            return kernels._crf_backward_kernel.run(*args, **kwargs)

    forward, fwd_options, _, bwd_options = kernels.launch_spec(3, True, 2)
    backward = Backward()
    watched = weakref.ref(backward)
    spec = (forward, fwd_options, backward, bwd_options)
    out = native.extension().crf_autograd(leaves[0], tags.clamp_min(0), mask, *leaves[1:], spec, 0)
    del spec, backward
    gc.collect()
    assert watched() is not None  # the graph holds it
    torch.autograd.grad(out.sum(), leaves, retain_graph=True)
    del out
    gc.collect()
    assert watched() is None


def test_no_graph_under_no_grad_and_inference_mode():
    inputs = attention_inputs(2, 1, 5, 5, 2, 16, seed=0, device=DEVICE)
    leaves = [x.requires_grad_(True) for x in inputs]
    with torch.no_grad():
        out = attention_ops.prefix_attention(*leaves, backend="triton")
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():
        expected = attention_ops.prefix_attention(*inputs, backend="triton")
    assert torch.equal(out, expected)
    out = attention_ops.prefix_attention(*[x.detach() for x in inputs], backend="triton")  # nothing needs a grad
    assert out.grad_fn is None


def test_launcher_errors_propagate(monkeypatch):
    inputs = attention_inputs(2, 1, 5, 5, 2, 16, seed=1, device=DEVICE)
    leaves = [x.requires_grad_(True) for x in inputs]
    kernels = attention_ops._kernels()

    def failing(*args):
        raise KeyError("injected launch failure")

    monkeypatch.setattr(kernels, "launch_fwd_into", failing)
    with pytest.raises(KeyError, match="injected launch failure"):  # forward: the Python exception itself
        attention_ops.prefix_attention(*leaves, backend="triton")
    monkeypatch.undo()
    out = attention_ops.prefix_attention(*leaves, backend="triton")
    monkeypatch.setattr(kernels, "launch_bwd_into", failing)
    out2 = attention_ops.prefix_attention(*leaves, backend="triton")
    torch.autograd.grad(out, leaves, torch.ones_like(out))  # launched before the patch: unaffected
    with pytest.raises(Exception, match="injected launch failure"):  # backward: raised through the engine
        torch.autograd.grad(out2, leaves, torch.ones_like(out2))


def test_python_references_are_released_with_the_graph():
    """The node holds the launch plan and the backward launcher until the graph dies, then lets them go."""
    inputs = [x.requires_grad_(True) for x in attention_inputs(2, 2, 9, 9, 3, 16, seed=2, device=DEVICE)]
    kernels = attention_ops._kernels()
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    seed = draw_dropout_seed(inputs[0].device)
    plan = kernels.plan_launches(inputs[0], inputs[1], inputs[3], mask, None, seed, 0.1, 0.25)

    def launch_bwd(*args):  # a fresh function object, so that a weak reference can watch it
        return kernels.launch_bwd_into(*args)

    watched = weakref.ref(launch_bwd)
    out = native.extension().prefix_attention_autograd(*inputs, plan, kernels.launch_fwd_into, launch_bwd)
    del launch_bwd
    gc.collect()
    assert watched() is not None  # the graph holds it
    torch.autograd.grad(out, inputs, torch.ones_like(out), retain_graph=True)
    del out
    gc.collect()
    assert watched() is None
