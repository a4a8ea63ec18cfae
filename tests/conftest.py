"""Test setup. Environment variables must be set before any module that reads them is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter when there is no GPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
