"""Test setup. Environment variables must be set before any module that reads them is imported."""

import os

# Triton kernels run on the CPU interpreter when there is no GPU (checked without touching CUDA: no device node).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
