"""Pure-PyTorch reference ops: the correctness oracle for the fused kernels and the CPU fallback."""

from tpm_fast.reference.crf import crf_gold_score, crf_log_likelihood, crf_log_partition, crf_viterbi
from tpm_fast.reference.prefix_attention import prefix_attention

__all__ = ["crf_gold_score", "crf_log_likelihood", "crf_log_partition", "crf_viterbi", "prefix_attention"]
