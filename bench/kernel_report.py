"""Compile every Triton kernel of the project for sm_80 and sm_90 without a GPU and report what the compiler made.

The kernels are compiled at the specializations real launches use: each case in `CASES` calls the project's real
launcher functions on small CPU tensors shaped and strided as in training, while ``JITFunction.run`` is replaced by
a stub that records each launch and derives the compile inputs (signature, constexprs, ``tt.divisibility``
attributes, options) with Triton's own launch-time helpers (see :func:`_specialize`). Each distinct
(kernel, specialization, arch) is then compiled with ``triton.compile`` in a pool of worker processes, and read:

- registers per thread and spill bytes: the log of ``ptxas -v`` on the generated PTX (Triton's bundled ptxas; the
  log of the very run that makes the cubin, printed by Triton's ``TRITON_DUMP_PTXAS_LOG`` knob);
- shared memory: the compiled metadata (``shared``, bytes);
- MMA kind: the PTX MMA instructions (``wgmma bf16``, ``mma.sync tf32 m16n8k8``, ...), plus ``fma <type>`` for a
  ``tt.dot`` of the TTGIR that did not get an MMA layout (an FMA dot);
- pipelined loops ``k/n``: of the n loops of the TTGIR (``scf.for`` and ``scf.while``), the k ``scf.for`` whose body
  holds async global-to-shared copies (Triton's software pipelining). ``while`` loops are never pipelined.

Usage::

    python bench/kernel_report.py                 # print the markdown table
    python bench/kernel_report.py --write         # ... and replace the kernel-report section of bench/README.md
    python bench/kernel_report.py --json out.json # ... and write the rows as JSON

Nothing is cached in the repository: Triton's cache goes to a temporary directory, deleted at exit, so every run
compiles from scratch (the reported wall time is a cold one). Needs Triton's NVIDIA backend, not a GPU; runs with
``TRITON_INTERPRET`` removed from the environment (the kernels must be compiled ``JITFunction``s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

README = Path(__file__).with_name("README.md")
START_MARK, END_MARK = "<!-- kernel-report:start -->", "<!-- kernel-report:end -->"
ARCHS = (80, 90)  # compute capabilities: sm_80 (A100), sm_90 (H100 / H200, compiled as sm_90a)
WORKERS = 2
PTXAS_LOG_ENV = "TRITON_DUMP_PTXAS_LOG"  # Triton 3.6 knob: print the log of its ptxas -v run


@dataclasses.dataclass
class Case:
    """One group of real launches.

    Args:
        name: short label shown in the table (e.g. ``d64 bf16 train``).
        tags: facts the checks use: ``family`` ("attention" | "crf"), ``dtype`` of the floating inputs, ...
        launch: calls the project's launchers (on CPU tensors; the launches are captured, not run).
    """

    name: str
    tags: dict[str, Any]
    launch: Callable[[], None]


# ====================================================================================================================
# CASES: the launches the report compiles. Edit here when the launchers change (names, arguments, new kernels).
# Shapes: attention B=2, H=2, n=64 query / key tokens, m=4 prefix slots; CRF B=2, n=64 tokens. CPU tensors laid out
# as in training: q / k / v are (B, n, H*d) projections viewed as (B, H, n, d), the prefix is (B, H, m, d); the mask
# is (B, n) bool with its int32 key bounds as `lengths` and the dropout seed a (1,) int64 tensor, as
# tpm_fast.ops.prefix_attention passes them; CRF: fp32 emissions (B, n, T), int64 tags, (B, n) bool mask.
# The backward launchers get the forward's outputs as torch.empty tensors of the right shape, dtype and layout.
# ====================================================================================================================

ATTN_B, ATTN_H, ATTN_N, ATTN_M = 2, 2, 64, 4
CRF_B, CRF_N = 2, 64
DROPOUT_P = 0.1


def _empty(*shape: int, dtype: Any) -> Any:
    """``torch.empty`` on the CPU, checked 16-byte aligned (as CUDA allocations are, so pointers specialize alike)."""
    import torch

    t = torch.empty(*shape, dtype=dtype)
    if t.data_ptr() % 16:
        raise RuntimeError("CPU allocation not 16-byte aligned: pointer specializations would differ from CUDA")
    return t


def _heads(dtype: Any, d: int) -> Any:
    """(B, H, n, d) view of a contiguous (B, n, H*d) projection output, as the attention layers pass q / k / v."""
    return _empty(ATTN_B, ATTN_N, ATTN_H * d, dtype=dtype).view(ATTN_B, ATTN_N, ATTN_H, d).transpose(1, 2)


def _attention_case(d: int, dtype: Any, train: bool) -> Callable[[], None]:
    """Launches of one attention call with a padding mask: forward (+ backward in training, where dropout is on)."""

    def launch() -> None:
        import torch

        from tpm_fast.kernels.prefix_attention import (
            canonical_inputs,
            launch_prefix_attention_bwd,
            launch_prefix_attention_fwd,
        )

        q, k, v, k_p, v_p = canonical_inputs(
            *(_heads(dtype, d) for _ in range(3)), *(_empty(ATTN_B, ATTN_H, ATTN_M, d, dtype=dtype) for _ in range(2))
        )
        mask = _empty(ATTN_B, ATTN_N, dtype=torch.bool).fill_(True)
        lengths = _empty(ATTN_B, dtype=torch.int32).fill_(ATTN_N)  # key_bounds(mask)
        seed = _empty(1, dtype=torch.int64).fill_(12345) if train else None
        p, scale = (DROPOUT_P if train else 0.0), 1.0 / math.sqrt(d)
        launch_prefix_attention_fwd(q, k, v, k_p, v_p, mask, lengths, seed, p, scale)
        if train:
            out, grad_out = torch.empty_like(q), _heads(dtype, d)  # out in q's layout, as the forward allocates it
            lse = _empty(ATTN_B, ATTN_H, ATTN_N, dtype=torch.float32)
            launch_prefix_attention_bwd(grad_out, q, k, v, k_p, v_p, out, lse, mask, lengths, seed, p, scale)

    return launch


def _crf_case(tags: int, mode: str) -> Callable[[], None]:
    """Launches of one CRF call: ``llh`` (forward with gold tags + backward), ``partition`` (forward without tags +
    backward) or ``viterbi``; fp32 emissions and parameters."""

    def launch() -> None:
        import torch

        from tpm_fast.kernels.crf import launch_crf_backward, launch_crf_forward, launch_crf_viterbi

        f32 = torch.float32
        emissions = _empty(CRF_B, CRF_N, tags, dtype=f32)
        start, end, transitions = _empty(tags, dtype=f32), _empty(tags, dtype=f32), _empty(tags, tags, dtype=f32)
        mask = _empty(CRF_B, CRF_N, dtype=torch.bool).fill_(True)
        if mode == "viterbi":
            launch_crf_viterbi(emissions, mask, start, end, transitions)
            return
        gold = _empty(CRF_B, CRF_N, dtype=torch.int64).zero_() if mode == "llh" else None
        launch_crf_forward(emissions, gold, mask, start, end, transitions)
        alpha = _empty(CRF_B, CRF_N, tags, dtype=f32)  # the forward's (B, n, T) fp32 output
        grad = _empty(CRF_B, dtype=f32)  # d(-llh.mean()) / d llh: a contiguous (B,) tensor
        launch_crf_backward(grad, gold, mask, end, transitions, alpha, f32)

    return launch


def default_cases() -> list[Case]:
    """The report's cases: attention d in (32, 64, 128) x (bf16, fp32) x (train: mask + dropout, forward and
    backward; eval: mask, forward only), CRF T in (10, 30, 64) x (llh, partition, viterbi).

    Returns:
        the cases, in table order.
    """
    import torch

    cases = []
    for d in (32, 64, 128):
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for train in (True, False):
                mode = "train" if train else "eval"
                tags = {"family": "attention", "dtype": dname, "d": d, "mode": mode}
                cases.append(Case(f"d{d} {dname} {mode}", tags, _attention_case(d, dtype, train)))
    for t in (10, 30, 64):
        for mode in ("llh", "partition", "viterbi"):
            cases.append(
                Case(f"T{t} {mode}", {"family": "crf", "dtype": "fp32", "T": t, "mode": mode}, _crf_case(t, mode))
            )
    return cases


# ====================================================================================================================
# capture: real launches -> compile jobs
# ====================================================================================================================


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything ``triton.compile`` needs for one kernel specialization on one arch (picklable).

    Args:
        module, qualname: where the ``@triton.jit`` function lives (re-imported in the worker).
        signature: {arg name: "*bf16" | "i32" | "fp32" | "constexpr" | ...}; constexprs: {(arg index,): value};
        attrs: {(arg index,): [["tt.divisibility", 16]]}; options: the parsed backend options (num_warps,
            num_stages, ...), passed to ``triton.compile`` as ``JITFunction.run`` passes them;
        arch: compute capability (80, 90).
    """

    module: str
    qualname: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], Any], ...]
    attrs: tuple[tuple[tuple[int, ...], Any], ...]
    options: tuple[tuple[str, Any], ...]
    arch: int


