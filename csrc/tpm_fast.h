// Declarations of the native kernels of tpm_fast._C (CPU today). Contracts: those of the Triton launchers in
// kernels/prefix_attention.py and kernels/crf.py; csrc/bindings.cpp validates inputs and registers the ops.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace tpm_fast {

// Prefix-K/V attention. q (B, H, n, d), k / v (B, H, n_k, d), k_p / v_p (B, H, m, d), one dtype (fp32 / bf16),
// any strides; key_padding_mask (B, n_k) bool; lengths (B,) int32 / int64; seed (1,) int64 (dropout_p > 0).
// Returns out (like q) and lse (B, H, n) fp32 in log2 units (+inf for rows without a visible key).
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p, const at::Tensor& v_p,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale);

// Returns dq, dk, dv, dk_p, dv_p (like the inputs); padded keys get exactly 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_p, const at::Tensor& v_p, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale);

// Linear-chain CRF (pytorch-crf semantics). emissions (B, n, T); tags (B, n) int64 or none; mask (B, n) bool,
// left-aligned; start / end (T,); transitions (T, T). Returns out (B,) fp32 (gold - log Z, or log Z without tags)
// and alpha (B, n, T) fp32.
std::tuple<at::Tensor, at::Tensor> crf_forward_cpu(
    const at::Tensor& emissions, const std::optional<at::Tensor>& tags, const at::Tensor& mask,
    const at::Tensor& start, const at::Tensor& end, const at::Tensor& transitions);

// Returns grad_emissions (B, n, T) in grad_dtype and the parameter partials (B, 2T + T*T) fp32.
std::tuple<at::Tensor, at::Tensor> crf_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& tags, const at::Tensor& mask, const at::Tensor& end,
    const at::Tensor& transitions, const at::Tensor& alpha, at::ScalarType grad_dtype);

// Returns best tags (B, n) int64 (0 on padding) and lengths (B,) int64.
std::tuple<at::Tensor, at::Tensor> crf_viterbi_cpu(
    const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& start, const at::Tensor& end,
    const at::Tensor& transitions);

}  // namespace tpm_fast
