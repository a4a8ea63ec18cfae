// Declarations of the native CPU kernels of tpm_fast._C, and the input checks that the CPU registrations
// (csrc/bindings.cpp) and the CUDA ones (csrc/crf_cuda_bind.cu) share. Contracts: those of the Triton launchers in
// kernels/prefix_attention.py and kernels/crf.py. ATen only (no Python headers), so that nvcc can include it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace tpm_fast {

// ------------------------------------------------------------------------------------------------ input checks

// t on `device`: a CPU tensor for the CPU kernels, else on the same CUDA device as the op's first input.
inline void check_device(const at::Tensor& t, const at::Device& device, const char* name) {
  if (device.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), "tpm_fast native kernels: ", name, " must be a CPU tensor, got ", t.device());
  } else {
    TORCH_CHECK(t.device() == device, "tpm_fast native kernels: ", name, " must be on ", device,
                " like the other inputs, got ", t.device());
  }
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "tpm_fast native kernels: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The CRF ops' common inputs, all on `device`: emissions (B, n, T) float with n >= 1 (alpha, for the backward),
// mask (B, n) bool, end (T,), transitions (T, T), tags (B, n) int64 when given.
inline void check_crf(const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& end,
                      const at::Tensor& transitions, const std::optional<at::Tensor>& tags, const at::Device& device) {
  check_device(emissions, device, "emissions");
  TORCH_CHECK(emissions.dim() == 3 && emissions.is_floating_point(), "CRF: emissions must be a 3-d float tensor "
              "(B, n, T), got ", emissions.sizes(), " ", emissions.scalar_type());
  const int64_t b = emissions.size(0), n = emissions.size(1), t = emissions.size(2);
  TORCH_CHECK(n >= 1, "CRF: sequence length must be >= 1");
  check_device(mask, device, "mask");
  check_shape(mask, {b, n}, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "CRF: mask must be bool, got ", mask.scalar_type());
  check_device(end, device, "end");
  check_shape(end, {t}, "end");
  check_device(transitions, device, "transitions");
  check_shape(transitions, {t, t}, "transitions");
  if (tags) {
    check_device(*tags, device, "tags");
    check_shape(*tags, {b, n}, "tags");
    TORCH_CHECK(tags->scalar_type() == at::kLong, "CRF: tags must be int64, got ", tags->scalar_type());
  }
}

// ------------------------------------------------------------------------------------------------ CPU kernels

// Dropout of x (any shape and strides; fp32 / bf16 / fp16) with a Philox seed (1,) int64: a contiguous y with
// y[i] = x[i] / (1 - p) where u_i >= p, else 0, over x's flat (row-major) index i = 64 * blk + 16 * w + l (l < 16),
// u_i = word w of tl.rand4x(seed, 16 * blk + l). Applied to the incoming gradient with the same seed it is its own
// backward.
at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);

// Prefix-K/V attention. q (B, H, n, d), k / v (B, H, n_k, d), k_p / v_p (B, H, m, d), one dtype (fp32 / bf16),
// any strides; key_padding_mask (B, n_k) bool; lengths (B,) int32 / int64; seed (1,) int64 (dropout_p > 0).
// Returns out (like q) and lse (B, H, n) fp32 in log2 units (+inf for rows without a visible key).
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p, const at::Tensor& v_p,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale);

// Returns dq, dk, dv, dk_p, dv_p (like the inputs); padded keys get exactly 0. out and lse (the forward's) are
// checked and not read: the CPU kernel recomputes each row's P as the forward did and its softmax-backward sum from
// P and dP (the contract, shared with the Triton kernels, keeps them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_p, const at::Tensor& v_p, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale);

// Linear-chain CRF (pytorch-crf semantics). emissions (B, n, T); tags (B, n) int64 or none; mask (B, n) bool,
// left-aligned; start / end (T,); transitions (T, T). Returns out (B,) fp32 (gold - log Z, or log Z without tags)
// and alpha (B, n, T) fp32: the forward alphas, each step shifted by its max over the tags (0 on padding rows).
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
