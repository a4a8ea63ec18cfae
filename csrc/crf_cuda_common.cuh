// The shared part of the CUDA kernels of the batched linear-chain CRF (pytorch-crf semantics), which have exactly the
// contract of the C++ CPU kernels (csrc/crf_cpu.cpp) and of the Triton launchers (kernels/crf.py): the forward
// (csrc/crf_cuda_fwd.cu), the backward (csrc/crf_cuda_bwd.cu) and Viterbi (csrc/crf_cuda_viterbi.cu), whose launchers
// csrc/crf_cuda.h declares. Pure CUDA C++ (no torch): csrc/crf_cuda_bind.cu registers them for CUDA tensors.
// Device helpers, shared-memory layout and launch plumbing; all of it templates, inline functions and types in an
// anonymous namespace, so each kernel file compiles its own copy and nothing is defined twice at link time.
//
// Layout. One warp per sequence, several sequences per block (kWarps; the backward at T > 32: 1, for its shared
// memory). Lane l owns tags l and l + 32 (NT = 2 slots when T > 32, else NT = 1; T <= 64). The transitions are
// staged once per block in shared memory as fp32 rows of RS = 32 * NT entries (columns >= T hold -inf): lane l
// reads column l of a row, so a warp's reads are conflict-free, and the row being consumed (alpha_{t-1} or Viterbi
// scores) sits in a per-warp shared buffer read as broadcasts.
// That buffer is double-buffered: one __syncwarp() per step orders the writes of step t-1 before the reads of step t
// and the reads of step t-1 before the writes of step t+1. Lanes of tags >= T hold -inf scores / zero marginals and
// never write an output. Every output element has one writer (no atomics): deterministic.
//
// Arithmetic: fp32, accurate expf / logf (built without --use_fast_math), but for the forward's sum of shifts, gold
// score and gold - log Z, in fp64 (a few adds per step). Emissions (and the emissions' gradient) are fp32 / fp16 /
// bf16, widened exactly on load, rounded to nearest on store.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "crf_cuda.h"

#if defined(__FAST_MATH__) || defined(__USE_FAST_MATH__)
#error "the CUDA CRF kernels need accurate expf / logf and IEEE NaN / inf handling: build without --use_fast_math"
#endif

namespace tpm_fast {
namespace {

constexpr int kWarps = 4;  // sequences (warps) per block of the forward and Viterbi kernels
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int clamp_tag(int64_t tag, int T) {
  return static_cast<int>(tag < 0 ? 0 : (tag >= T ? T - 1 : tag));
}

// Butterfly reductions: every lane ends with the same bits (IEEE add / max are commutative).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {  // NaN entries are skipped (fmaxf)
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Reduce-scatter: lane l ends with sum over the warp's lanes of their x[l] in x[0] (x is clobbered). The step of
// offset OFF halves the rows each lane carries: it keeps the half selected by its bit OFF and adds the partner's copy
// of that half, so after it x[r] holds row r + (lane & OFF) + (the bits kept before); 16 + 8 + 4 + 2 + 1 = 31
// shuffles. A template per step, so that every loop bound is a constant and x stays in registers.
template <int OFF>
__device__ __forceinline__ void warp_reduce_scatter(float (&x)[32], int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int r = 0; r < OFF; ++r) {
    const float keep = upper ? x[r + OFF] : x[r];
    const float send = upper ? x[r] : x[r + OFF];
    x[r] = keep + __shfl_xor_sync(kFull, send, OFF);
  }
  if constexpr (OFF > 1) warp_reduce_scatter<OFF / 2>(x, lane);
}

// Row length: the number of nonzero entries of mask row `row`, clamped to [1, n]; the same value on every lane.
__device__ __forceinline__ int row_length(const uint8_t* row, int64_t stride_mn, int n, int lane) {
  int count = 0;
  for (int t = lane; t < n; t += 32) count += row[t * stride_mn] != 0;
  count = warp_sum(count);
  return count < 1 ? 1 : (count > n ? n : count);
}

// logsumexp over the warp's tags of v = alpha_last + end (-inf on lanes' tags >= T); all -inf gives -inf. With the
// shifted alphas that is log Z less the forward's sum of shifts; the forward and the backward both call this on the
// same fp32 values: bit-identical.
template <int NT>
__device__ __forceinline__ float warp_log_z(const float (&v)[NT]) {
  float m = v[0];
#pragma unroll
  for (int k = 1; k < NT; ++k) m = fmaxf(m, v[k]);
  m = warp_max(m);
  if (m == neg_inf()) m = 0.0f;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < NT; ++k) s += expf(v[k] - m);
  return m + logf(warp_sum(s));
}

// Shifts the lane's alphas a (-inf for tags >= T) by their max over the warp's tags when that is finite (NaN entries
// skipped; an all -inf / NaN row, or one holding +inf, is left as it is) and returns the shift (else 0): the saved
// rows' max is 0, so fp32 keeps the small differences that every softmax of the recursion is made of, where unshifted
// alphas grow with t (ulp 3e-5 at 400). As shift_to_max of csrc/crf_cpu_rows.h.
template <int NT>
__device__ __forceinline__ float shift_to_max(float (&a)[NT]) {
  float m = a[0];
#pragma unroll
  for (int k = 1; k < NT; ++k) m = fmaxf(m, a[k]);
  m = warp_max(m);  // the same bits on every lane: a warp-uniform branch
  if (!(m > neg_inf() && m < pos_inf())) return 0.0f;
#pragma unroll
  for (int k = 0; k < NT; ++k) a[k] -= m;
  return m;
}

