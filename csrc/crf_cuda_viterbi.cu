// The CUDA CRF Viterbi kernel (best paths) and its launcher launch_crf_viterbi (csrc/crf_cuda.h); the layout, the
// shared arithmetic and the helpers are csrc/crf_cuda_common.cuh's.
//
// Viterbi: max-plus with torchcrf's sums ((score_i + trans_ij) + em_j) and tie-breaking (first max; the first NaN
// wins, as torch.max), uint8 back-pointers in the caller's (B, n, T) scratch; the backtrace stages 32 steps of
// back-pointers in shared memory at a time and walks them (every lane in step, broadcast reads), every read
// clamped into [0, T) (NaN scores: tags stay in range, the path is unspecified).

#include <cuda_runtime.h>

#include <cstdint>

#include "crf_cuda.h"
#include "crf_cuda_common.cuh"

namespace tpm_fast {
namespace {

template <int NT>
struct ViterbiShared : Shared<NT, kWarps> {
  uint8_t bp[kWarps][32 * 32 * NT];  // shape: per warp (32 steps, T) back-pointers being walked
};

// (v, i) comes before (w, k) in torch.max order: a NaN first (the first NaN wins), then the larger value, then the
// lower index. A total order on distinct indices, so a butterfly over it gives every lane the same winner.
__device__ __forceinline__ bool before(float v, int i, float w, int k) {
  const bool v_nan = v != v, w_nan = w != w;
  if (v_nan != w_nan) return v_nan;
  if (!v_nan && v != w) return v > w;
  return i < k;
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(32 * kWarps)
    crf_viterbi_kernel(const scalar_t* __restrict__ em,   // shape: (B, n, T)
                       const uint8_t* __restrict__ mask,  // shape: (B, n)
                       const float* __restrict__ start,   // shape: (T,)
                       const float* __restrict__ end,     // shape: (T,)
                       const float* __restrict__ trans,   // shape: (T, T)
                       uint8_t* bp,                       // shape: (B, n, T) written, then read: not __restrict__
                       int64_t* __restrict__ best,        // shape: (B, n)
                       int64_t* __restrict__ lengths,     // shape: (B,)
                       const Dims d) {
  constexpr int RS = 32 * NT;
  __shared__ ViterbiShared<NT> sh;
  stage_transitions<NT>(sh.tr, trans, d.T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (b >= d.B) return;
  const int n = d.n, T = d.T;
  const int L = row_length(mask + b * d.smb, d.smn, n, lane);
  const scalar_t* em_row = em + b * d.seb;  // shape: (n, T)
  uint8_t* bp_row = bp + b * n * T;         // shape: (n, T), rows 1 .. L-1 written
  int64_t* out_row = best + b * n;          // shape: (n,)

  float score[NT];  // best score of a path ending in the lane's tags, -inf for tags >= T
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    score[k] = j < T ? start[j] + to_float(em_row[j]) : neg_inf();
    sh.row[warp][0][j] = score[k];
  }
  float e_next[NT];
  load_emissions<NT>(em_row, d.sen, 1, L, T, lane, e_next);
  for (int t = 1; t < L; ++t) {
    float e[NT];
    next_emissions<NT>(em_row, d.sen, t, L, T, lane, e, e_next);
    __syncwarp();
    const float* prev = sh.row[warp][(t - 1) & 1];
    float m[NT];
    int idx[NT];
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      m[k] = (prev[0] + sh.tr[lane + 32 * k]) + e[k];
      idx[k] = 0;
    }
    for (int i = 1; i < T; ++i) {
      const float p_i = prev[i];
#pragma unroll
      for (int k = 0; k < NT; ++k) {
        const float v = (p_i + sh.tr[i * RS + lane + 32 * k]) + e[k];
        const bool take = v > m[k] || (v != v && m[k] == m[k]);  // first max; the first NaN wins
        m[k] = take ? v : m[k];
        idx[k] = take ? i : idx[k];
      }
    }
    float* nxt = sh.row[warp][t & 1];
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int j = lane + 32 * k;
      score[k] = j < T ? m[k] : neg_inf();
      nxt[j] = score[k];
      if (j < T) bp_row[static_cast<int64_t>(t) * T + j] = static_cast<uint8_t>(idx[k]);
    }
  }

  // best last tag: argmax_j (score[j] + end[j]) in torch.max order, tags >= T never win (-inf, higher index)
  float bv = lane < T ? score[0] + end[lane] : neg_inf();
  int bi = lane;
#pragma unroll
  for (int k = 1; k < NT; ++k) {
    const int j = lane + 32 * k;
    const float v = j < T ? score[k] + end[j] : neg_inf();
    if (before(v, j, bv, bi)) {
      bv = v;
      bi = j;
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, off);
    const int oi = __shfl_xor_sync(kFull, bi, off);
    if (before(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  int cur = bi < 0 ? 0 : (bi >= T ? T - 1 : bi);  // the same on every lane
  if (lane == 0) {
    lengths[b] = L;
    out_row[L - 1] = cur;
  }

  // backtrace: steps hi .. lo (<= 32) staged in shared memory, then walked by every lane in step
  uint8_t* tile = sh.bp[warp];  // shape: (32, T)
  __syncwarp();                 // every lane's back-pointer stores are visible to the loads below
  for (int hi = L - 1; hi > 0; hi -= 32) {
    const int lo = hi - 31 > 1 ? hi - 31 : 1;
    const int count = (hi - lo + 1) * T;
    const uint8_t* src = bp_row + static_cast<int64_t>(lo) * T;
    for (int f = lane; f < count; f += 32) tile[f] = src[f];
    __syncwarp();
    int mine = 0;  // lane r keeps the tag of position lo - 1 + r
    for (int t = hi; t >= lo; --t) {
      const int p = tile[(t - lo) * T + cur];
      cur = p >= T ? T - 1 : p;  // memory safety only: back-pointers are < T
      if (lane == t - lo) mine = cur;
    }
    if (lane <= hi - lo) out_row[lo - 1 + lane] = mine;
    __syncwarp();  // the tile's reads are done before the next block overwrites it
  }
  for (int t = L + lane; t < n; t += 32) out_row[t] = 0;  // padding
}

template <typename scalar_t, int NT>
cudaError_t viterbi_typed(const void* em, const uint8_t* mask, const float* start, const float* end,
                          const float* trans, uint8_t* bp, int64_t* best, int64_t* lengths, const Dims& d,
                          cudaStream_t stream) {
  crf_viterbi_kernel<scalar_t, NT><<<grid_of(d.B, kWarps), 32 * kWarps, 0, stream>>>(
      static_cast<const scalar_t*>(em), mask, start, end, trans, bp, best, lengths, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_crf_viterbi(const void* emissions, CrfDtype emissions_dtype, int64_t stride_eb, int64_t stride_en,
                               const uint8_t* mask, int64_t stride_mb, int64_t stride_mn, const float* start,
                               const float* end, const float* transitions, uint8_t* backpointers, int64_t* best,
                               int64_t* lengths, int64_t B, int64_t n, int64_t T, cudaStream_t stream) {
  if (bad_sizes(B, n, T)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  Dims d = dims_of(B, n, T);
  d.seb = stride_eb, d.sen = stride_en, d.smb = stride_mb, d.smn = stride_mn;
  return dispatch(emissions_dtype, T, [&]<typename scalar_t, int NT>() {
    return viterbi_typed<scalar_t, NT>(emissions, mask, start, end, transitions, backpointers, best, lengths, d,
                                       stream);
  });
}

}  // namespace tpm_fast
