"""pytest-benchmark setup: device/dtype/shape/version metadata and results in bench/results/<device>.json.

``pytest bench/`` times every provider; ``pytest bench/ --benchmark-disable`` runs each once (CI smoke test) and
writes nothing. Benchmarks marked ``big`` are the large CPU shapes: ``-m "not big"`` skips them.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels may only run on the interpreter (the train-step benchmark counts the host side of the
# Triton path with its launches stubbed). Set before any kernel module is imported; checked without touching CUDA.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS_DIR = Path(__file__).parent / "results"


def device() -> torch.device:
    """The device the benchmarks run on: the current CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    """File-name-safe device name: the CUDA device name, else "cpu-<CPU model name>-<torch's CPU capability>"
    (e.g. cpu-AMD-EPYC-AVX2)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        # the vector ISA torch (and tpm_fast._C) dispatch to: one CPU model name covers AVX-512 and AVX2-only hosts
        name = f"cpu-{model.strip() or platform.machine() or 'unknown'}-{torch.backends.cpu.get_cpu_capability()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def synchronized(fn):
    """Wrap ``fn`` so that the timed call waits for the device (CUDA kernels are asynchronous)."""
    if not torch.cuda.is_available():
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="session", autouse=True)
def cpu_threads():
    """On CPU run with $TPM_BENCH_THREADS intra-op threads (default 1), restored afterwards.

    On a small shared machine, OpenMP threads that wait for a descheduled sibling turn a 0.1 s attention
    backward into 10+ s (hundreds of tiny parallel regions in bmm's backward); one thread gives stable ratios.
    """
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("TPM_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture
def bench_device() -> torch.device:
    return device()


@pytest.fixture
def bench(benchmark):
    """``bench(fn, group=..., provider=..., dtype=..., shape=..., rounds=None, **extra)``: time ``fn`` (exactly
    ``rounds`` rounds after one warm-up when given, for steps that take seconds), metadata in extra_info."""

    def run(fn, *, group: str, provider: str, dtype: torch.dtype, shape: dict, rounds: int | None = None, **extra):
        benchmark.group = group
        benchmark.extra_info.update(
            device=device_name(),
            provider=provider,
            dtype=str(dtype).removeprefix("torch."),
            shape=shape,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cuda=torch.version.cuda,
            **extra,
        )
        if rounds is not None:
            return benchmark.pedantic(synchronized(fn), rounds=rounds, warmup_rounds=1)
        return benchmark(synchronized(fn))

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "big: large shapes (slow on CPU); deselect with -m 'not big'")


def pytest_sessionfinish(session, exitstatus):
    """Write bench/results/<device>.json (CPU with TPM_BENCH_THREADS=T > 1: <device>-Tthreads.json) when benchmarks
    were actually timed (not with --benchmark-disable); a run of a subset replaces those benchmarks in the file and
    keeps the rest."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    output = session.config.hook.pytest_benchmark_generate_json(
        config=session.config,
        benchmarks=bs.benchmarks,
        include_data=False,
        machine_info=bs.get_machine_info(),
        commit_info={},
    )
    output["device"] = device_name()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("TPM_BENCH_THREADS", "1")
    suffix = f"-{threads}threads" if device_name().startswith("cpu") and threads != "1" else ""
    path = RESULTS_DIR / f"{device_name()}{suffix}.json"  # e.g. cpu-AMD-EPYC-AVX2-2threads.json
    if path.exists():  # a partial run (-k ...) replaces its own benchmarks and keeps the others
        fresh = {b["fullname"] for b in output["benchmarks"]}
        kept = [b for b in json.loads(path.read_text())["benchmarks"] if b["fullname"] not in fresh]
        output["benchmarks"] = kept + output["benchmarks"]
    path.write_text(json.dumps(output, indent=2, default=str) + "\n")