// The per-block shared memory of W warps: the transitions and each warp's exchange row.
template <int NT, int W>
struct Shared {
  static constexpr int kRS = 32 * NT;  // row stride = tags owned by the warp's lanes
  float tr[kRS * kRS];                 // shape: (T, kRS) transitions, columns >= T -inf; rows >= T unused
  float row[W][2][kRS];                // shape: per warp (2, kRS) double-buffered alpha / score row, -inf >= T
};


// Every thread of the block copies part of transitions (T, T) contiguous fp32 into tr, then the block syncs.
template <int NT>
__device__ __forceinline__ void stage_transitions(float* tr, const float* __restrict__ transitions, int T) {
  constexpr int RS = 32 * NT;
  for (int idx = threadIdx.x; idx < T * RS; idx += blockDim.x) {
    const int i = idx / RS, j = idx % RS;
    tr[idx] = j < T ? transitions[i * T + j] : neg_inf();
  }
  __syncthreads();
}

// One term of a step's column log-sum-exp: (alpha_{t-1}[i] + trans[i, j]) - m_j; the forward and the backward
// both go through it (same rounding).
__device__ __forceinline__ float shifted(float a_i, float tr_ij, float m_j) { return (a_i + tr_ij) - m_j; }

// Column max and sum of one step for the lane's NT tags: m[k] = max_i (a[i] + tr[i, j_k]) (0 for an all -inf
// column), sum[k] = sum_i exp(shifted(...)), in order i = 0 .. T-1. a: this warp's shared row (broadcast reads).
template <int NT>
__device__ __forceinline__ void column_max_sum(const float* a, const float* tr, int T, int lane, float (&m)[NT],
                                               float (&sum)[NT]) {
  constexpr int RS = 32 * NT;
#pragma unroll
  for (int k = 0; k < NT; ++k) m[k] = neg_inf();
#pragma unroll 4
  for (int i = 0; i < T; ++i) {
    const float a_i = a[i];
#pragma unroll
    for (int k = 0; k < NT; ++k) m[k] = fmaxf(m[k], a_i + tr[i * RS + lane + 32 * k]);
  }
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    if (m[k] == neg_inf()) m[k] = 0.0f;
    sum[k] = 0.0f;
  }
#pragma unroll 4
  for (int i = 0; i < T; ++i) {
    const float a_i = a[i];
#pragma unroll
    for (int k = 0; k < NT; ++k) sum[k] += expf(shifted(a_i, tr[i * RS + lane + 32 * k], m[k]));
  }
}

// Emissions of step t for the lane's NT tags, widened to fp32: em_row[t, j] (0 for t >= L or tags >= T). The forward
// and Viterbi load step t + 1's during step t, one step ahead of their use.
template <int NT, typename scalar_t>
__device__ __forceinline__ void load_emissions(const scalar_t* em_row, int64_t sen, int t, int L, int T, int lane,
                                               float (&e)[NT]) {
#pragma unroll
  for (int k = 0; k < NT; ++k) {
    const int j = lane + 32 * k;
    e[k] = (t < L && j < T) ? to_float(em_row[t * sen + j]) : 0.0f;
  }
}

// One step on: e = step t's emissions (e_next, loaded during step t - 1), e_next = step t + 1's.
template <int NT, typename scalar_t>
__device__ __forceinline__ void next_emissions(const scalar_t* em_row, int64_t sen, int t, int L, int T, int lane,
                                               float (&e)[NT], float (&e_next)[NT]) {
#pragma unroll
  for (int k = 0; k < NT; ++k) e[k] = e_next[k];
  load_emissions<NT>(em_row, sen, t + 1, L, T, lane, e_next);
}

// Sizes and strides shared by the kernels (element strides).
struct Dims {
  int64_t B;
  int n, T;
  int64_t seb, sen;  // emissions (B, n, T), last-dim stride 1
  int64_t stb, stn;  // tags (B, n)
  int64_t smb, smn;  // mask (B, n)
  int64_t sg;        // grad (B,)
};

// ------------------------------------------------------------------------------------------------ launch helpers

inline bool bad_sizes(int64_t B, int64_t n, int64_t T) {
  return B < 0 || B > 0x7fffffff || n < 1 || n > 0x7fffffff || T < 1 || T > kCrfCudaMaxTags;  // grid.x < 2^31
}

// Blocks of `warps` sequences covering the batch.
inline dim3 grid_of(int64_t B, int warps) { return dim3(static_cast<unsigned>((B + warps - 1) / warps)); }

// Calls f.template operator()<scalar_t, NT>() for the dtype code and the tag count.
template <class F>
cudaError_t dispatch(CrfDtype dtype, int64_t T, F&& f) {
  const bool wide = T > 32;
  switch (dtype) {
    case CrfDtype::kFloat32:
      return wide ? f.template operator()<float, 2>() : f.template operator()<float, 1>();
    case CrfDtype::kFloat16:
      return wide ? f.template operator()<__half, 2>() : f.template operator()<__half, 1>();
    case CrfDtype::kBFloat16:
      return wide ? f.template operator()<__nv_bfloat16, 2>() : f.template operator()<__nv_bfloat16, 1>();
  }
  return cudaErrorInvalidValue;
}

inline Dims dims_of(int64_t B, int64_t n, int64_t T) {
  Dims d{};
  d.B = B;
  d.n = static_cast<int>(n);
  d.T = static_cast<int>(T);
  return d;
}

// Calls f.template operator()<kTags>() with kTags = (tags != nullptr), the kernels' gold-path switch; then returns
// cudaGetLastError() (f launches a kernel).
template <class F>
cudaError_t launch_tagged(const int64_t* tags, F&& f) {
  if (tags != nullptr) {
    f.template operator()<true>();
  } else {
    f.template operator()<false>();
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace tpm_fast
