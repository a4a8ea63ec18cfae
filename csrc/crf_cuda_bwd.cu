// The CUDA CRF backward kernel (by marginals) and its launcher launch_crf_backward (csrc/crf_cuda.h); the layout,
// the shared arithmetic and the helpers are csrc/crf_cuda_common.cuh's.
//
// Backward: the reverse-mode (adjoint) recursion of crf_cpu.cpp / kernels/crf_bwd.py over the saved (per-step
// shifted) alphas: gamma_last = exp(alpha_last + end - log Z) with log Z of the shifted alphas (recomputed by the
// forward's own warp_log_z, so bit-identical to what the forward added its shifts to); for t = last .. 1 the
// column sums s_j of step t are recomputed with the forward's own arithmetic,
// xi[i, j] = exp((alpha_{t-1}[i] + trans[i, j]) - m_j) * gamma_t[j] / s_j, gamma_{t-1}[i] = sum_j xi[i, j] (a
// row sum across lanes: one reduce-scatter of 31 shuffles per 32 rows). The sequence's transitions partial
// (sum_t of -xi_t + pair one-hots, or of xi_t) accumulates in a per-warp (T, RS) shared tile, element [i, j]
// only ever touched by the lane owning column j, and is written out once, times g.
// With tags, no 1 - p is ever formed (as csrc/crf_cpu_rows.h backward_row): d_t's gold entry is the sum of the other
// tags' gamma_t, and the gold pair's step term 1 - xi_t[y_{t-1}, y_t] is the sum of all the other pairs' xi_t (the
// rows i != y_{t-1} of gamma_{t-1} plus row y_{t-1}'s columns j != y_t): for a confident model p ~ 1 - 1e-4, whose
// fp32 rounding would be ~1e-3 of the gradient.

#include <cuda_runtime.h>

#include <cstdint>

#include "crf_cuda.h"
#include "crf_cuda_common.cuh"

