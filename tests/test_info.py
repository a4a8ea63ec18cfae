"""python -m tpm_fast.info and the one-line summary train.py prints."""

import subprocess
import sys

from tpm_fast import info


def test_every_backend_is_reported_with_a_version_or_a_reason():
    rows = info.backends()
    names = [name for name, _, _ in rows]
    assert names == ["torch", "triton", "native CPU", "native CUDA", "DALI", "DeepSpeed", "transformers prefix cache"]
    assert all(detail for _, _, detail in rows)  # a version when available, the reason when not
    line = info.summary()
    assert line.startswith("backends: ") and all(name in line for name in names)


def test_module_runs():
    proc = subprocess.run([sys.executable, "-m", "tpm_fast.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "native CPU" in proc.stdout and "triton" in proc.stdout
