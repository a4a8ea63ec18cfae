"""The CUDA CRF kernels (``csrc/crf_cuda_fwd.cu``, ``csrc/crf_cuda_bwd.cu``, ``csrc/crf_cuda_viterbi.cu`` over
``csrc/crf_cuda_common.cuh``, registered for CUDA tensors by ``csrc/crf_cuda_bind.cu``) against the contract of the
CPU kernels (``csrc/crf_cpu.cpp``) and the Triton launchers (`tpm_fast.kernels.crf`).

Two parts:

- Compile checks, wherever ``nvcc`` is on PATH (no GPU needed): each kernel file compiled to object code for sm_80
  and sm_90 with the build's flags (``setup.py``, torch's ``COMMON_NVCC_FLAGS``) and every warning an error; the
  ptxas report is parsed and printed per kernel (registers, spills, stack frame, shared memory) and any spill, any
  local memory (a register array demoted to the stack) or a register count above the budget fails. The three objects
  link into one shared library (nothing defined twice, each launcher once). The torch binding is compiled against the
  installed torch's headers (object code only: a CPU build of torch cannot link it).
- On a GPU, with the CUDA build of ``tpm_fast._C``: values, gradients (directly and through the autograd that
  `tpm_fast.ops.native` registers) and Viterbi paths against the fp64 reference and pytorch-crf, as
  ``tests/test_crf_native.py`` checks the CPU kernels (whose builders and oracles are reused), against the CPU kernels
  themselves (long sequences included), padding, strides and dtypes, determinism and bad input; the -1e4 / -inf /
  1e4 cases and the confident-model precision case (gold tags favoured by a wide margin: per-step shifted alphas,
  no 1 - p) are ``tests/test_crf_native.py``'s, parametrized over both devices.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.oracles import native_cuda_crf_unavailable, viterbi_tie_case

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")

ARCHES = ["sm_80", "sm_90"]
# The kernel files (csrc/*.cu but the binding) and the kernels each instantiates: dtypes x tag slots (x with / without
# tags for the forward and the backward)
KERNELS = {
    "crf_cuda_fwd.cu": ("crf_forward_kernel", 3 * 2 * 2),
    "crf_cuda_bwd.cu": ("crf_backward_kernel", 3 * 2 * 2),
    "crf_cuda_viterbi.cu": ("crf_viterbi_kernel", 3 * 2),
}
MAX_REGISTERS = 128  # per thread: 4 warps per block keep >= 4 blocks per SM, and nothing is near the spill point
# setup.py's nvcc flags (NVCC_FLAGS), the C++ standard torch builds with, and every warning an error
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]


def _nvcc_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the __CUDA_NO_HALF_CONVERSIONS__ family, as built

    return [*COMMON_NVCC_FLAGS, *NVCC_FLAGS]


def _gencode(arch: str) -> str:
    return f"-gencode=arch=compute_{arch[3:]},code={arch}"


def _compile(args: list[str]) -> str:
    """Run nvcc; its output (stdout + stderr), or the test fails with it."""
    proc = subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"nvcc failed ({proc.returncode}):\n{output}")
    return output


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _ptxas_report(output: str) -> dict[str, dict[str, int]]:
    """Per kernel (demangled when c++filt exists): registers, stack frame, spill stores / loads, static smem."""
    report, name = {}, None
    for line in output.splitlines():
        if m := _ENTRY.search(line):
            name = m[1]
            report[name] = {"smem": 0}
        elif name and (m := _FRAME.search(line)):
            report[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := _USED.search(line)):
            report[name]["registers"] = int(m[1])
            if s := _SMEM.search(line):
                report[name]["smem"] = int(s[1])
    if shutil.which("c++filt") and report:
        names = subprocess.run(["c++filt"], input="\n".join(report), capture_output=True, text=True).stdout.split("\n")
        names = [re.sub(r"\(.*", "", n.replace("tpm_fast::(anonymous namespace)::", "")) for n in names]
        report = {n.removeprefix("void "): r for n, r in zip(names, report.values())}
    return report


# ---------------------------------------------------------------------------------------------- compile checks


def test_every_kernel_file_is_checked():
    """The compile checks below cover every CUDA kernel file that setup.py builds, 30 kernels in all."""
    assert {p.name for p in CSRC.glob("*.cu")} - {"crf_cuda_bind.cu"} == set(KERNELS)
    assert sum(count for _, count in KERNELS.values()) == 3 * 2 * (2 + 2 + 1)


@pytest.fixture(scope="module", params=ARCHES)
def compiled(request, tmp_path_factory) -> tuple[str, Path, dict[str, str]]:
    """(arch, the folder of the objects <file>.o, each kernel file's nvcc output with its ptxas report): the kernel
    files compiled once per arch, concurrently, position-independent as torch's build compiles them."""
    arch, folder = request.param, tmp_path_factory.mktemp(request.param)
    flags = [*_nvcc_flags(), "-Xcompiler", "-fPIC", "-Xptxas", "-v", _gencode(arch), "-c"]
    jobs = [[*flags, "-o", str(folder / f"{f}.o"), str(CSRC / f)] for f in KERNELS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(_compile, jobs))
    return arch, folder, dict(zip(KERNELS, outputs))


@needs_nvcc
@pytest.mark.parametrize("file", list(KERNELS))
def test_kernels_compile_without_spills_or_warnings(compiled, file):
    arch, _, outputs = compiled
    output = outputs[file]
    report = _ptxas_report(output)
    print(f"\nptxas, {file}, {arch}: registers, stack frame, spill stores, spill loads (bytes), static smem (bytes)")
    for name, r in sorted(report.items()):
        counts = (r["registers"], r["stack"], r["spill_stores"], r["spill_loads"], r["smem"])
        print(f"  {name:52s}" + "".join(f"{c:7d}" for c in counts))
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    kernel, count = KERNELS[file]
    assert {re.sub(r"<.*", "", name) for name in report} == {kernel}, sorted(report)
    assert len(report) == count
    for name, r in report.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{name} spills on {arch}: {r}"
        assert r["stack"] == 0, f"{name} uses local memory on {arch} (a register array demoted to the stack): {r}"
        assert r["registers"] <= MAX_REGISTERS, f"{name} uses {r['registers']} registers on {arch}"
        assert r["smem"] <= 48 * 1024, f"{name}: more static shared memory than a block may have: {r}"


@needs_nvcc
def test_kernel_files_link_into_one_library(compiled):
    """The kernel objects link together, as into tpm_fast._C: csrc/crf_cuda_common.cuh defines nothing twice, and
    the library exports exactly the three launchers of csrc/crf_cuda.h."""
    _, folder, _ = compiled
    lib = folder / "libcrf_cuda.so"
    _compile(["-shared", "-Xlinker", "--no-undefined", "-o", str(lib), *(str(folder / f"{f}.o") for f in KERNELS)])
    if shutil.which("nm") is None:
        pytest.skip("nm is not on PATH: the library's symbols cannot be listed")
    symbols = subprocess.run(["nm", "-DC", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    exported = set(re.findall(r"\b(tpm_fast::[\w:]+)\(", symbols))
    assert exported == {f"tpm_fast::launch_crf_{op}" for op in ("forward", "backward", "viterbi")}, exported


@needs_nvcc
def test_binding_compiles_against_the_torch_headers(tmp_path):
    """csrc/crf_cuda_bind.cu (the torch side) against this torch's headers, to object code: no link (a CPU build of
    torch has no libc10_cuda). Torch's headers are system includes, so the warnings checked are the binding's."""
    from torch.utils.cpp_extension import include_paths

    paths = include_paths()
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in paths):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU torch lacks it; it only sets Windows export macros
    includes = [arg for p in paths for arg in ("-isystem", p)]
    output = _compile(
        [*_nvcc_flags(), *defines, *includes, _gencode(ARCHES[-1]), "-c", "-o", str(tmp_path / "bind.o"),
         str(CSRC / "crf_cuda_bind.cu")]
    )  # fmt: skip
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "bind.o").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- on the GPU


CUDA_UNAVAILABLE = native_cuda_crf_unavailable()
needs_cuda = pytest.mark.skipif(CUDA_UNAVAILABLE is not None, reason=str(CUDA_UNAVAILABLE))
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def h():
    """tests/test_crf_native.py: the input builders and oracles of the CPU kernels' tests (imported lazily: it needs
    tpm_fast._C, which the compile checks above do not)."""
    return importlib.import_module("tests.test_crf_native")


@pytest.fixture(scope="module")
def ops():
    from tpm_fast.ops import native

    assert native.load() is not None, native.unavailable_reason()  # also registers the ops' autograd
    return torch.ops.tpm_fast_native


def _cuda(*xs):
    return [None if x is None else x.cuda() for x in xs]


def _cpu(xs):
    return [x.cpu() for x in xs]


def _cuda_inputs(h, *args, **kwargs):
    """tests/test_crf_native.py's `_inputs` on the GPU: emissions, tags, mask, [start, end, transitions]."""
    em, tags, mask, params = h._inputs(*args, **kwargs)
    return *_cuda(em, tags, mask), _cuda(*params)


CASES = [  # b, n, t, dtype, lengths (None: random, with a full row and a length-1 row)
    (1, 1, 1, F32, None),
    (3, 13, 1, F32, None),  # one tag
    (4, 1, 10, F32, None),  # one step
    (5, 7, 5, F32, None),
    (7, 37, 10, F32, None),  # two forward blocks, the second partial; n > 32: two backtrace tiles
    (3, 9, 10, F32, [9, 9, 9]),  # all rows full
    (6, 11, 33, F32, None),  # T > 32: two tags per lane, tag 32 alone in the second slot
    (3, 6, 64, F32, None),
    (9, 5, 64, F32, None),
    (4, 9, 10, BF16, None),
    (4, 9, 5, F16, None),
    (5, 12, 33, BF16, None),
    (3, 8, 64, F16, None),
]


@needs_cuda
@pytest.mark.parametrize("with_tags", [True, False])
@pytest.mark.parametrize("b,n,t,dtype,lengths", CASES)
def test_forward_backward_match_reference(h, ops, b, n, t, dtype, lengths, with_tags):
    """As tests/test_crf_native.py: fp64 reference values, alphas (each step shifted to a max of 0, the contract of
    the saved alphas) and per-sequence gradients, on upcast inputs."""
    em, tags, mask, params = h._inputs(b, n, t, seed=b * 1000 + n * 10 + t, dtype=dtype, lengths=lengths)
    tags = tags if with_tags else None
    w = torch.randn(b, generator=torch.Generator().manual_seed(t), dtype=F64)
    expected, g_em_ref, g_par_ref = h._reference_partials(em, tags, mask, params, w)

    em_d, tags_d, mask_d, *params_d = _cuda(em, tags, mask, *params)
    out, alpha = ops.crf_forward(em_d, tags_d, mask_d, *params_d)
    assert out.device == alpha.device == em_d.device
    assert out.shape == (b,) and out.dtype == F32
    assert alpha.shape == (b, n, t) and alpha.dtype == F32 and alpha.is_contiguous()
    out, alpha_h = _cpu((out, alpha))
    assert h._rel_err(out, expected) <= 1e-5
    assert h._rel_err(alpha_h, h._alpha_fp64(em, mask, params[0], params[2])) <= 1e-5
    assert (alpha_h[~mask] == 0).all() and (alpha_h.amax(2)[mask] == 0).all()

    g_em, g_par = ops.crf_backward(w.float().cuda(), tags_d, mask_d, params_d[1], params_d[2], alpha, dtype)
    assert g_em.shape == (b, n, t) and g_em.dtype == dtype and g_em.is_contiguous()
    assert g_par.shape == (b, 2 * t + t * t) and g_par.dtype == F32
    g_em, g_par = _cpu((g_em, g_par))
    assert (g_em[~mask] == 0).all()
    tol = 1e-5 if dtype == F32 else torch.finfo(dtype).eps  # 16-bit: the final rounding
    assert h._rel_err(g_em, g_em_ref) <= tol
    assert h._rel_err(g_par, g_par_ref) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("with_tags", [True, False])
def test_autograd_through_the_op(h, ops, dtype, with_tags):
    """torch.ops.tpm_fast_native.crf_forward with the autograd of tpm_fast.ops.native on CUDA leaves: gradients of
    emissions (in their dtype), start, end and transitions against the fp64 reference."""
    b, n, t = 6, 17, 12
    em, tags, mask, params = h._inputs(b, n, t, seed=61, dtype=dtype)
    tags = tags if with_tags else None
    w = torch.randn(b, generator=torch.Generator().manual_seed(5), dtype=F64)
    _, g_em_ref, g_par_ref = h._reference_partials(em, tags, mask, params, w)
    leaves = [x.cuda().requires_grad_(True) for x in (em, *params)]
    tags_d, mask_d = _cuda(tags, mask)
    out, _ = ops.crf_forward(leaves[0], tags_d, mask_d, *leaves[1:])
    (out * w.float().cuda()).sum().backward()
    assert leaves[0].grad.dtype == dtype
    assert h._rel_err(leaves[0].grad.cpu(), g_em_ref) <= (1e-5 if dtype == F32 else torch.finfo(dtype).eps)
    g_par = torch.cat([leaf.grad.cpu().reshape(-1) for leaf in leaves[1:]])
    assert h._rel_err(g_par, g_par_ref.sum(0)) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("b,n,t", [(5, 23, 9), (10, 70, 33), (10, 75, 64)])
def test_matches_the_cpu_kernels(h, ops, b, n, t):
    """The same inputs through the CPU kernels: values and saved (shifted) alphas within fp32 rounding, identical
    padding and Viterbi paths; on long rows too, gradients within fp32 rounding of fp64 and of the CPU kernels' (the
    alphas are saved shifted to a max of 0 per step, so their precision does not degrade with t)."""
    em, tags, mask, params = h._inputs(b, n, t, seed=71 + n)
    w = torch.randn(b, generator=torch.Generator().manual_seed(7), dtype=F64)
    on_dev = _cuda(em, tags, mask, *params)
    for tg, tg_d in ((tags, on_dev[1]), (None, None)):
        _, g_em_ref, g_par_ref = h._reference_partials(em, tg, mask, params, w)
        cpu_fwd = ops.crf_forward(em, tg, mask, *params)
        cuda_fwd = _cpu(ops.crf_forward(on_dev[0], tg_d, on_dev[2], *on_dev[3:]))
        for a, r in zip(cuda_fwd, cpu_fwd):
            assert a.dtype == r.dtype and a.shape == r.shape and h._rel_err(a, r) <= 1e-5
        assert torch.equal(cuda_fwd[1][~mask], cpu_fwd[1][~mask])
        cpu_bwd = ops.crf_backward(w.float(), tg, mask, params[1], params[2], cpu_fwd[1], F32)
        alpha_d = cuda_fwd[1].cuda()
        cuda_bwd = _cpu(ops.crf_backward(w.float().cuda(), tg_d, on_dev[2], on_dev[4], on_dev[5], alpha_d, F32))
        for a, r, ref in zip(cuda_bwd, cpu_bwd, (g_em_ref, g_par_ref)):
            assert a.dtype == r.dtype and a.shape == r.shape
            assert h._rel_err(a, ref) <= 1e-5 and h._rel_err(a, r) <= 1e-5
        assert (cuda_bwd[0][~mask] == 0).all()
    for a, r in zip(_cpu(ops.crf_viterbi(on_dev[0], on_dev[2], *on_dev[3:])), ops.crf_viterbi(em, mask, *params)):
        assert torch.equal(a, r)


@needs_cuda
@pytest.mark.parametrize("b,n,t,dtype,lengths", [*CASES, (10, 75, 64, F32, None), (33, 40, 7, F16, None)])
def test_viterbi_matches_reference_and_pytorch_crf(h, ops, b, n, t, dtype, lengths):
    em, _, mask, params = h._inputs(b, n, t, seed=b * 100 + n + t, dtype=dtype, lengths=lengths)
    best, lengths_out = _cpu(ops.crf_viterbi(*_cuda(em, mask, *params)))
    assert best.shape == (b, n) and best.dtype == lengths_out.dtype == torch.int64
    assert lengths_out.tolist() == mask.sum(1).tolist()
    assert (best[~mask] == 0).all()
    ref_best, _ = h.ref.crf_viterbi(em, mask, *params, validate=False)
    assert torch.equal(best, ref_best)
    assert h._paths(best, lengths_out) == h._torchcrf_decode(em, mask, params)


@needs_cuda
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_ties_broken_like_pytorch_crf(h, ops, seed):
    em, mask, params = viterbi_tie_case(seed, n=40, t=36)  # ties across both tag slots of a lane and across lanes
    best, lengths = _cpu(ops.crf_viterbi(*_cuda(em, mask, *params)))
    assert h._paths(best, lengths) == h._torchcrf_decode(em, mask, params)
    assert torch.equal(best, h.ref.crf_viterbi(em, mask, *params, validate=False)[0])


@needs_cuda
def test_viterbi_nan_scores_stay_in_range(h, ops):
    """NaN emissions or transitions: every tag in [0, T), padding 0, lengths right (the path is unspecified)."""
    em, _, mask, params = h._inputs(6, 40, 7, seed=5)
    em[0, 3, 2] = em[2, 0] = float("nan")
    em[1] = float("nan")
    for trans in (params[2], torch.full_like(params[2], float("nan"))):
        best, lengths = _cpu(ops.crf_viterbi(*_cuda(em, mask, params[0], params[1], trans)))
        assert ((best >= 0) & (best < 7)).all() and (best[~mask] == 0).all()
        assert lengths.tolist() == mask.sum(1).tolist()
    best, _ = _cpu(ops.crf_viterbi(*_cuda(em, mask, *params)))
    assert torch.equal(best[3:], h.ref.crf_viterbi(em[3:], mask[3:], *params, validate=False)[0])  # rows without NaN


@needs_cuda
def test_strides_dtypes_and_padding_ignored(h, ops):
    """Non-contiguous emissions (time-major, or last-dim stride 2), tags and mask (transposed), column-major and
    fp64 / bf16 parameters, fp64 emissions (read as fp32, as the CPU kernels do), an fp64 emissions' gradient, an
    expanded (stride 0) incoming grad, and garbage on padding (emissions 1e4, tags out of range): bit-identical to the
    plain call."""
    b, n, t = 6, 11, 36
    em, tags, mask, params = h._inputs(b, n, t, seed=11)
    em_d, tags_d, mask_d, *params_d = _cuda(em, tags.clamp_min(0), mask, *params)
    base_fwd = ops.crf_forward(em_d, tags_d, mask_d, *params_d)
    base_bwd = ops.crf_backward(torch.ones(b, device=CUDA), tags_d, mask_d, *params_d[1:], base_fwd[1], F32)
    base_vit = ops.crf_viterbi(em_d, mask_d, *params_d)

    em_tm = em.transpose(0, 1).contiguous().cuda()  # shape: (n, B, T)
    em_tm[~mask.t().cuda()] = 1e4
    em_wide = torch.zeros(b, n, 2 * t, device=CUDA)[:, :, ::2]  # last-dim stride 2
    em_wide.copy_(em_d)
    tags_tm = tags.t().contiguous().cuda()
    tags_tm[~mask.t().cuda()] = 10**9
    mask_tm = mask.t().contiguous().cuda()
    trans_cm = params_d[2].t().contiguous().t()  # same values, column-major
    ones = torch.ones((), device=CUDA).expand(b)
    for e in (em_tm.transpose(0, 1), em_wide, em_d.double()):
        fwd = ops.crf_forward(e, tags_tm.t(), mask_tm.t(), params_d[0], params_d[1], trans_cm)
        assert all(torch.equal(x, y) for x, y in zip(fwd, base_fwd))
        bwd = ops.crf_backward(ones, tags_tm.t(), mask_tm.t(), params_d[1], trans_cm, fwd[1], F32)
        assert all(torch.equal(x, y) for x, y in zip(bwd, base_bwd))
        vit = ops.crf_viterbi(e, mask_tm.t(), params_d[0], params_d[1], trans_cm)
        assert all(torch.equal(x, y) for x, y in zip(vit, base_vit))
    for dtype in (F64, BF16):  # parameters are read as fp32
        cast = [p.to(dtype) for p in params_d]
        fwd = ops.crf_forward(em_d, tags_d, mask_d, *cast)
        fwd_f = ops.crf_forward(em_d, tags_d, mask_d, *(p.float() for p in cast))
        assert all(torch.equal(x, y) for x, y in zip(fwd, fwd_f))
    g64 = ops.crf_backward(torch.ones(b, dtype=F64, device=CUDA), tags_d, mask_d, *params_d[1:], base_fwd[1], F64)
    assert g64[0].dtype == F64 and torch.equal(g64[0], base_bwd[0].double()) and torch.equal(g64[1], base_bwd[1])


@needs_cuda
def test_out_of_range_tags_are_clamped(h, ops):
    em, tags, mask, params = h._inputs(3, 7, 5, seed=12)
    bad = tags.clone()
    bad[0, 0], bad[0, 3], bad[1, 0] = -7, 99, 2**40
    clamped = torch.where(mask, bad.clamp(0, 4), bad)
    em_d, mask_d, *params_d = _cuda(em, mask, *params)
    out, alpha = ops.crf_forward(em_d, bad.cuda(), mask_d, *params_d)
    out_c, _ = ops.crf_forward(em_d, clamped.cuda(), mask_d, *params_d)
    assert torch.equal(out, out_c)
    g = ops.crf_backward(torch.ones(3, device=CUDA), bad.cuda(), mask_d, *params_d[1:], alpha, F32)
    g_c = ops.crf_backward(torch.ones(3, device=CUDA), clamped.cuda(), mask_d, *params_d[1:], alpha, F32)
    assert all(torch.equal(x, y) for x, y in zip(g, g_c))


@needs_cuda
def test_empty_batch(h, ops):
    em, tags, mask, params = _cuda_inputs(h, 1, 4, 3, seed=0)
    out, alpha = ops.crf_forward(em[:0], tags[:0], mask[:0], *params)
    assert out.shape == (0,) and alpha.shape == (0, 4, 3) and out.device == alpha.device == em.device
    g_em, g_par = ops.crf_backward(out, None, mask[:0], params[1], params[2], alpha, BF16)
    assert g_em.shape == (0, 4, 3) and g_em.dtype == BF16 and g_par.shape == (0, 15)
    best, lengths = ops.crf_viterbi(em[:0], mask[:0], *params)
    assert best.shape == (0, 4) and lengths.shape == (0,)


@needs_cuda
def test_deterministic_and_on_the_current_stream(h, ops):
    """Bit-identical between runs (no atomics), on the default stream and on a side stream."""
    em, tags, mask, params = _cuda_inputs(h, 9, 23, 40, seed=13)

    def run():
        out, alpha = ops.crf_forward(em, tags, mask, *params)
        grads = ops.crf_backward(torch.ones(9, device=CUDA), tags, mask, params[1], params[2], alpha, F32)
        return [out, alpha, *grads, *ops.crf_viterbi(em, mask, *params)]

    first = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = run()
    torch.cuda.synchronize()
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@needs_cuda
def test_bad_inputs_raise_clear_errors(h, ops):
    em, tags, mask, params = h._inputs(2, 3, 4, seed=0)
    em_d, tags_d, mask_d, *params_d = _cuda(em, tags.clamp_min(0), mask, *params)
    with pytest.raises(RuntimeError, match="mask must be on cuda"):
        ops.crf_forward(em_d, tags_d, mask, *params_d)  # a CPU tensor among CUDA ones
    with pytest.raises(RuntimeError, match="transitions must be on cuda"):
        ops.crf_viterbi(em_d, mask_d, params_d[0], params_d[1], params[2])
    with pytest.raises(RuntimeError, match="emissions must be a CUDA tensor"):
        ops.crf_forward(em, None, mask_d, *params)  # CPU emissions, CUDA mask: dispatched to the CUDA kernel
    out, alpha = ops.crf_forward(em_d, tags_d, mask_d, *params_d)
    with pytest.raises(RuntimeError, match="grad must be on cuda"):
        ops.crf_backward(torch.ones(2), tags_d, mask_d, params_d[1], params_d[2], alpha, F32)
    with pytest.raises(RuntimeError, match="tags must be int64"):
        ops.crf_forward(em_d, tags_d.int(), mask_d, *params_d)
    wide = _cuda(torch.randn(2, 3, 65), None, mask, torch.zeros(65), torch.zeros(65), torch.zeros(65, 65))
    with pytest.raises(RuntimeError, match=r"tags T must be in \[1, 64\], got 65"):
        ops.crf_forward(*wide)
    with pytest.raises(RuntimeError, match="grad_dtype must be fp32, fp16, bf16 or fp64"):
        ops.crf_backward(torch.ones(2, device=CUDA), tags_d, mask_d, params_d[1], params_d[2], alpha, torch.int32)