namespace tpm_fast {
namespace {

// Sequences per block of the backward: at T > 32 its per-warp (64, 64) fp32 accumulator tile (16 KiB) and the
// transitions (16 KiB) keep one warp per block under the 48 KiB of static shared memory.
template <int NT>
constexpr int backward_warps() {
  return NT == 1 ? 4 : 1;
}

// g * d over the warp's tags (gamma 0 on tags >= T): with tags d = onehot(y) - gamma, its gold entry as the sum of
// the other tags' gamma (one warp sum; as gold_minus_marginals of csrc/crf_cpu_rows.h), without d = gamma.
template <bool kTags, int NT>
__device__ __forceinline__ void emission_grad(const float (&gamma)[NT], int y, float g, int lane, float (&dv)[NT]) {
  if constexpr (kTags) {
    float rest = 0.0f;
#pragma unroll
    for (int k = 0; k < NT; ++k) rest += lane + 32 * k == y ? 0.0f : gamma[k];
    rest = warp_sum(rest);
#pragma unroll
    for (int k = 0; k < NT; ++k) dv[k] = lane + 32 * k == y ? g * rest : -g * gamma[k];
  } else {
#pragma unroll
    for (int k = 0; k < NT; ++k) dv[k] = g * gamma[k];
  }
}

template <int NT>
struct BackwardShared : Shared<NT, backward_warps<NT>()> {
  float acc[backward_warps<NT>()][32 * NT * 32 * NT];  // shape: per warp (T, RS) transitions partial
  // per warp, with tags: the step's gold pair's partial before the step, set and read by the lane owning it (the
  // step's __syncwarp orders a step's read before the next step's write); shared, not a register held across the
  // step's loop, which spilled on sm_90 (where ptxas builds the NT = 1 kernel with 64 registers)
  float gold[backward_warps<NT>()];
};

template <typename out_t, int NT, bool kTags>
__global__ void __launch_bounds__(32 * backward_warps<NT>())
    crf_backward_kernel(const float* __restrict__ grad,    // shape: (B,), element stride d.sg
                        const int64_t* __restrict__ tags,  // shape: (B, n), read only with kTags
                        const uint8_t* __restrict__ mask,  // shape: (B, n)
                        const float* __restrict__ end,     // shape: (T,)
                        const float* __restrict__ trans,   // shape: (T, T)
                        const float* __restrict__ alpha,   // shape: (B, n, T)
                        out_t* __restrict__ g_em,          // shape: (B, n, T)
                        float* __restrict__ g_par,         // shape: (B, 2T + T*T)
                        const Dims d) {
  constexpr int RS = 32 * NT;
  __shared__ BackwardShared<NT> sh;
  stage_transitions<NT>(sh.tr, trans, d.T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * backward_warps<NT>() + warp;
  if (b >= d.B) return;
  const int n = d.n, T = d.T;
  const int L = row_length(mask + b * d.smb, d.smn, n, lane);
  const float g = grad[b * d.sg];
  const float* al_row = alpha + b * n * T;   // shape: (n, T)
  out_t* gem_row = g_em + b * n * T;         // shape: (n, T)
  float* par = g_par + b * (2 * T + T * T);  // shape: (2T + T*T,) [start | end | transitions]
  float* acc = sh.acc[warp];                 // shape: (T, RS) transitions partial before the factor g
  const int64_t* tag_row = kTags ? tags + b * d.stb : nullptr;

  for (int64_t idx = static_cast<int64_t>(L) * T + lane; idx < static_cast<int64_t>(n) * T; idx += 32) {
    gem_row[idx] = from_float<out_t>(0.0f);  // padding: zero gradient
  }
  // acc[i, j] is only ever touched by lane j % 32 (zeroed, accumulated, written out): no synchronization needed
  for (int i = 0; i < T; ++i) {
#pragma unroll
    for (int k = 0; k < NT; ++k) acc[i * RS + lane + 32 * k] = 0.0f;
  }

  const int last = L - 1;
  float gamma[NT], dv[NT];  // gamma_t and g * d_t of the lane's tags (0 for tags >= T)
  {
    float v[NT];
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      v[k] = j < T ? al_row[static_cast<int64_t>(last) * T + j] + end[j] : neg_inf();
    }
    const float log_z = warp_log_z<NT>(v);  // as the forward computed it
#pragma unroll
    for (int k = 0; k < NT; ++k) gamma[k] = lane + 32 * k < T ? expf(v[k] - log_z) : 0.0f;
  }
  int cur = kTags ? clamp_tag(tag_row[last * d.stn], T) : 0;
  emission_grad<kTags, NT>(gamma, cur, g, lane, dv);
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    if (j < T) {
      gem_row[static_cast<int64_t>(last) * T + j] = from_float<out_t>(dv[k]);
      par[T + j] = dv[k];  // end
    }
  }

