// Host launchers of the CUDA CRF kernels (csrc/crf_cuda_fwd.cu, csrc/crf_cuda_bwd.cu, csrc/crf_cuda_viterbi.cu;
// shared helpers in csrc/crf_cuda_common.cuh): plain C++ over raw device pointers, no torch, so the kernels compile
// and can be checked on their own. csrc/crf_cuda_bind.cu validates tensors and calls them.
//
// Contract: that of crf_forward_cpu / crf_backward_cpu / crf_viterbi_cpu (csrc/crf_cpu.cpp) and of the Triton
// launchers (kernels/crf.py): row b's length is its mask row's number of nonzero entries clamped to [1, n], read in
// the kernel (left-aligned masks); tags on real tokens are clamped into [0, T); all arithmetic is fp32 but the
// forward's sum of shifts, gold score and gold - log Z (fp64).
// Requirements the launchers do not check: every pointer is a device pointer on the current device, the fp32
// parameters and alpha are contiguous, the emissions' last-dim stride is 1.
// Each launcher returns cudaErrorInvalidValue for sizes outside 1 <= T <= kCrfCudaMaxTags, 1 <= n <= 2^31 - 1,
// 0 <= B <= 2^31 - 1; launches nothing for B == 0; else returns cudaGetLastError() after the launch on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tpm_fast {

constexpr int kCrfCudaMaxTags = 64;  // lane j of a warp owns tags j and j + 32

enum class CrfDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };  // emissions in, grad_emissions out

// Forward algorithm and, with tags, the gold path score: out (B,) = gold - log Z (log Z when tags is null);
// alpha (B, n, T) contiguous: the forward log-potentials, each step's row shifted so that its max over the tags is 0
// (a row without a finite max is left unshifted), rows t >= length 0 (what crf_forward_cpu saves). log Z is the sum
// of the shifts plus logsumexp(alpha[length-1] + end); gold - log Z is formed in fp64.
cudaError_t launch_crf_forward(
    const void* emissions,  // shape: (B, n, T) emissions_dtype, strides (stride_eb, stride_en, 1)
    CrfDtype emissions_dtype, int64_t stride_eb, int64_t stride_en,
    const int64_t* tags,  // shape: (B, n) strides (stride_tb, stride_tn), or nullptr
    int64_t stride_tb, int64_t stride_tn,
    const uint8_t* mask,  // shape: (B, n) strides (stride_mb, stride_mn), left-aligned
    int64_t stride_mb, int64_t stride_mn,
    const float* start,        // shape: (T,)
    const float* end,          // shape: (T,)
    const float* transitions,  // shape: (T, T), [i, j] scores tag i -> tag j
    float* out,                // shape: (B,) out
    float* alpha,              // shape: (B, n, T) out
    int64_t B, int64_t n, int64_t T, cudaStream_t stream);

// Backward by marginals (the reverse recursion over the saved, shifted alphas, which it needs only up to the shifts):
// grad_emissions (B, n, T) contiguous in grad_dtype, g_b * (onehot(y_t) - gamma_t) with tags (the gold entry as the
// sum of the other marginals, no 1 - gamma), g_b * gamma_t without, 0 on padding; grad_params (B, 2T + T*T)
// per-sequence partials [start (T) | end (T) | transitions (T*T, row-major)].
cudaError_t launch_crf_backward(
    const float* grad,  // shape: (B,) element stride stride_g (0 for an expanded scalar)
    int64_t stride_g,
    const int64_t* tags,  // shape: (B, n) strides (stride_tb, stride_tn), or nullptr
    int64_t stride_tb, int64_t stride_tn,
    const uint8_t* mask,  // shape: (B, n) strides (stride_mb, stride_mn), left-aligned
    int64_t stride_mb, int64_t stride_mn,
    const float* end,          // shape: (T,)
    const float* transitions,  // shape: (T, T)
    const float* alpha,        // shape: (B, n, T) from launch_crf_forward
    void* grad_emissions,      // shape: (B, n, T) out, grad_dtype
    CrfDtype grad_dtype,
    float* grad_params,  // shape: (B, 2T + T*T) out
    int64_t B, int64_t n, int64_t T, cudaStream_t stream);

// Viterbi with torchcrf's sums ((score_i + trans_ij) + em_j) and tie-breaking (first max; a NaN wins): best
// (B, n) best tags, 0 on padding; lengths (B,). backpointers is caller-provided scratch.
cudaError_t launch_crf_viterbi(
    const void* emissions,  // shape: (B, n, T) emissions_dtype, strides (stride_eb, stride_en, 1)
    CrfDtype emissions_dtype, int64_t stride_eb, int64_t stride_en,
    const uint8_t* mask,  // shape: (B, n) strides (stride_mb, stride_mn), left-aligned
    int64_t stride_mb, int64_t stride_mn,
    const float* start,        // shape: (T,)
    const float* end,          // shape: (T,)
    const float* transitions,  // shape: (T, T)
    uint8_t* backpointers,     // shape: (B, n, T) scratch
    int64_t* best,             // shape: (B, n) out
    int64_t* lengths,          // shape: (B,) out
    int64_t B, int64_t n, int64_t T, cudaStream_t stream);

}  // namespace tpm_fast
