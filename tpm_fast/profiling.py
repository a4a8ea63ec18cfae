"""Kernel-launching op counts: the CPU-side proxy for GPU launch overhead.

On a GPU each aten op that computes something launches at least one kernel, and at TPM-MI's sizes a launch
(~5 us of host time) can cost more than the kernel. :func:`count_kernel_ops` runs a function under
``torch.profiler`` and counts the aten ops that would launch a kernel, also those inside custom ops and autograd's
backward (the profiler sees them):

- views, reshapes, plain allocations and metadata ops count 0 (:data:`NO_KERNEL`);
- a composite op (``linear``, ``layer_norm``, ``zeros``, ``to``, ...) counts what it calls, not itself;
- reductions, ``_foreach_*`` and ``_fused_*`` ops count 1 each, whatever helpers the CPU implementation calls
  (the output fill of a CPU reduction, the per-tensor loop of a CPU ``_foreach`` op are one kernel on a GPU);
- fills (``zero_``, ``fill_``), copies and every other computing op count 1;
- ``torch.compile``'s generated CPU kernels (``cpp_fused_*``, visible with :func:`inductor_kernel_profiling`
  active while compiling) count 1 each.

Python scalars that an op converts (``x.add_(1)`` on CPU) are host work, not kernels. Ops that wait for the device
(``item``, ``nonzero``, ...) are reported separately: a host sync on a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like new_empty new_empty_strided view _unsafe_view view_as as_strided "
        "reshape _reshape_alias expand expand_as permute transpose t unsqueeze squeeze select slice narrow split "
        "split_with_sizes chunk unbind unflatten flatten alias detach detach_ lift_fresh resize_ set_ "
        "is_nonzero size stride numel dim result_type is_same_size contiguous to type_as movedim swapaxes "
        "unsafe_split unsafe_chunk diagonal conj resolve_conj resolve_neg _conj _neg_view is_complex "
        "is_floating_point record_stream scalar_tensor real"
    ).split()
)
"""Aten ops that launch no kernel: views and reshapes, allocations without a fill, metadata, host scalars."""

SYNC_OPS = frozenset("aten::" + name for name in "_local_scalar_dense nonzero masked_select unique _unique2".split())
"""Aten ops that wait for the device (a host sync on CUDA)."""

_ONE_KERNEL_PREFIXES = ("aten::_foreach_", "aten::_fused_")
_ONE_KERNEL = frozenset(
    "aten::" + name
    for name in "sum mean amax amin max min all any prod norm linalg_vector_norm argmax argmin logsumexp_out".split()
)
_SELF_AND_CHILDREN = frozenset("aten::" + name for name in "addmm addmm_ baddbmm addbmm addmv".split())
_COMPILED_PREFIXES = ("cpp_fused", "graph_")  # inductor's CPU kernels (named graph_<i>_cpp_fused_... in traces)


def _one_kernel(name: str) -> bool:
    return name.startswith(_ONE_KERNEL_PREFIXES) or name in _ONE_KERNEL


def _scalar_conversion(event) -> bool:
    """A dtype conversion of a 0-dim tensor inside another aten op: a wrapped Python scalar, converted on the host."""
    parent = event.cpu_parent
    return (
        event.name == "aten::to"
        and parent is not None
        and parent.name.startswith("aten::")
        and bool(event.input_shapes)
        and event.input_shapes[0] == []
    )


def count_kernel_ops(fn: Callable[[], object]) -> tuple[int, Counter, Counter]:
    """Run ``fn()`` once under the profiler and count its kernel-launching ops.

    Returns:
        (total count, Counter of op name -> count, Counter of host-sync op name -> count).
    """
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    ops: Counter = Counter()
    syncs: Counter = Counter()
    for event in prof.events():
        name = event.name
        if "cpp_fused" in name and name.startswith(_COMPILED_PREFIXES):
            ops["compiled kernel"] += 1
            continue
        if not name.startswith("aten::"):
            continue
        parent, inside_one = event.cpu_parent, False
        while parent is not None:
            inside_one = inside_one or _one_kernel(parent.name) or _scalar_conversion(parent)
            parent = parent.cpu_parent
        if inside_one or _scalar_conversion(event):
            continue  # a helper of a reduction / foreach / fused op, or a Python scalar's host-side conversion
        if name in SYNC_OPS:
            syncs[name] += 1
            continue
        if name in NO_KERNEL:
            continue
        if _one_kernel(name) or name in _SELF_AND_CHILDREN:
            ops[name] += 1
            continue
        if any(c.name.startswith("aten::") and c.name not in NO_KERNEL for c in event.cpu_children):
            continue  # a composite: what it calls is counted
        ops[name] += 1
    return sum(ops.values()), ops, syncs


def inductor_kernel_profiling() -> contextlib.AbstractContextManager:
    """While active, code that ``torch.compile`` compiles records each generated CPU kernel as a profiler event, so
    :func:`count_kernel_ops` counts it (compile inside this context, count after)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


@contextlib.contextmanager
def _triton_run_replaced(make_run):
    """Inside the block, Triton's launch entry (``JITFunction.run``, the interpreter's too) is make_run(original)."""
    from triton.runtime import interpreter, jit

    originals = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}
    for cls, original in originals.items():
        cls.run = make_run(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


@contextlib.contextmanager
def count_triton_launches(stub: bool = False):
    """Count Triton kernel launches (by kernel name) inside the block; with ``stub=True`` the launches do nothing.

    Stubbed launches leave their outputs unwritten: for counting the host side of a path without running its
    kernels (e.g. on CPU tensors under ``TRITON_INTERPRET=1``), never for results.

    Yields:
        A Counter of kernel name -> launches, filled as the block runs.
    """
    launches: Counter = Counter()

    def patched(original):
        def run(self, *args, **kwargs):
            launches[getattr(self, "__name__", None) or self.fn.__name__] += 1
            return None if stub else original(self, *args, **kwargs)

        return run

    with _triton_run_replaced(patched):
        yield launches


def stub_triton_launches() -> contextlib.AbstractContextManager:
    """Inside the block, Triton launches do nothing and are not counted: for timing a path's host side without the
    bookkeeping of :func:`count_triton_launches` (whose counting, ~1-3 us a launch, is not the path's cost)."""
    return _triton_run_replaced(lambda original: _no_launch)


def _no_launch(self, *args, **kwargs) -> None:
    return None


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
"""Tensor methods that read device memory on the host (each a host sync on CUDA)."""


class forbid_host_reads(torch.overrides.TorchFunctionMode):
    """Inside the block, calling a :data:`HOST_READS` method of a tensor raises ``RuntimeError`` (naming it): the
    CPU-side test that a GPU training step never waits for the device (with :func:`count_kernel_ops`' sync ops)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise RuntimeError(f"host read of a tensor inside a sync-free region: Tensor.{name}()")
        return func(*args, **(kwargs or {}))
