#!/usr/bin/env bash
# The GPU checks, as one script for a session that has a GPU machine (torch + Triton installed there):
# the kernel tests compiled for the GPU (not interpreted), the kernel benchmarks, then the whole training step
# (authors' recipe vs TPM-MI, samples/s, peak memory, MFU, GPU busy share), the first-use self-checks; logs and
# results under $OUT.
#   bash bench/gpu_check.sh            # OUT defaults to bench/results; about 8 minutes on an H100/H200
# Needs pytorch-crf (the CRF oracle and the authors' recipe) where the machine lacks it: `pip wheel --no-deps -w
# wheels pytorch-crf` here (pure Python, 10 kB), carry wheels/, and it is installed first. DeepSpeed is optional
# (the ZeRO providers of the train-step benchmark skip without it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export TRITON_INTERPRET=0 PIP_DISABLE_PIP_VERSION_CHECK=1
ls wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps wheels/*.whl
# builds tpm_fast._C with the CUDA CRF (nvcc there; ~1 min for sm_90 only)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} pip install -v --no-deps --no-build-isolation \
    -e . 2>&1 | grep "tpm-fast:" | tee "$out/build.txt"
python -m tpm_fast.info | tee "$out/info.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# the first-use self-check of each fused op on this device (what backend="auto" runs before picking Triton), timed
python - <<'PY' 2>&1 | tee "$out/self_check.txt"
import time, torch
from tpm_fast.ops import crf, prefix_attention  # registers the checks
from tpm_fast.ops.backend import _SELF_CHECKS
dev = torch.device("cuda", torch.cuda.current_device())
for op, check in _SELF_CHECKS.items():
    for dtype in (torch.float32, torch.bfloat16):
        for run in ("first (compiles)", "again"):
            start = time.perf_counter()
            problem = check(dev, dtype)
            torch.cuda.synchronize()
            took = time.perf_counter() - start
            print(f"self-check {op} {dtype} on {torch.cuda.get_device_name()}, {run}: {problem or 'passed'} ({took:.3f} s)")
PY
tests=(tests/test_prefix_attention.py tests/test_crf.py tests/test_crf_cuda.py tests/test_crf_native.py tests/test_crf_layer.py tests/test_hf_attention.py tests/test_backend.py
       tests/test_prompted_bert.py tests/test_model.py tests/test_reference_crf.py tests/test_reference_prefix_attention.py
       tests/test_profiling.py tests/test_flops.py tests/test_triton_autograd.py)
timeout 200 python -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tail -40 | tee "$out/gpu_tests.log"
timeout 150 python -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-min-rounds=20 \
    --benchmark-max-time=0.5 --ignore=bench/test_train_step.py --ignore=bench/test_images.py 2>&1 | tail -15 | tee "$out/bench.log"
timeout 200 python -m pytest -q -p no:cacheprovider bench/test_train_step.py --benchmark-only -k "not compile" \
    2>&1 | tail -30 | tee "$out/train_step.log"
# images: DALI's mixed (GPU) decoder against HF's processor (fidelity) and the same bad-file events, then images/s
# of every provider (needs nvidia-dali-cuda130 and scikit-image on the machine; the DALI ones skip, saying so, without)
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_image_sources.py tests/test_image_fidelity.py \
    2>&1 | tail -15 | tee "$out/image_tests.log"
timeout 120 python -m pytest -q -p no:cacheprovider bench/test_images.py --benchmark-only 2>&1 | tail -15 \
    | tee "$out/images_bench.log"
for f in bench/results/*.json; do
    cp "$f" "$out/" 2>/dev/null
    python bench/summarize.py "$f" > "$out/$(basename "$f" .json).md"
done
