"""The compiled Triton kernels, as ``bench/kernel_report.py`` sees them (sm_80 and sm_90, no GPU needed).

The report runs in a subprocess without ``TRITON_INTERPRET`` (the kernels must be compiled ``JITFunction``s; this
suite's conftest turns the interpreter on). The tests fail on:

- (a) register spills: any attention kernel at head dim d <= 64, any CRF kernel;
- (b) a TF32 or FMA dot (or any dot not on 16-bit MMA operands) in a case with 16-bit inputs: bf16 / fp16 operands
  must reach the tensor cores as 16-bit (fp32 inputs may use FMA ``ieee`` dots);
- (c) an attention loop that is not software-pipelined: any ``scf.while`` or ``scf.for`` without async copies
  (CRF time loops are exempt);
- (d) a kernel that does not compile, or a case whose launch fails (a launcher renamed: edit the report's CASES).

Each failure names kernel, case, arch and the figure. The parsers and checks are validated first on tiny synthetic
kernels compiled the same way: a good one (bf16 ``tl.dot`` in a ``tl.range(..., num_stages=3)`` loop) passes every
check, bad ones (fp32 cast + TF32 dot in a ``while`` loop; FMA ``ieee`` dot on bf16 inputs) fail (b) / (c).
The full report compiles ~80 kernel specializations: 45-80 s wall on 2 shared CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_report.py"
SIXTEEN_BIT = ("bf16", "fp16")


def _load_report_module() -> Any:
    """bench/kernel_report.py as a module (its top level imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = module
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _where(row: dict[str, Any]) -> str:
    return f"{row['kernel']} [{row['case']}, {row['arch']}]"


# -------------------------------------------------------------------------------------------------------- checks


def compile_violations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """(d) kernels that failed to compile, and cases whose launch failed.

    Args:
        rows: report rows (``build_report``).

    Returns:
        one message per failing row.
    """
    return [f"{_where(r)}: {r['error']}" for r in rows if "error" in r]


def spill_violations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """(a) spills in an attention kernel at d <= 64 or in any CRF kernel.

    Args:
        rows: report rows.

    Returns:
        one message per spilling row, with its spill store + load bytes and register count.
    """
    out = []
    for r in rows:
        if "error" in r or not r["spill_stores"] + r["spill_loads"]:
            continue
        tags = r["tags"]
        if tags["family"] == "crf" or (tags["family"] == "attention" and tags.get("d", 0) <= 64):
            out.append(
                f"{_where(r)}: spills {r['spill_stores']} B stores + {r['spill_loads']} B loads "
                f"({r['registers']} registers)"
            )
    return out


def dot_violations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """(b) in a case with 16-bit inputs, a dot that is not a tensor-core MMA on 16-bit operands (TF32 or FMA).

    Args:
        rows: report rows.

    Returns:
        one message per offending (row, dot kind).
    """
    out = []
    for r in rows:
        if "error" in r or r["tags"].get("dtype") not in SIXTEEN_BIT:
            continue
        for kind in r["mma"]:
            op, operand = kind.split()[:2]
            if op not in ("wgmma", "mma.sync") or operand not in SIXTEEN_BIT:
                out.append(
                    f"{_where(r)}: `{kind}` dot on {r['tags']['dtype']} inputs (16-bit operands must reach the "
                    "tensor cores as 16-bit)"
                )
    return out


def loop_violations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """(c) attention kernels with a loop that is not software-pipelined (``scf.while``, or ``scf.for`` without async
    copies).

    Args:
        rows: report rows.

    Returns:
        one message per offending row: its pipelined / total loop count and each unpipelined loop's source line.
    """
    out = []
    for r in rows:
        if "error" in r or r["tags"]["family"] != "attention":
            continue
        bad = [
            f"`while` at {loop['where'] or '?'} (never pipelined)"
            if loop["op"] == "while"
            else f"`for` at {loop['where'] or '?'} (no async copies)"
            for loop in r["loops"]
            if not loop["pipelined"]
        ]
        if bad:
            out.append(f"{_where(r)}: {r['pipelined']}/{r['n_loops']} loops software-pipelined; not: {', '.join(bad)}")
    return out


def _assert_none(messages: list[str], what: str) -> None:
    if messages:
        pytest.fail(f"{len(messages)} {what}:\n" + "\n".join(messages), pytrace=False)


# ---------------------------------------------------------------------------------------- parsers, synthetic kernels

_SYNTHETIC_KERNELS = """
import torch
import triton
import triton.language as tl


@triton.jit
def good_kernel(A, B, C, n, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for j in tl.range(0, n, BLOCK, num_stages=3):
        a = tl.load(A + i[:, None] * stride + (j + i)[None, :])
        b = tl.load(B + (j + i)[:, None] * stride + i[None, :])
        acc += tl.dot(a, b)
    tl.store(C + i[:, None] * stride + i[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def tf32_while_kernel(A, B, C, n, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    j = n * 0
    while j < n:
        a = tl.load(A + i[:, None] * stride + (j + i)[None, :]).to(tl.float32)
        b = tl.load(B + (j + i)[:, None] * stride + i[None, :]).to(tl.float32)
        acc += tl.dot(a, b)
        j += BLOCK
    tl.store(C + i[:, None] * stride + i[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def fma_kernel(A, B, C, n, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for j in tl.range(0, n, BLOCK, num_stages=2):
        a = tl.load(A + i[:, None] * stride + (j + i)[None, :]).to(tl.float32)
        b = tl.load(B + (j + i)[:, None] * stride + i[None, :]).to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee")
    tl.store(C + i[:, None] * stride + i[None, :], acc.to(C.dtype.element_ty))


def launch(kernel):
    x = torch.empty(256, 256, dtype=torch.bfloat16)
    kernel[(1,)](x, x, x, 256, 256, BLOCK=64, num_warps=4)
"""


def _line_of(code: str) -> str:
    """``synthetic_kernels.py:<line>`` of the first line of the synthetic kernels that contains ``code``."""
    line = next(i for i, text in enumerate(_SYNTHETIC_KERNELS.splitlines(), 1) if code in text)
    return f"synthetic_kernels.py:{line}"


_SYNTHETIC_SCRIPT = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import kernel_report as kr
import synthetic_kernels as sk

tags = {"family": "attention", "dtype": "bf16", "d": 64}
cases = [kr.Case(name, tags, (lambda k=getattr(sk, name): sk.launch(k)))
         for name in ("good_kernel", "tf32_while_kernel", "fma_kernel")]
cases.append(kr.Case("renamed launcher", tags, lambda: sk.no_such_launcher()))
rows = kr.build_report(cases, workers=0)
with open(sys.argv[3], "w") as f:
    json.dump(rows, f)
"""


@pytest.fixture(scope="module")
def synthetic_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """Report rows of the synthetic kernels, compiled in a subprocess without TRITON_INTERPRET, by (kernel, arch)."""
    tmp = tmp_path_factory.mktemp("synthetic_kernels")
    (tmp / "synthetic_kernels.py").write_text(_SYNTHETIC_KERNELS)
    out = tmp / "rows.json"
    cmd = [sys.executable, "-c", _SYNTHETIC_SCRIPT, str(SCRIPT.parent), str(tmp), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["kernel"], r["arch"]): r for r in json.loads(out.read_text())}


def test_parsers_on_a_good_synthetic_kernel(synthetic_rows):
    """A bf16 dot in a pipelined ``tl.range`` loop: 16-bit MMA (wgmma on sm_90), 1/1 loops pipelined, no
    violation of any check."""
    sm80, sm90 = synthetic_rows["good_kernel", "sm_80"], synthetic_rows["good_kernel", "sm_90"]
    assert sm80["mma"] == ["mma.sync bf16 m16n8k16"] and sm90["mma"] == ["wgmma bf16"]
    for row in (sm80, sm90):
        assert (row["pipelined"], row["n_loops"]) == (1, 1), row["loops"]
        assert row["loops"][0]["op"] == "for" and row["loops"][0]["where"] == _line_of(
            "for j in tl.range(0, n, BLOCK, num_stages=3)"
        )
        assert row["registers"] > 0 and row["shared"] > 0 and row["spill_stores"] == row["spill_loads"] == 0
    good = [synthetic_rows["good_kernel", a] for a in ("sm_80", "sm_90")]
    checks = (compile_violations, spill_violations, dot_violations, loop_violations)
    assert [m for check in checks for m in check(good)] == []


def test_checks_catch_bad_synthetic_kernels(synthetic_rows):
    """fp32-cast operands (a TF32 dot) in a ``while`` loop fail (b) and (c); an FMA ``ieee`` dot fails (b); a case
    whose launcher is gone fails (d) and the other cases are still reported."""
    tf32 = [synthetic_rows["tf32_while_kernel", a] for a in ("sm_80", "sm_90")]
    assert tf32[0]["mma"] == ["mma.sync tf32 m16n8k8"] and tf32[1]["mma"] == ["wgmma tf32"]
    assert dot_violations(tf32) == [
        "tf32_while_kernel [tf32_while_kernel, sm_80]: `mma.sync tf32 m16n8k8` dot on bf16 inputs (16-bit "
        "operands must reach the tensor cores as 16-bit)",
        "tf32_while_kernel [tf32_while_kernel, sm_90]: `wgmma tf32` dot on bf16 inputs (16-bit operands must "
        "reach the tensor cores as 16-bit)",
    ]
    assert loop_violations(tf32[:1]) == [
        "tf32_while_kernel [tf32_while_kernel, sm_80]: 0/1 loops software-pipelined; not: `while` at "
        f"{_line_of('while j < n')} (never pipelined)"
    ]
    assert compile_violations([synthetic_rows["(launch)", "-"]]) == [
        "(launch) [renamed launcher, -]: launch failed: AttributeError: module 'synthetic_kernels' has no attribute "
        "'no_such_launcher'"
    ]
    fma = [synthetic_rows["fma_kernel", a] for a in ("sm_80", "sm_90")]
    assert all(r["mma"] == ["fma fp32"] and r["pipelined"] == 1 for r in fma)
    messages = dot_violations(fma)
    assert len(messages) == 2 and all("`fma fp32` dot on bf16 inputs" in m for m in messages)
    assert loop_violations(fma) == []


def test_parse_ptxas_and_readme_section():
    """Spills summed over functions, registers maxed; the README section replaced between markers or appended."""
    kr = _load_report_module()
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]\n"
    )
    assert kr.parse_ptxas(log) == {"registers": 255, "spill_stores": 12, "spill_loads": 16}
    with pytest.raises(ValueError):
        kr.parse_ptxas("ptxas fatal   : Unresolved extern function")
    start, end = kr.START_MARK, kr.END_MARK
    text = f"# T\n\nbefore\n\n{start}\nold\n{end}\n\nafter\n"
    assert kr.replace_section(text, "\nnew\n") == f"# T\n\nbefore\n\n{start}\nnew\n{end}\n\nafter\n"
    assert kr.replace_section("# T\n\nbody\n", "\nnew\n") == f"# T\n\nbody\n\n{start}\nnew\n{end}\n"


def test_spill_rule():
    """Spills fail at attention d <= 64 and in any CRF kernel; d = 128 attention may spill (fp32 FMA tiles)."""

    def row(family: str, spills: int, **tags: Any) -> dict[str, Any]:
        figures = {"spill_stores": spills, "spill_loads": spills, "registers": 255}
        return {"kernel": "k", "case": "c", "arch": "sm_80", "tags": {"family": family, **tags}, **figures}

    rows = [row("attention", 8, d=64), row("attention", 8, d=128), row("crf", 4, T=10), row("attention", 0, d=32)]
    assert spill_violations(rows) == [
        "k [c, sm_80]: spills 8 B stores + 8 B loads (255 registers)",
        "k [c, sm_80]: spills 4 B stores + 4 B loads (255 registers)",
    ]


# --------------------------------------------------------------------------------------------- the project's kernels


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Rows of ``python bench/kernel_report.py --json`` (all cases, sm_80 and sm_90), run without TRITON_INTERPRET."""
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_report_covers_both_archs_and_families(report):
    """The report is not empty: both archs, both kernel families, 16-bit and fp32 attention cases."""
    assert {r["arch"] for r in report if "error" not in r} == {"sm_80", "sm_90"}
    assert {r["tags"]["family"] for r in report} == {"attention", "crf"}
    assert {r["tags"]["dtype"] for r in report if r["tags"]["family"] == "attention"} >= {"bf16", "fp32"}


def test_every_kernel_compiles(report):
    """(d)"""
    _assert_none(compile_violations(report), "kernels failed to compile")


def test_no_register_spills(report):
    """(a) no spill in attention kernels at d <= 64, none in CRF kernels."""
    _assert_none(spill_violations(report), "kernels spill registers")


def test_16bit_inputs_use_16bit_tensor_core_dots(report):
    """(b) bf16 / fp16 inputs: no TF32 and no FMA dot."""
    _assert_none(dot_violations(report), "dots do not run on 16-bit tensor-core operands")


def test_attention_loops_are_software_pipelined(report):
    """(c) every key / query loop of the compiled attention kernels is a pipelined ``scf.for``."""
    _assert_none(loop_violations(report), "attention loops are not software-pipelined")