  float a_next[NT];  // alpha_{t-1} of the next step, loaded one step ahead
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    a_next[k] = (last > 0 && j < T) ? al_row[static_cast<int64_t>(last - 1) * T + j] : neg_inf();
  }
  const float sign = kTags ? -1.0f : 1.0f;
  for (int t = last; t > 0; --t) {  // the pair (t-1, t)
    float* a = sh.row[warp][t & 1];  // shape: (RS,) alpha_{t-1}
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      a[j] = a_next[k];
      a_next[k] = (t > 1 && j < T) ? al_row[static_cast<int64_t>(t - 2) * T + j] : neg_inf();
    }
    __syncwarp();  // alpha_{t-1} of every lane is in a (step t+2's reads of this buffer were done by step t+1's sync)
    if constexpr (kTags) {  // the gold pair (y_{t-1}, y_t)'s partial before this step, saved by its owner
      if (lane == (cur & 31)) sh.gold[warp] = acc[clamp_tag(tag_row[(t - 1) * d.stn], T) * RS + cur];
    }
    float m[NT], w[NT];
    column_max_sum<NT>(a, sh.tr, T, lane, m, w);  // the forward's step t, recomputed
#pragma unroll
    for (int k = 0; k < NT; ++k) {  // a column sum is 0 only for unreachable / padded tags, whose gamma is 0
      w[k] = lane + 32 * k < T ? gamma[k] / (w[k] == 0.0f ? 1.0f : w[k]) : 0.0f;
    }
    float gnew[NT];  // gamma_{t-1}: row sums of xi, lane l receiving rows l and l + 32
#pragma unroll
    for (int c = 0; c < NT; ++c) {  // rows 32c .. 32c + 31
      float x[32];                  // x[r]: the lane's share of row 32c + r's sum
#pragma unroll
      for (int r = 0; r < 32; ++r) {
        const int i = 32 * c + r;
        x[r] = 0.0f;
        if (i < T) {
          const float a_i = a[i];
#pragma unroll
          for (int k = 0; k < NT; ++k) {
            const int j = lane + 32 * k;
            const float xi = j < T ? expf(shifted(a_i, sh.tr[i * RS + j], m[k])) * w[k] : 0.0f;  // xi_t[i, j]
            x[r] += xi;
            acc[i * RS + j] += sign * xi;
          }
        }
      }
      warp_reduce_scatter<16>(x, lane);
      gnew[c] = x[0];
    }
#pragma unroll
    for (int k = 0; k < NT; ++k) gamma[k] = lane + 32 * k < T ? gnew[k] : 0.0f;
    if constexpr (kTags) {
      // the gold pair's partial: the saved one + (for 1 - xi_t[prev, cur]) the sum of the other pairs' xi_t:
      // gamma_{t-1} over rows != prev, plus xi_t[prev, j] over columns j != cur, recomputed as in the loop above
      const int prev = clamp_tag(tag_row[(t - 1) * d.stn], T);
      const float a_prev = a[prev];
      float rest = 0.0f;
#pragma unroll
      for (int k = 0; k < NT; ++k) {
        const int j = lane + 32 * k;
        rest += j == prev ? 0.0f : gamma[k];
        if (j < T && j != cur) rest += expf(shifted(a_prev, sh.tr[prev * RS + j], m[k])) * w[k];
      }
      rest = warp_sum(rest);
      if (lane == (cur & 31)) acc[prev * RS + cur] = sh.gold[warp] + rest;
      cur = prev;
    }
    emission_grad<kTags, NT>(gamma, cur, g, lane, dv);  // d_{t-1} (cur: y_{t-1} now)
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      if (j < T) gem_row[static_cast<int64_t>(t - 1) * T + j] = from_float<out_t>(dv[k]);
    }
  }
  float* ptr = par + 2 * T;  // shape: (T, T) row-major
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    if (j < T) par[j] = dv[k];  // start: g * d_0
  }
  for (int i = 0; i < T; ++i) {
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      if (j < T) ptr[i * T + j] = g * acc[i * RS + j];
    }
  }
}

template <typename out_t, int NT>
cudaError_t backward_typed(const float* grad, const int64_t* tags, const uint8_t* mask, const float* end,
                           const float* trans, const float* alpha, void* g_em, float* g_par, const Dims& d,
                           cudaStream_t stream) {
  out_t* ge = static_cast<out_t*>(g_em);
  constexpr int warps = backward_warps<NT>();
  const dim3 grid = grid_of(d.B, warps);
  return launch_tagged(tags, [&]<bool kTags>() {
    crf_backward_kernel<out_t, NT, kTags>
        <<<grid, 32 * warps, 0, stream>>>(grad, tags, mask, end, trans, alpha, ge, g_par, d);
  });
}

}  // namespace

cudaError_t launch_crf_backward(const float* grad, int64_t stride_g, const int64_t* tags, int64_t stride_tb,
                                int64_t stride_tn, const uint8_t* mask, int64_t stride_mb, int64_t stride_mn,
                                const float* end, const float* transitions, const float* alpha, void* grad_emissions,
                                CrfDtype grad_dtype, float* grad_params, int64_t B, int64_t n, int64_t T,
                                cudaStream_t stream) {
  if (bad_sizes(B, n, T)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  Dims d = dims_of(B, n, T);
  d.stb = stride_tb, d.stn = stride_tn, d.smb = stride_mb, d.smn = stride_mn, d.sg = stride_g;
  return dispatch(grad_dtype, T, [&]<typename out_t, int NT>() {
    return backward_typed<out_t, NT>(grad, tags, mask, end, transitions, alpha, grad_emissions, grad_params, d,
                                     stream);
  });
}

}  // namespace tpm_fast
