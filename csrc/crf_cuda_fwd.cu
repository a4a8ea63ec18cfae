// The CUDA CRF forward kernel (the log-likelihood, or log Z without tags) and its launcher launch_crf_forward
// (csrc/crf_cuda.h); the layout, the shared arithmetic and the helpers are csrc/crf_cuda_common.cuh's.
//
// Forward: alpha_0 = start + em_0; alpha_t[j] = (m_j + log sum_i exp((alpha_{t-1}[i] + trans[i, j]) - m_j))
// + em_t[j] with m_j = max_i (alpha_{t-1}[i] + trans[i, j]) (an all -inf column: m_j = 0, alpha -inf, not NaN);
// each step's alphas (t = 0 included) are then shifted by their max over the tags (shift_to_max), and the shifted
// ones are both the next step's input and what is saved (fp32): as the CPU kernels (csrc/crf_cpu_rows.h forward_row).
// log Z = (sum of the shifts, fp64) + logsumexp_j(alpha_last[j] + end[j]). Gold score: lanes over time, in fp64, one
// warp sum; gold - log Z in fp64 (a confident model's is small, from two values ~ the path's total score).

#include <cuda_runtime.h>

#include <cstdint>

#include "crf_cuda.h"
#include "crf_cuda_common.cuh"

namespace tpm_fast {
namespace {

template <typename scalar_t, int NT, bool kTags>
__global__ void __launch_bounds__(32 * kWarps)
    crf_forward_kernel(const scalar_t* __restrict__ em,   // shape: (B, n, T)
                       const int64_t* __restrict__ tags,  // shape: (B, n), read only with kTags
                       const uint8_t* __restrict__ mask,  // shape: (B, n)
                       const float* __restrict__ start,   // shape: (T,)
                       const float* __restrict__ end,     // shape: (T,)
                       const float* __restrict__ trans,   // shape: (T, T)
                       float* __restrict__ out,           // shape: (B,)
                       float* __restrict__ alpha,         // shape: (B, n, T)
                       const Dims d) {
  constexpr int RS = 32 * NT;
  __shared__ Shared<NT, kWarps> sh;
  stage_transitions<NT>(sh.tr, trans, d.T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (b >= d.B) return;  // whole warps: no block-wide sync below
  const int n = d.n, T = d.T;
  const int L = row_length(mask + b * d.smb, d.smn, n, lane);
  const scalar_t* em_row = em + b * d.seb;  // shape: (n, T)
  float* al_row = alpha + b * n * T;        // shape: (n, T)

  float a[NT];  // shifted alpha_t of the lane's tags, -inf for tags >= T
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    a[k] = j < T ? start[j] + to_float(em_row[j]) : neg_inf();
  }
  double shift = shift_to_max<NT>(a);  // sum of the shifts so far
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    sh.row[warp][0][j] = a[k];
    if (j < T) al_row[j] = a[k];
  }
  float e_next[NT];  // emissions of the next step, loaded one step ahead
  load_emissions<NT>(em_row, d.sen, 1, L, T, lane, e_next);
  for (int t = 1; t < L; ++t) {
    float e[NT];
    next_emissions<NT>(em_row, d.sen, t, L, T, lane, e, e_next);
    __syncwarp();  // alpha_{t-1} of every lane is in row[(t-1) & 1]; step t-1's reads of row[t & 1] are done
    float m[NT], sum[NT];
    column_max_sum<NT>(sh.row[warp][(t - 1) & 1], sh.tr, T, lane, m, sum);
    float* nxt = sh.row[warp][t & 1];
#pragma unroll
    for (int k = 0; k < NT; ++k) a[k] = lane + 32 * k < T ? (m[k] + logf(sum[k])) + e[k] : neg_inf();
    shift += shift_to_max<NT>(a);
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      nxt[j] = a[k];
      if (j < T) al_row[static_cast<int64_t>(t) * T + j] = a[k];
    }
  }
  for (int64_t idx = static_cast<int64_t>(L) * T + lane; idx < static_cast<int64_t>(n) * T; idx += 32) {
    al_row[idx] = 0.0f;  // padding rows
  }

  float v[NT];
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    v[k] = j < T ? a[k] + end[j] : neg_inf();
  }
  const double log_z = shift + static_cast<double>(warp_log_z<NT>(v));
  double result = log_z;
  if constexpr (kTags) {
    // gold score: start[y_0] + sum_t em[t, y_t] + sum_{t>=1} trans[y_{t-1}, y_t] + end[y_last], lanes over time
    const int64_t* tag_row = tags + b * d.stb;
    double acc = 0.0;
    for (int t = lane; t < L; t += 32) {
      const int cur = clamp_tag(tag_row[t * d.stn], T);
      acc += static_cast<double>(to_float(em_row[t * d.sen + cur]));
      if (t > 0) acc += static_cast<double>(sh.tr[clamp_tag(tag_row[(t - 1) * d.stn], T) * RS + cur]);
    }
    const double ends = static_cast<double>(start[clamp_tag(tag_row[0], T)]) +
                        static_cast<double>(end[clamp_tag(tag_row[(L - 1) * d.stn], T)]);
    result = (warp_sum(acc) + ends) - log_z;
  }
  if (lane == 0) out[b] = static_cast<float>(result);
}

template <typename scalar_t, int NT>
cudaError_t forward_typed(const void* em, const int64_t* tags, const uint8_t* mask, const float* start,
                          const float* end, const float* trans, float* out, float* alpha, const Dims& d,
                          cudaStream_t stream) {
  const scalar_t* e = static_cast<const scalar_t*>(em);
  const dim3 grid = grid_of(d.B, kWarps);
  return launch_tagged(tags, [&]<bool kTags>() {
    crf_forward_kernel<scalar_t, NT, kTags>
        <<<grid, 32 * kWarps, 0, stream>>>(e, tags, mask, start, end, trans, out, alpha, d);
  });
}

}  // namespace

cudaError_t launch_crf_forward(const void* emissions, CrfDtype emissions_dtype, int64_t stride_eb, int64_t stride_en,
                               const int64_t* tags, int64_t stride_tb, int64_t stride_tn, const uint8_t* mask,
                               int64_t stride_mb, int64_t stride_mn, const float* start, const float* end,
                               const float* transitions, float* out, float* alpha, int64_t B, int64_t n, int64_t T,
                               cudaStream_t stream) {
  if (bad_sizes(B, n, T)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  Dims d = dims_of(B, n, T);
  d.seb = stride_eb, d.sen = stride_en, d.stb = stride_tb, d.stn = stride_tn, d.smb = stride_mb, d.smn = stride_mn;
  return dispatch(emissions_dtype, T, [&]<typename scalar_t, int NT>() {
    return forward_typed<scalar_t, NT>(emissions, tags, mask, start, end, transitions, out, alpha, d, stream);
  });
}

}  // namespace tpm_fast
