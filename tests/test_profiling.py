"""Kernel-launching op counts (the CPU proxy for GPU launch overhead) and Triton launch counts."""

import torch

from tpm_fast.profiling import count_kernel_ops, count_triton_launches, stub_triton_launches


def test_views_and_allocations_are_free_computations_count():
    x = torch.randn(4, 6)
    total, ops, syncs = count_kernel_ops(lambda: x.view(6, 4).t().unsqueeze(0).expand(2, 4, 6).select(0, 1)[1:])
    assert total == 0 and not syncs
    total, ops, _ = count_kernel_ops(lambda: x.t().reshape(-1))  # a reshape that must copy
    assert ops == {"aten::copy_": 1}
    total, ops, _ = count_kernel_ops(lambda: torch.empty(3).add_(1).mul(2))
    assert total == 2
    total, ops, _ = count_kernel_ops(lambda: torch.zeros(3))  # a fill
    assert total == 1


def test_linear_forward_backward_and_reductions():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step():
        torch.nn.functional.gelu(lin(x)).sum().backward()

    total, ops, syncs = count_kernel_ops(step)
    # forward: addmm (+ its bias copy), gelu, sum; backward: the sum's fill, gelu_backward, mm (weight grad), and the
    # bias grad's sum; no host sync
    assert ops["aten::addmm"] == 1 and ops["aten::gelu"] == 1 and ops["aten::gelu_backward"] == 1
    assert ops["aten::sum"] == 2 and ops["aten::mm"] == 1
    assert total == sum(ops.values()) and not syncs


def test_fused_and_foreach_ops_count_once_and_syncs_are_reported():
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(7)]
    for p in params:
        p.grad = torch.randn(5)
    fused = torch.optim.AdamW(params, fused=True)
    fused.step()  # the first step allocates and zero-fills the moments
    total, ops, _ = count_kernel_ops(fused.step)
    assert ops["aten::_fused_adamw_"] == 1 and total <= 2  # the step counters' increment, the one fused update
    total, ops, _ = count_kernel_ops(lambda: torch._foreach_mul_([p.grad for p in params], 0.5))
    assert total == 1
    _, _, syncs = count_kernel_ops(lambda: torch.randn(3).sum().item())
    assert syncs["aten::_local_scalar_dense"] == 1


def test_triton_launches_counted_and_stubbed():
    from tpm_fast.ops.crf import crf_log_likelihood

    em = torch.randn(2, 5, 4, requires_grad=True)
    tags = torch.randint(0, 4, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True), torch.zeros(4, 4)]
    with count_triton_launches() as launches:
        crf_log_likelihood(em, tags, mask, *params, backend="triton").sum().backward()
    assert sum(launches.values()) == 2 and em.grad is not None and em.grad.abs().sum() > 0
    em.grad = None
    with count_triton_launches(stub=True) as launches:
        crf_log_likelihood(em, tags, mask, *params, backend="triton").sum().backward()
    assert sum(launches.values()) == 2


def test_stubbed_launches_do_nothing_and_are_restored():
    from triton.runtime import interpreter, jit

    from tpm_fast.ops.crf import crf_log_likelihood

    originals = (jit.JITFunction.run, interpreter.InterpretedFunction.run)
    em = torch.randn(2, 5, 4)
    tags, mask = torch.randint(0, 4, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    params = [torch.zeros(4), torch.zeros(4), torch.zeros(4, 4)]
    with count_triton_launches() as launches:
        counting = jit.JITFunction.run
        with stub_triton_launches():
            out = crf_log_likelihood(em, tags, mask, *params, backend="triton")
        assert not launches and out.shape == (2,)  # the stub replaced the counting entry: nothing counted
        assert jit.JITFunction.run is counting  # and gave it back
        crf_log_likelihood(em, tags, mask, *params, backend="triton")
        assert sum(launches.values()) == 1
    assert (jit.JITFunction.run, interpreter.InterpretedFunction.run) == originals