def _freeze(obj: Any) -> Any:
    """Nested lists -> tuples (hashable, so equal specializations compile once)."""
    return tuple(_freeze(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _specialize(fn: Any, args: tuple, kwargs: dict, arch: int) -> Job:
    """The compile inputs of one launch ``fn[grid](*args, **kwargs)``, derived as Triton 3.6's ``JITFunction.run``
    derives them, with its own helpers and no CUDA driver: the NVIDIA backend for ``GPUTarget("cuda", arch, 32)``,
    the binder of ``create_function_from_signature`` (whose ``native_specialize_impl`` maps tensors to ``*bf16`` /
    ``*fp32`` / ..., ints to ``i32`` / ``i64`` by value, ints equal to 1 and None to constexprs, and marks 16-byte
    aligned pointers and 16-divisible ints ``D``; floats are ``fp32``, never specialized) and
    ``JITFunction._pack_args`` (which turns ``D`` into ``tt.divisibility`` 16 attributes, collects constexprs and
    parses the options). Nothing is re-implemented, so a Triton upgrade that changes these rules changes the report
    with it (and one that renames these helpers makes it fail loudly).

    Args:
        fn: the launched ``JITFunction``; args, kwargs: the launch arguments (kwargs: constexprs and options).
        arch: compute capability to specialize for.

    Returns:
        the compile job.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Job(
        module=fn.fn.__module__,
        qualname=fn.fn.__qualname__,
        signature=tuple(signature.items()),
        constexprs=tuple(constexprs.items()),
        attrs=tuple((k, _freeze(v)) for k, v in attrs.items()),
        options=tuple(sorted((k, _freeze(v)) for k, v in parsed.__dict__.items())),  # compiled with these, as run
        arch=arch,
    )


def capture(cases: Sequence[Case], archs: Iterable[int] = ARCHS) -> list[tuple[Case, str, Job | str]]:
    """Run each case with ``JITFunction.run`` (and ``Autotuner.run``) stubbed, recording every launch.

    An autotuned kernel is recorded once per config. Launches are not run: the outputs are garbage. A case whose
    launcher raises, or that launches no ``JITFunction`` (kernels interpreted: TRITON_INTERPRET was set when they
    were imported), yields an error entry; the other cases go on.

    Args:
        cases: the cases to run; archs: compute capabilities to specialize for.

    Returns:
        (case, kernel label, job) per launch and arch, in launch order; the label is the kernel's name, with
        ``#i`` appended to the i-th (i >= 2) launch of one kernel within a case. For a failed case:
        (case, "(launch)", error message).
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    archs = tuple(archs)
    launches: list[tuple[Any, tuple, dict]] = []

    def run_stub(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append((self, args, kwargs))

    def autotune_stub(self: Any, *args: Any, **kwargs: Any) -> None:
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    saved = JITFunction.run, Autotuner.run
    out: list[tuple[Case, str, Job | str]] = []
    try:
        JITFunction.run, Autotuner.run = run_stub, autotune_stub
        for case in cases:
            launches.clear()
            error = None
            try:
                case.launch()
            except Exception as exc:  # a launcher whose name or arguments changed: edit CASES
                error = f"launch failed: {type(exc).__name__}: {exc}"
            if error is None and not launches:
                error = "launched no JITFunction (kernels interpreted? run without TRITON_INTERPRET)"
            seen: dict[str, int] = {}
            for fn, args, kwargs in launches:
                name = fn.fn.__qualname__
                seen[name] = seen.get(name, 0) + 1
                label = name if seen[name] == 1 else f"{name}#{seen[name]}"
                out.extend((case, label, _specialize(fn, args, kwargs, arch)) for arch in archs)
            if error is not None:
                out.append((case, "(launch)", error))
    finally:
        JITFunction.run, Autotuner.run = saved
    return out


# ====================================================================================================================
# compile + parse
# ====================================================================================================================

_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\.(\w+)")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+)\.(\w+)")
_TYPES = {"f16": "fp16", "f32": "fp32", "f64": "fp64", "e4m3": "fp8e4m3", "e5m2": "fp8e5m2"}


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers and spills from ``ptxas -v`` output (max registers, spill bytes summed over functions).

    Args:
        log: ptxas stderr.

    Returns:
        {"registers", "spill_stores", "spill_loads"}.

    Raises:
        ValueError: no "Used N registers" line (not a ``-v`` log).
    """
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    if not regs:
        raise ValueError(f"no register count in ptxas output:\n{log[-2000:]}")
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return {"registers": max(regs), "spill_stores": stores, "spill_loads": loads}


def _mma_aliases(ttgir: str) -> set[str]:
    """TTGIR layout aliases that are MMA layouts (``#mma = #ttg.nvidia_mma<...>``)."""
    return set(re.findall(r"^(#\w+) = #ttg\.nvidia_mma<", ttgir, flags=re.MULTILINE))


def fma_dots(ttgir: str) -> list[str]:
    """Operand element types of the ``tt.dot`` ops of a TTGIR whose result has no MMA layout (FMA dots).

    Args:
        ttgir: the ``ttgir`` text of a compiled kernel.

    Returns:
        one element type (e.g. ``fp32``) per FMA dot.
    """
    mma = _mma_aliases(ttgir)
    found = []
    for m in re.finditer(r"= tt\.dot [^\n]*?: tensor<[\dx]*x(\w+)[^\n]*-> tensor<[^,>]*, (#\w+)", ttgir):
        if m.group(2) not in mma:
            found.append(_TYPES.get(m.group(1), m.group(1)))
    return found


def mma_kinds(ptx: str, ttgir: str) -> list[str]:
    """The kinds of dot of a kernel, sorted: ``wgmma <a type>``, ``mma.sync <a type> <shape>`` (PTX instructions) and
    ``fma <type>`` (TTGIR dots without MMA layout); empty when the kernel has no dot.

    Args:
        ptx, ttgir: the kernel's ``ptx`` and ``ttgir`` texts.

    Returns:
        distinct kinds, e.g. ``["wgmma bf16"]``, ``["mma.sync tf32 m16n8k8"]``, ``["fma fp32"]``.
    """
    kinds = {f"wgmma {_TYPES.get(a, a)}" for a, _ in _WGMMA.findall(ptx)}
    kinds |= {f"mma.sync {_TYPES.get(a, a)} {shape}" for shape, a, _ in _MMA_SYNC.findall(ptx)}
    kinds |= {f"fma {t}" for t in fma_dots(ttgir)}
    return sorted(kinds)


def _locations(ttgir: str) -> dict[str, str]:
    """TTGIR location aliases resolved to ``file.py:line`` (``callee.py:l via kernel.py:l`` for inlined helpers)."""
    defs = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))\s*$", ttgir, flags=re.MULTILINE))

    def resolve(alias: str, depth: int = 0) -> str:
        text = defs.get(alias, "")
        if depth > 20:
            return ""
        call = re.match(r"loc\(callsite\((#loc\d*) at (#loc\d*)\)\)", text)  # an inlined @triton.jit helper
        if call:
            return f"{resolve(call.group(1), depth + 1)} via {resolve(call.group(2), depth + 1)}"
        direct = re.search(r'"([^"]+)":(\d+):\d+', text)
        if direct:
            return f"{Path(direct.group(1)).name}:{direct.group(2)}"
        ref = re.search(r"#loc\d*", text[4:])  # a named location, loc("name"(#locN)): skip the leading "loc("
        return resolve(ref.group(0), depth + 1) if ref else ""

    return {alias: resolve(alias) for alias in defs}


def loop_stats(ttgir: str) -> list[dict[str, Any]]:
    """The loops of a TTGIR, in order: each ``scf.for`` / ``scf.while`` op with whether its body (nested regions
    included) holds an async global-to-shared copy, i.e. was software-pipelined, and its source line.

    Regions are tracked by brace depth per line (attribute dictionaries open and close on one line); a loop's
    location is the one printed after its closing brace.

    Args:
        ttgir: the ``ttgir`` text of a compiled kernel.

    Returns:
        [{"op": "for" | "while", "pipelined": bool, "where": "file.py:line" (see `_locations`) or ""}].
    """
    locations = _locations(ttgir)
    loops: list[dict[str, Any]] = []
    stack: list[int | None] = []  # per open brace: index into loops when it opened a loop's region
    for line in ttgir.splitlines():
        code = re.sub(r'"[^"]*"', '""', line)
        if re.search(r"\bttn?g\.async_(?:tma_)?copy_global_to_local\b", code):
            for i in stack:
                if i is not None:
                    loops[i]["pipelined"] = loops[i]["op"] == "for"
        op = re.search(r"\bscf\.(for|while)\b", code)
        net = code.count("{") - code.count("}")
        if op and net > 0:
            loops.append({"op": op.group(1), "pipelined": False, "where": ""})
            stack.extend([len(loops) - 1] + [None] * (net - 1))
        elif net > 0:
            stack.extend([None] * net)
        elif net < 0:
            loc = re.search(r"loc\((#loc\d*)\)\s*$", code)
            for i in stack[net:]:
                if i is not None and loc:
                    loops[i]["where"] = locations.get(loc.group(1), "")
            del stack[net:]
    return loops


def _ptxas_log(ptx: str, arch: int) -> str:
    """Run Triton's bundled ``ptxas -v`` on ``ptx`` for ``arch``; return its stderr."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory(prefix="kernel-report-ptx-") as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", f"{src}.o"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stderr


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job with ``triton.compile`` and inspect the result (runs in a worker process).

    Args:
        job: the kernel specialization and arch.

    Returns:
        {"registers", "spill_stores", "spill_loads", "shared", "mma", "loops", "num_warps", "num_stages",
        "seconds"} or {"error": message, "seconds"} when the compile fails.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    t0 = time.perf_counter()
    saved = os.environ.get(PTXAS_LOG_ENV)
    os.environ[PTXAS_LOG_ENV] = "1"  # Triton's own `ptxas -v` run (the one that makes the cubin) prints its log
    try:
        fn = getattr(importlib.import_module(job.module), job.qualname)
        if not isinstance(fn, JITFunction):
            raise TypeError(f"{job.module}.{job.qualname} is a {type(fn).__name__}, not a JITFunction")
        attrs = {k: [list(a) for a in v] for k, v in job.attrs}
        src = ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs)
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # (a ptxas failure prints the whole PTX)
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        log = printed.getvalue()
        if "Used" not in log:  # no log printed (knob gone, or a cache hit): run ptxas -v ourselves
            log = _ptxas_log(compiled.asm["ptx"], job.arch)
        info = parse_ptxas(log)
    except Exception as exc:  # reported in the row; the report goes on
        lines = [x for x in str(exc).strip().splitlines() if x.strip()]
        message = f"compile failed: {type(exc).__name__}: {' / '.join(lines[:3])[:300]}"
        return {"error": message, "seconds": time.perf_counter() - t0}
    finally:
        if saved is None:
            os.environ.pop(PTXAS_LOG_ENV, None)
        else:
            os.environ[PTXAS_LOG_ENV] = saved
    ttgir = compiled.asm["ttgir"]
    return {
        **info,
        "shared": int(compiled.metadata.shared),
        "mma": mma_kinds(compiled.asm["ptx"], ttgir),
        "loops": loop_stats(ttgir),
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "seconds": time.perf_counter() - t0,
    }


def _compile_all(jobs: Sequence[Job], workers: int) -> list[dict[str, Any]]:
    """Compile ``jobs`` in ``workers`` spawned processes (0: in this process)."""
    if workers <= 0:
        return [compile_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked LLVM / OpenMP state
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(compile_job, jobs))


def build_report(
    cases: Sequence[Case] | None = None, archs: Iterable[int] = ARCHS, workers: int = WORKERS
) -> list[dict[str, Any]]:
    """Capture the cases' launches, compile each distinct specialization once per arch, and return the rows.

    Args:
        cases: default :func:`default_cases`; archs: compute capabilities; workers: compile processes (0: inline).

    Returns:
        one row per (case, kernel launch, arch): {"kernel", "case", "arch" ("sm_80"), "tags", "job" (rows with
        one job number share one compile), "num_warps", "num_stages", "registers", "spill_stores", "spill_loads",
        "shared", "mma", "loops", "pipelined", "n_loops", "seconds" (compile + inspection, in a worker)}; with
        "error" instead of the figures when the compile failed, or (arch "-", kernel "(launch)") the case's launch.
    """
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules are imported (in the cases)
    captured = capture(default_cases() if cases is None else cases, archs)
    jobs = list(dict.fromkeys(job for _, _, job in captured if isinstance(job, Job)))
    with tempfile.TemporaryDirectory(prefix="kernel-report-cache-") as cache:
        saved = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the workers; nothing is cached in the repository
        try:
            results = dict(zip(jobs, _compile_all(jobs, workers)))
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    index = {job: i for i, job in enumerate(jobs)}
    rows = []
    for case, label, job in captured:
        row = {"kernel": label, "case": case.name, "tags": dict(case.tags)}
        if not isinstance(job, Job):
            rows.append({**row, "arch": "-", "error": job})
            continue
        options = dict(job.options)
        row.update(
            arch=f"sm_{job.arch}", job=index[job], num_warps=options["num_warps"], num_stages=options["num_stages"]
        )
        row.update(results[job])
        if "loops" in row:
            row["pipelined"] = sum(loop["pipelined"] for loop in row["loops"])
            row["n_loops"] = len(row["loops"])
        rows.append(row)
    return rows


# ====================================================================================================================
# output
# ====================================================================================================================


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (kernel, case, arch, registers, spills, shared memory, MMA, pipelined loops).

    Args:
        rows: from :func:`build_report`.

    Returns:
        the table, one line per row, no trailing newline.
    """
    lines = [
        "| kernel | case | arch | registers | spills (B) | shared (B) | MMA | pipelined loops |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        head = f"| `{r['kernel']}` | {r['case']} | {r['arch']} "
        if "error" in r:
            lines.append(head + f"| {r['error'].replace('|', '/')} | | | | |")
            continue
        spills = r["spill_stores"] + r["spill_loads"]
        spill = "0" if not spills else f"{r['spill_stores']}+{r['spill_loads']}"
        mma = ", ".join(r["mma"]) or "-"
        lines.append(head + f"| {r['registers']} | {spill} | {r['shared']} | {mma} | {r['pipelined']}/{r['n_loops']} |")
    return "\n".join(lines)


def readme_section(rows: Sequence[dict[str, Any]], wall_s: float, workers: int = WORKERS) -> str:
    """The bench/README.md section: heading, one paragraph on how the table was made and what each column means,
    the table.

    Args:
        rows: from :func:`build_report`; wall_s: wall time of the whole report; workers: compile processes used.

    Returns:
        the section text between the markers (markers excluded).
    """
    import triton

    n_jobs = len({r["job"] for r in rows if "job" in r})
    return f"""
## Compiled kernels: registers, spills, MMA, pipelining (no GPU needed)

Made with `python bench/kernel_report.py --write`: {len(rows)} rows, {n_jobs} distinct compiles (Triton
{triton.__version__}, {workers} worker processes, {wall_s:.0f} s wall on a {os.cpu_count()}-core CPU, no GPU,
nothing cached; `--json PATH` writes the rows). The script calls the project's real launchers (the `CASES` section
of the script) on small CPU tensors laid out as in training (attention: B=2, H=2, n=64, m=4, padding mask on;
`train` = dropout on, forward and backward launches; `eval` = no dropout, forward only; CRF: B=2, n=64, fp32
emissions) with `JITFunction.run` stubbed, derives each launch's signature, constexprs and `tt.divisibility`
attributes with Triton's own launch-time specialization code, and compiles it with `triton.compile` for sm_80 and
sm_90 (sm_90a). Columns: **registers** per thread and **spills** (spill stores+loads, bytes; `0` = none) from
`ptxas -v` (Triton's bundled ptxas) on the generated PTX; **shared** memory in bytes from the compiled metadata;
**MMA** the dot instructions in the PTX (`wgmma bf16`, `mma.sync bf16 m16n8k16`, `mma.sync tf32 m16n8k8`, ...) or
`fma <type>` for a TTGIR dot that got no MMA layout (`-`: no dot); **pipelined loops** `k/n`: of the n loops in the
TTGIR (`scf.for` and `scf.while`), the k `scf.for` whose body holds async global-to-shared copies, i.e. were
software-pipelined (`while` loops become `scf.while` and are never pipelined). `tests/test_kernel_report.py` runs
the same report and fails on an attention spill at d <= 64, any CRF spill, a TF32 or FMA dot for 16-bit inputs,
and any unpipelined attention loop (CRF time loops are exempt).

{markdown_table(rows)}
"""


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the kernel-report markers replaced by ``section`` (appended when absent).

    Args:
        text: the README; section: the new content between the markers.

    Returns:
        the new README text.
    """
    block = f"{START_MARK}{section}{END_MARK}"
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        return head + block + rest.split(END_MARK, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table; ``--write`` updates bench/README.md, ``--json PATH`` writes the rows.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        exit status (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the kernel-report section of bench/README.md")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--workers", type=int, default=WORKERS, help="compile processes (0: inline)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = build_report(workers=args.workers)
    wall = time.perf_counter() - t0
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows, {wall:.1f} s wall", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "rows": rows}, indent=1) + "\n")
    if args.write:
        README.write_text(replace_section(README.read_text(), readme_section(rows, wall, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
