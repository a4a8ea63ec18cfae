// C++ CPU kernels of the batched linear-chain CRF (pytorch-crf semantics), with exactly the contract of the Triton
// launchers in kernels/crf.py (`launch_crf_forward`, `launch_crf_backward`, `launch_crf_viterbi`): same arguments,
// same outputs (shapes, dtypes, padding values), same arithmetic order where it matters (Viterbi sums, tie-breaking).
//
// Contract. emissions (B, n, T) fp32 / bf16 / fp16 (fp64 accepted too), any strides; mask (B, n) bool (or uint8),
// any strides, left-aligned: row b's length is its number of nonzero entries clamped to [1, n], its real tokens
// are positions 0 .. length-1 (mask contents are not otherwise checked); tags (B, n) int64, any strides, clamped
// into [0, T) on real tokens (out-of-range tags give a wrong but memory-safe result), ignored on padding.
// start / end (T,) and transitions (T, T) any float dtype and strides; transitions[i, j] scores tag i -> tag j.
// All arithmetic is fp32. Input validation beyond cheap dim / device / dtype checks is the bindings' job.
//
// Algorithm. One task per sequence: at::parallel_for over the batch with grain 1; every output element is written
// by exactly one task (deterministic for any thread count, no atomics; the parameter gradients are per-sequence
// partials (B, 2T + T*T) that the caller reduces with one .sum(0)). Per sequence the (T, T) work of a time step
// is a loop over the real `from` tags i, inside which a W-lane block of `to` tags j is one SIMD vector: the tag
// dimension is padded to TP = a multiple of W with -inf scores (like the Triton kernels' BLOCK_T padding), so
// padded tags get -inf alphas / zero marginals and are never written out. The vectors are GCC / Clang generic
// vectors (vector_size), i.e. explicit SIMD without intrinsics and independent of -O level and of
// -fno-trapping-math (which g++ needs to if-convert, hence auto-vectorize, loops with float selects); exp and log
// are branch-free Cephes polynomials (within 1 ulp). Two instantiations: W = 4 (SSE2 / NEON, any build) and, on
// x86-64 CPUs with AVX2 + FMA (checked once at run time), W = 8 compiled for AVX2 + FMA.
//
// - Forward: alpha_0 = start + em_0; alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + em_t[j]; log Z =
//   logsumexp_j(alpha_last[j] + end[j]). The gold score is a plain sum over the row. Alphas are saved (B, n, T)
//   fp32, rows t >= length 0.
// - Backward: the reverse-mode (adjoint) recursion of kernels/crf_bwd.py over the saved alphas (forward-backward
//   in normalized form): gamma_last = exp(alpha_last + end - log Z); for t = last .. 1, with the step's column
//   softmax P_t[i, j] = exp(alpha_{t-1}[i] + trans[i, j] - lse_i(...)[j]) recomputed from the saved alphas,
//   xi_t = P_t * gamma_t[None, :] (pairwise marginal), gamma_{t-1} = xi_t.sum(1). Every exponent is a difference
//   of values computed from the same rounded numbers, so the marginals stay exact for alphas ~1e5.
//   With tags (out = gold - log Z): d_t = onehot(y_t) - gamma_t, transitions sum_t (onehot(y_{t-1}, y_t) - xi_t);
//   without (out = log Z): d_t = gamma_t, transitions sum_t xi_t. Everything is scaled by the incoming grad g_b.
// - The column sums of exp(alpha_{t-1}[i] + trans[i, j] - shift_j) (forward and backward alike) come in one of two
//   exact forms, chosen per W-column block and step. Factorized (fast, one exp per tag instead of per pair):
//   shift_j = max(alpha_{t-1}) + cm_j with cm_j = max_i trans[i, j], so each term is p[i] * etr[i, j] with
//   p = exp(alpha_{t-1} - max) (T exps per step) and etr = exp(trans - cm) (once per call): a mat-vec. Taken only
//   when every live column sum is >= 2^-64, so no term that matters underflowed. Otherwise (a column whose best
//   term lies far below the step's max, e.g. a constrained tag whose only predecessors are unlikely; NaN) the
//   block is redone max-subtracted: shift_j = max_i (alpha_{t-1}[i] + trans[i, j]), one exp per pair. In both, an
//   all -inf (dead) column gives -inf (not NaN) and -1e4 / -inf constraint transitions are exact.
// - Viterbi: max-plus recursion with torchcrf's sums ((score_i + trans_ij) + em_j, fp32) and tie-breaking (first
//   index of the max; a NaN wins, as in torch.max), int32 back-pointers in per-task scratch, backtrace with every
//   back-pointer read clamped into [0, T) (NaN scores: tags stay in range, the path is unspecified).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tpm_fast.h"  // the declarations; csrc/bindings.cpp registers them as torch.ops.tpm_fast_native.*

// ------------------------------------------------------------------------------------------------ SIMD helpers

#if !defined(__GNUC__)
#error "csrc/crf_cpu.cpp needs GCC or Clang (generic vector extensions)"
#endif
#if defined(__FAST_MATH__)
#error "csrc/crf_cpu.cpp relies on IEEE semantics (NaN / inf selects, the exp rounding trick): no -ffast-math"
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed by value between always-inline helpers: no ABI involved
#endif
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TPM_FAST_CRF_NO_AVX2)
#define TPM_FAST_CRF_AVX2 1
#endif

// Every helper is always inlined, so that it is compiled for the instruction set of the kernel that calls it.
#define TPM_INLINE inline __attribute__((always_inline))

namespace tpm_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;

template <int W>
struct Simd {  // W fp32 / int32 lanes
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

template <class V, class S>
TPM_INLINE V splat(S v) {
  return V{} + v;
}
template <class V>
TPM_INLINE V load(const void* p) {  // unaligned
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
TPM_INLINE void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp(x) for x <= 0 (here: scores minus their max), Cephes expf: x = k ln 2 + r with k = round(x / ln 2)
// (by the 1.5 * 2^23 rounding trick, which also leaves k in the low mantissa bits), exp(r) by a degree-5
// polynomial, times 2^k built in the exponent bits. Within 1 ulp on [-87, 0]; x < -87 (including -inf) gives 0
// (terms below ~FLT_MIN are dropped), NaN gives NaN.
template <class F>
TPM_INLINE F exp_v(const F& x) {
  typedef uint32_t U __attribute__((vector_size(sizeof(F))));
  const F lo = splat<F>(-87.0f);
  const F xc = x < lo ? lo : x;                          // NaN stays NaN
  const F zm = xc * 1.44269504088896341f + 12582912.0f;  // k + 1.5 * 2^23, k in [-126, 0]
  const F fk = zm - 12582912.0f;
  const F r = (xc - fk * 0.693359375f) + fk * 2.12194440e-4f;  // xc - k ln 2, ln 2 in two parts
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const F res = p * (F)(((U)zm + 127u) << 23);  // 2^k: the magic's own bits shift out of the word
  return x < lo ? splat<F>(0.0f) : res;
}

// log(x), Cephes logf (exponent split, mantissa in [sqrt(1/2), sqrt(2)), degree-9 polynomial): within 1 ulp for
// normal x > 0; 0 gives -inf, +inf gives +inf, NaN gives NaN (here x is a column sum in [1, T], or 0).
template <class F, class I>
TPM_INLINE F log_v(const F& x) {
  const I bits = (I)x;
  I e = ((bits >> 23) & 0xff) - 126;
  F m = (F)((bits & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  const I small = m < 0.707106781186547524f;    // -1 where true
  e = e + small;
  m = (m - 1.0f) + (small ? m : splat<F>(0.0f));
  const F fe = __builtin_convertvector(e, F);
  const F z = m * m;
  F y = splat<F>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z + fe * -2.12194440e-4f - 0.5f * z;
  F res = (m + y) + fe * 0.693359375f;
  res = x == 0.0f ? splat<F>(kNegInf) : res;
  return (x != x) | (x == kInf) ? x : res;
}

// Column max of s[i, jb : jb+W] = a[i] + tr[i, jb : jb+W] over the T real `from` tags, an all -inf column giving 0
// (so that s - max stays -inf there, and its exp 0). a: (T,), tr: (T, TP) row-major. Two chains (even / odd i)
// for a shorter dependency chain.
template <class F>
TPM_INLINE F column_max(const float* a, const float* tr, int64_t T, int64_t TP, int64_t jb) {
  F m0 = splat<F>(a[0]) + load<F>(tr + jb), m1 = m0;
  int64_t i = 1;
  for (; i + 1 < T; i += 2) {
    const F v0 = splat<F>(a[i]) + load<F>(tr + i * TP + jb);
    const F v1 = splat<F>(a[i + 1]) + load<F>(tr + (i + 1) * TP + jb);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
  }
  if (i < T) {
    const F v = splat<F>(a[i]) + load<F>(tr + i * TP + jb);
    m0 = v > m0 ? v : m0;
  }
  const F m = m1 > m0 ? m1 : m0;
  return m == kNegInf ? splat<F>(0.0f) : m;
}

// Sum over i of exp(a[i] + tr[i, jb : jb+W] - m), in two chains (even / odd i); with ex != nullptr the terms are
// stored to ex[i, jb : jb+W] (ex: (T, TP)).
template <class F>
TPM_INLINE F exp_sum(const float* a, const float* tr, int64_t T, int64_t TP, int64_t jb, const F& m, float* ex) {
  F s0 = splat<F>(0.0f), s1 = s0;
  int64_t i = 0;
  for (; i + 1 < T; i += 2) {
    const F e0 = exp_v<F>((splat<F>(a[i]) + load<F>(tr + i * TP + jb)) - m);
    const F e1 = exp_v<F>((splat<F>(a[i + 1]) + load<F>(tr + (i + 1) * TP + jb)) - m);
    if (ex != nullptr) {
      store(ex + i * TP + jb, e0);
      store(ex + (i + 1) * TP + jb, e1);
    }
    s0 += e0;
    s1 += e1;
  }
  if (i < T) {
    const F e0 = exp_v<F>((splat<F>(a[i]) + load<F>(tr + i * TP + jb)) - m);
    if (ex != nullptr) store(ex + i * TP + jb, e0);
    s0 += e0;
  }
  return s0 + s1;
}

// ------------------------------------------------------------------------------------------------ per-sequence kernels
// Float-only, W-lane; the tensors' dtypes and strides are handled by the callers. L = this row's length, TP = T
// padded to a multiple of W.

constexpr float kTiny = 5.42101086e-20f;  // 2^-64: smallest column sum the factorized form is trusted with

// The parameters in fp32, the tag dimension padded to TP (built once per call by Prepared).
struct Params {
  int64_t T, TP;
  const float* tr;      // shape: (T, TP) transitions, padding -inf
  const float* etr;     // shape: (T, TP) exp(tr - cm), subnormals and padding 0
  const float* cm;      // shape: (TP,) column max of tr; -inf for dead columns (all -inf) and padding
  const int32_t* dead;  // shape: (TP,) -1 on dead columns and padding, else 0
  const float* start;   // shape: (TP,) padding -inf
  const float* end;     // shape: (TP,) padding -inf
};

// One W-column block of a step in factorized form: with p[i] = exp(a[i] - max a), the terms are
// exp(a[i] + tr[i, j] - max a - cm[j]) = p[i] * etr[i, j] (stored to ex[i, jb : jb+W] unless ex is null), s their
// column sums. True when every live column's sum is >= kTiny (then no term that matters underflowed: the result is
// as exact as the max-subtracted form); false (NaN, or a column whose real max term lies far below max a + cm[j])
// sends the block to the max-subtracted form.
template <class F, class I>
TPM_INLINE bool factorized_block(const Params& P, const float* p, int64_t jb, float* ex, F& s) {
  const int64_t T = P.T, TP = P.TP;
  F s0 = splat<F>(0.0f), s1 = s0;
  int64_t i = 0;
  for (; i + 1 < T; i += 2) {
    const F x0 = splat<F>(p[i]) * load<F>(P.etr + i * TP + jb);
    const F x1 = splat<F>(p[i + 1]) * load<F>(P.etr + (i + 1) * TP + jb);
    if (ex != nullptr) {
      store(ex + i * TP + jb, x0);
      store(ex + (i + 1) * TP + jb, x1);
    }
    s0 += x0;
    s1 += x1;
  }
  if (i < T) {
    const F x0 = splat<F>(p[i]) * load<F>(P.etr + i * TP + jb);
    if (ex != nullptr) store(ex + i * TP + jb, x0);
    s0 += x0;
  }
  s = s0 + s1;
  const I ok = (s >= kTiny) | load<I>(P.dead + jb);
  bool all = true;
  for (int k = 0; k < static_cast<int>(sizeof(F) / sizeof(float)); ++k) all &= ok[k] != 0;
  return all;
}

// p = exp(a - max a) over the TP lanes of a (padding -inf -> 0); returns max a over the T real tags, or -inf when
// that is not finite (then no factorized block is tried).
template <class F>
TPM_INLINE float shifted_exp(const float* a, int64_t T, int64_t TP, float* p) {
#ifdef TPM_FAST_CRF_MAX_SUBTRACTED_ONLY  // testing: every block takes the max-subtracted form
  return kNegInf;
#endif
  float amax = kNegInf;
  for (int64_t i = 0; i < T; ++i) amax = a[i] > amax ? a[i] : amax;
  if (!(amax > kNegInf && amax < kInf)) return kNegInf;
  for (int64_t ib = 0; ib < TP; ib += static_cast<int64_t>(sizeof(F) / sizeof(float)))
    store(p + ib, exp_v<F>(load<F>(a + ib) - amax));  // NaN entries give NaN, caught by factorized_block
  return amax;
}

// Forward alphas of one row. e: (L, TP) emissions (padding lanes 0); al: (L, T) out; ws: (3 TP,) scratch.
template <int W>
TPM_INLINE void forward_row(const Params& P, const float* e, int64_t L, float* al, float* ws) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  const int64_t T = P.T, TP = P.TP;
  float* cur = ws;          // shape: (TP,) alpha_{t-1}, padding -inf
  float* nxt = ws + TP;     // shape: (TP,) alpha_t
  float* p = ws + 2 * TP;   // shape: (TP,) exp(alpha_{t-1} - max)
  for (int64_t j = 0; j < TP; ++j) cur[j] = P.start[j] + e[j];
  std::memcpy(al, cur, T * sizeof(float));
  for (int64_t t = 1; t < L; ++t) {
    const float amax = shifted_exp<F>(cur, T, TP, p);
    const bool try_fast = amax > kNegInf;
    for (int64_t jb = 0; jb < TP; jb += W) {
      F s, res;
      if (try_fast && factorized_block<F, I>(P, p, jb, nullptr, s)) {
        res = (splat<F>(amax) + load<F>(P.cm + jb)) + log_v<F, I>(s);  // dead columns: -inf
      } else {
        const F m = column_max<F>(cur, P.tr, T, TP, jb);
        res = m + log_v<F, I>(exp_sum<F>(cur, P.tr, T, TP, jb, m, nullptr));  // sum 0 (all -inf column) -> -inf
      }
      store(nxt + jb, res + load<F>(e + t * TP + jb));
    }
    std::swap(cur, nxt);
    std::memcpy(al + t * T, cur, T * sizeof(float));
  }
}

// Backward of one row. al: (L, T) saved alphas; tags: (L,) clamped gold tags or nullptr; g: incoming grad;
// gd: (L, T) out, g * d_t; par: (2T + T*T,) out, per-sequence parameter partials; ws: (5 TP + 2 T TP,) scratch.
template <int W>
TPM_INLINE void backward_row(const Params& P, const float* al, int64_t L, const int64_t* tags, float g, float log_z,
                             float* gd, float* par, float* ws) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  const int64_t T = P.T, TP = P.TP;
  float* prev = ws;            // shape: (TP,) alpha_{t-1}, padding -inf
  float* p = ws + TP;          // shape: (TP,) exp(alpha_{t-1} - max)
  float* gamma = ws + 2 * TP;  // shape: (TP,) gamma_t, padding 0
  float* gnew = ws + 3 * TP;   // shape: (TP,) gamma_{t-1}, padding 0
  float* w = ws + 4 * TP;      // shape: (TP,) gamma_t / column sums
  float* ex = ws + 5 * TP;     // shape: (T, TP) unnormalized P_t
  float* gtr = ex + T * TP;    // shape: (T, TP) sum_t of -xi_t (with tags) or xi_t
  const int64_t last = L - 1;
  const float* a_last = al + last * T;
  std::fill(prev, prev + TP, kNegInf);
  std::fill(gamma, gamma + TP, 0.0f);
  std::fill(gnew, gnew + TP, 0.0f);
  for (int64_t j = 0; j < T; ++j) gamma[j] = std::exp(a_last[j] + P.end[j] - log_z);
  int64_t cur = tags != nullptr ? tags[last] : 0;
  float* d = gd + last * T;  // shape: (T,) g * d_last
  for (int64_t j = 0; j < T; ++j) d[j] = g * (tags != nullptr ? (j == cur ? 1.0f : 0.0f) - gamma[j] : gamma[j]);
  std::memcpy(par + T, d, T * sizeof(float));  // end
  std::fill(gtr, gtr + T * TP, 0.0f);
  const F sign = splat<F>(tags != nullptr ? -1.0f : 1.0f);
  for (int64_t t = last; t > 0; --t) {  // pair (t-1, t)
    std::memcpy(prev, al + (t - 1) * T, T * sizeof(float));
    const float amax = shifted_exp<F>(prev, T, TP, p);
    const bool try_fast = amax > kNegInf;
    for (int64_t jb = 0; jb < TP; jb += W) {
      F s;  // column sums of the terms stored to ex
      if (!(try_fast && factorized_block<F, I>(P, p, jb, ex, s))) {
        const F m = column_max<F>(prev, P.tr, T, TP, jb);
        s = exp_sum<F>(prev, P.tr, T, TP, jb, m, ex);
      }
      // a column sum is 0 only for unreachable / padded tags, whose gamma is 0
      store(w + jb, load<F>(gamma + jb) / (s == 0.0f ? splat<F>(1.0f) : s));
    }
    for (int64_t i = 0; i < T; ++i) {  // xi[i, j] = ex[i, j] * w[j]; gamma_{t-1}[i] = sum_j xi[i, j]
      F acc = splat<F>(0.0f);
      for (int64_t jb = 0; jb < TP; jb += W) {
        const F xi = load<F>(ex + i * TP + jb) * load<F>(w + jb);
        acc += xi;
        store(gtr + i * TP + jb, load<F>(gtr + i * TP + jb) + sign * xi);
      }
      float sum = 0.0f;
      for (int k = 0; k < W; ++k) sum += acc[k];
      gnew[i] = sum;
    }
    std::swap(gamma, gnew);
    d = gd + (t - 1) * T;
    if (tags != nullptr) {
      const int64_t prev_tag = tags[t - 1];
      gtr[prev_tag * TP + cur] += 1.0f;
      for (int64_t j = 0; j < T; ++j) d[j] = g * ((j == prev_tag ? 1.0f : 0.0f) - gamma[j]);
      cur = prev_tag;
    } else {
      for (int64_t j = 0; j < T; ++j) d[j] = g * gamma[j];
    }
  }
  std::memcpy(par, d, T * sizeof(float));  // start: g * d_0
  float* ptr = par + 2 * T;                // transitions, row-major
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) ptr[i * T + j] = g * gtr[i * TP + j];
}

// Viterbi of one row. e: (L, TP) emissions (padding lanes 0); out: (L,) best tags; bp: (L, TP) back-pointer
// scratch; ws: (2 TP,) scratch.
template <int W>
TPM_INLINE void viterbi_row(const Params& P, const float* e, int64_t L, int64_t* out, int32_t* bp, float* ws) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  const int64_t T = P.T, TP = P.TP;
  const float *tr = P.tr, *start = P.start, *end = P.end;
  float* score = ws;     // shape: (TP,) best score ending in each tag, padding -inf
  float* nxt = ws + TP;  // shape: (TP,)
  for (int64_t j = 0; j < TP; ++j) score[j] = start[j] + e[j];  // padded: -inf
  for (int64_t t = 1; t < L; ++t) {
    for (int64_t jb = 0; jb < TP; jb += W) {
      const F ej = load<F>(e + t * TP + jb);
      F m = (splat<F>(score[0]) + load<F>(tr + jb)) + ej;
      I idx = splat<I>(0);
      for (int64_t i = 1; i < T; ++i) {
        const F v = (splat<F>(score[i]) + load<F>(tr + i * TP + jb)) + ej;
        const I take = (v > m) | ((v != v) & (m == m));  // first max; the first NaN wins (torch.max)
        m = take ? v : m;
        idx = take ? splat<I>(static_cast<int32_t>(i)) : idx;
      }
      store(nxt + jb, m);
      store(bp + t * TP + jb, idx);
    }
    std::swap(score, nxt);
  }
  int64_t cur = 0;
  float m = score[0] + end[0];
  for (int64_t j = 1; j < T; ++j) {
    const float v = score[j] + end[j];
    if (v > m || (v != v && m == m)) {
      m = v;
      cur = j;
    }
  }
  out[L - 1] = cur;
  for (int64_t t = L - 1; t > 0; --t) {
    cur = std::min<int64_t>(std::max<int32_t>(bp[t * TP + cur], 0), T - 1);  // clamped: memory safety under NaN
    out[t - 1] = cur;
  }
}

// The instantiations: W = 4 for any build; W = 8 compiled for AVX2 + FMA, picked at run time.

void forward_row4(const Params& P, const float* e, int64_t L, float* al, float* ws) {
  forward_row<4>(P, e, L, al, ws);
}
void backward_row4(const Params& P, const float* al, int64_t L, const int64_t* tags, float g, float log_z, float* gd,
                   float* par, float* ws) {
  backward_row<4>(P, al, L, tags, g, log_z, gd, par, ws);
}
void viterbi_row4(const Params& P, const float* e, int64_t L, int64_t* out, int32_t* bp, float* ws) {
  viterbi_row<4>(P, e, L, out, bp, ws);
}

#ifdef TPM_FAST_CRF_AVX2
__attribute__((target("avx2,fma"))) void forward_row8(const Params& P, const float* e, int64_t L, float* al,
                                                      float* ws) {
  forward_row<8>(P, e, L, al, ws);
}
__attribute__((target("avx2,fma"))) void backward_row8(const Params& P, const float* al, int64_t L,
                                                       const int64_t* tags, float g, float log_z, float* gd,
                                                       float* par, float* ws) {
  backward_row<8>(P, al, L, tags, g, log_z, gd, par, ws);
}
__attribute__((target("avx2,fma"))) void viterbi_row8(const Params& P, const float* e, int64_t L, int64_t* out,
                                                      int32_t* bp, float* ws) {
  viterbi_row<8>(P, e, L, out, bp, ws);
}
#endif

struct Kernels {
  int64_t lanes;
  decltype(&forward_row4) forward;
  decltype(&backward_row4) backward;
  decltype(&viterbi_row4) viterbi;
};

const Kernels& kernels() {
  static const Kernels k = [] {
#ifdef TPM_FAST_CRF_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Kernels{8, forward_row8, backward_row8, viterbi_row8};
    }
#endif
    return Kernels{4, forward_row4, backward_row4, viterbi_row4};
  }();
  return k;
}

// ------------------------------------------------------------------------------------------------ tensor plumbing

inline int64_t round_up(int64_t t, int64_t w) { return (t + w - 1) / w * w; }

// Row length: number of nonzero entries of mask row b, clamped to [1, n].
inline int64_t row_length(const uint8_t* mask, int64_t smb, int64_t smn, int64_t b, int64_t n) {
  const uint8_t* row = mask + b * smb;
  int64_t count = 0;
  for (int64_t t = 0; t < n; ++t) count += row[t * smn] != 0;
  return std::min(std::max<int64_t>(count, 1), n);
}

inline int64_t clamp_tag(int64_t tag, int64_t T) { return std::min(std::max<int64_t>(tag, 0), T - 1); }

// The parameters as fp32 with the tag dimension padded to TP (see Params); start may be undefined (backward).
struct Prepared {
  int64_t T, TP;
  std::vector<float> tr, etr, cm, start, end;
  std::vector<int32_t> dead;

  Prepared(const at::Tensor& start_t, const at::Tensor& end_t, const at::Tensor& trans_t, int64_t T_, int64_t TP_)
      : T(T_), TP(TP_), tr(T_ * TP_, kNegInf), etr(T_ * TP_, 0.0f), cm(TP_, kNegInf), start(TP_, kNegInf),
        end(TP_, kNegInf), dead(TP_, -1) {
    const at::Tensor trf = trans_t.to(at::kFloat).contiguous();  // shape: (T, T)
    const float* src = trf.data_ptr<float>();
    for (int64_t i = 0; i < T; ++i) std::copy(src + i * T, src + i * T + T, tr.begin() + i * TP);
    for (int64_t j = 0; j < T; ++j) {
      for (int64_t i = 0; i < T; ++i) cm[j] = std::max(cm[j], tr[i * TP + j]);
      dead[j] = cm[j] == kNegInf ? -1 : 0;
      if (dead[j]) continue;
      for (int64_t i = 0; i < T; ++i) {  // subnormals flushed: no slow subnormal arithmetic in the kernels
        const float x = std::exp(tr[i * TP + j] - cm[j]);
        etr[i * TP + j] = x < std::numeric_limits<float>::min() ? 0.0f : x;
      }
    }
    copy_vector(start_t, start);
    copy_vector(end_t, end);
  }

  Params view() const { return Params{T, TP, tr.data(), etr.data(), cm.data(), dead.data(), start.data(), end.data()}; }

 private:
  void copy_vector(const at::Tensor& v, std::vector<float>& dst) const {  // (T,) any float dtype / strides
    if (!v.defined()) return;
    const at::Tensor f = v.to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + T, dst.begin());
  }
};

// logsumexp_j(a[j] + e[j]) over j < T, max-subtracted; all -inf gives -inf. The backward recomputes log Z with it.
float log_z_of(const float* a, const float* e, int64_t T) {
  float m = kNegInf;
  for (int64_t j = 0; j < T; ++j) m = std::max(m, a[j] + e[j]);
  if (m == kNegInf) m = 0.0f;
  float s = 0.0f;
  for (int64_t j = 0; j < T; ++j) s += std::exp(a[j] + e[j] - m);
  return m + std::log(s);
}

// Emissions of one row, positions 0 .. L-1, as (L, TP) fp32 (the padding lanes of dst are left as they are: 0).
template <typename scalar_t>
void load_emissions(const scalar_t* row, int64_t sen, int64_t set, int64_t L, int64_t T, int64_t TP, float* dst) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < T; ++j) dst[t * TP + j] = static_cast<float>(row[t * sen + j * set]);
}

struct Strides2 {
  int64_t b, n;
};

template <typename scalar_t>
void forward_impl(const at::Tensor& emissions, const std::optional<at::Tensor>& tags, const at::Tensor& mask,
                  const at::Tensor& start_t, const at::Tensor& end_t, const at::Tensor& trans_t, at::Tensor& out,
                  at::Tensor& alpha) {
  const Kernels& k = kernels();
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2), TP = round_up(T, k.lanes);
  const scalar_t* em = emissions.data_ptr<scalar_t>();  // shape: (B, n, T), any strides
  const int64_t seb = emissions.stride(0), sen = emissions.stride(1), set = emissions.stride(2);
  const uint8_t* mk = static_cast<const uint8_t*>(mask.data_ptr());  // shape: (B, n)
  const Strides2 sm{mask.stride(0), mask.stride(1)};
  const int64_t* tg = tags ? tags->data_ptr<int64_t>() : nullptr;  // shape: (B, n)
  const Strides2 st = tags ? Strides2{tags->stride(0), tags->stride(1)} : Strides2{0, 0};
  const Prepared prep(start_t, end_t, trans_t, T, TP);
  const Params P = prep.view();
  float* out_p = out.data_ptr<float>();   // shape: (B,)
  float* al_p = alpha.data_ptr<float>();  // shape: (B, n, T) contiguous

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> e(n * TP, 0.0f), ws(3 * TP);  // shape: (n, TP) one row's emissions; kernel scratch
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = row_length(mk, sm.b, sm.n, b, n);
      const scalar_t* em_row = em + b * seb;
      float* al = al_p + b * n * T;
      load_emissions(em_row, sen, set, L, T, TP, e.data());
      k.forward(P, e.data(), L, al, ws.data());
      std::fill(al + L * T, al + n * T, 0.0f);  // padding rows
      const float log_z = log_z_of(al + (L - 1) * T, P.end, T);
      if (tg == nullptr) {
        out_p[b] = log_z;
        continue;
      }
      // gold score: start[y_0] + sum_t em[t, y_t] + sum_{t>=1} trans[y_{t-1}, y_t] + end[y_last]
      const int64_t* tag_row = tg + b * st.b;
      int64_t prev = clamp_tag(tag_row[0], T);
      float gold = e[prev];
      for (int64_t t = 1; t < L; ++t) {
        const int64_t cur = clamp_tag(tag_row[t * st.n], T);
        gold += e[t * TP + cur] + P.tr[prev * TP + cur];
        prev = cur;
      }
      gold += P.start[clamp_tag(tag_row[0], T)] + P.end[prev];
      out_p[b] = gold - log_z;
    }
  });
}

template <typename out_t>
void backward_impl(const at::Tensor& grad_f, const std::optional<at::Tensor>& tags, const at::Tensor& mask,
                   const at::Tensor& end_t, const at::Tensor& trans_t, const at::Tensor& alpha, at::Tensor& g_em,
                   at::Tensor& g_par) {
  const Kernels& k = kernels();
  const int64_t B = alpha.size(0), n = alpha.size(1), T = alpha.size(2), TP = round_up(T, k.lanes);
  const float* gp = grad_f.data_ptr<float>();  // shape: (B,), element stride sg (may be 0)
  const int64_t sg = grad_f.stride(0);
  const uint8_t* mk = static_cast<const uint8_t*>(mask.data_ptr());  // shape: (B, n)
  const Strides2 sm{mask.stride(0), mask.stride(1)};
  const int64_t* tg = tags ? tags->data_ptr<int64_t>() : nullptr;  // shape: (B, n)
  const Strides2 st = tags ? Strides2{tags->stride(0), tags->stride(1)} : Strides2{0, 0};
  const Prepared prep(at::Tensor(), end_t, trans_t, T, TP);
  const Params P = prep.view();
  const float* al_p = alpha.data_ptr<float>();            // shape: (B, n, T) contiguous
  out_t* gem_p = g_em.data_ptr<out_t>();                  // shape: (B, n, T) contiguous
  float* par_p = g_par.data_ptr<float>();                 // shape: (B, 2T + T*T)
  constexpr bool kDirect = std::is_same_v<out_t, float>;  // fp32 grads are written in place

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> ws(5 * TP + 2 * T * TP);            // kernel scratch
    std::vector<float> gd(kDirect ? 0 : n * T);            // shape: (n, T) g * d_t before the cast
    std::vector<int64_t> tag_buf(tg != nullptr ? n : 0);  // shape: (n,) clamped tags of one row
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = row_length(mk, sm.b, sm.n, b, n);
      const float* al = al_p + b * n * T;
      out_t* gem = gem_p + b * n * T;
      if (tg != nullptr) {
        for (int64_t t = 0; t < L; ++t) tag_buf[t] = clamp_tag(tg[b * st.b + t * st.n], T);
      }
      float* gd_row = nullptr;
      if constexpr (kDirect) {
        gd_row = gem;
      } else {
        gd_row = gd.data();
      }
      const float log_z = log_z_of(al + (L - 1) * T, P.end, T);  // as the forward computed it
      k.backward(P, al, L, tg != nullptr ? tag_buf.data() : nullptr, gp[b * sg], log_z, gd_row,
                 par_p + b * (2 * T + T * T), ws.data());
      if constexpr (!kDirect) {
        for (int64_t i = 0; i < L * T; ++i) gem[i] = static_cast<out_t>(gd_row[i]);
      }
      std::fill(gem + L * T, gem + n * T, static_cast<out_t>(0.0f));  // padding: zero gradient
    }
  });
}

template <typename scalar_t>
void viterbi_impl(const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& start_t,
                  const at::Tensor& end_t, const at::Tensor& trans_t, at::Tensor& best, at::Tensor& lengths) {
  const Kernels& k = kernels();
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2), TP = round_up(T, k.lanes);
  const scalar_t* em = emissions.data_ptr<scalar_t>();  // shape: (B, n, T), any strides
  const int64_t seb = emissions.stride(0), sen = emissions.stride(1), set = emissions.stride(2);
  const uint8_t* mk = static_cast<const uint8_t*>(mask.data_ptr());  // shape: (B, n)
  const Strides2 sm{mask.stride(0), mask.stride(1)};
  const Prepared prep(start_t, end_t, trans_t, T, TP);
  const Params P = prep.view();
  int64_t* out_p = best.data_ptr<int64_t>();     // shape: (B, n)
  int64_t* len_p = lengths.data_ptr<int64_t>();  // shape: (B,)

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> e(n * TP, 0.0f), ws(2 * TP);  // shape: (n, TP) one row's emissions; kernel scratch
    std::vector<int32_t> bp(n * TP);                 // shape: (n, TP) back-pointers, rows 1 .. L-1
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = row_length(mk, sm.b, sm.n, b, n);
      len_p[b] = L;
      int64_t* out = out_p + b * n;
      load_emissions(em + b * seb, sen, set, L, T, TP, e.data());
      k.viterbi(P, e.data(), L, out, bp.data(), ws.data());
      std::fill(out + L, out + n, int64_t{0});
    }
  });
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "crf_*_cpu: ", name, " must be a CPU tensor, got ", x.device());
}

void check_common(const at::Tensor& mask, const at::Tensor& end, const at::Tensor& transitions,
                  const std::optional<at::Tensor>& tags, int64_t B, int64_t n, int64_t T) {
  check_cpu(mask, "mask");
  check_cpu(end, "end");
  check_cpu(transitions, "transitions");
  TORCH_CHECK(n >= 1 && T >= 1, "crf_*_cpu: need n >= 1 and T >= 1, got n=", n, ", T=", T);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == n, "crf_*_cpu: mask must be (B, n)");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "crf_*_cpu: mask must be bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK(end.dim() == 1 && end.size(0) == T && at::isFloatingType(end.scalar_type()),
              "crf_*_cpu: end must be a float (T,) tensor");
  TORCH_CHECK(transitions.dim() == 2 && transitions.size(0) == T && transitions.size(1) == T &&
                  at::isFloatingType(transitions.scalar_type()),
              "crf_*_cpu: transitions must be a float (T, T) tensor");
  if (tags) {
    check_cpu(*tags, "tags");
    TORCH_CHECK(tags->dim() == 2 && tags->size(0) == B && tags->size(1) == n && tags->scalar_type() == at::kLong,
                "crf_*_cpu: tags must be an int64 (B, n) tensor");
  }
}

void check_emissions_and_start(const at::Tensor& emissions, const at::Tensor& start) {
  check_cpu(emissions, "emissions");
  check_cpu(start, "start");
  TORCH_CHECK(emissions.dim() == 3 && at::isFloatingType(emissions.scalar_type()),
              "crf_*_cpu: emissions must be a 3-d float tensor (B, n, T)");
  TORCH_CHECK(start.dim() == 1 && start.size(0) == emissions.size(2) && at::isFloatingType(start.scalar_type()),
              "crf_*_cpu: start must be a float (T,) tensor");
}

}  // namespace

// ------------------------------------------------------------------------------------------------ entry points

std::tuple<at::Tensor, at::Tensor> crf_forward_cpu(const at::Tensor& emissions, const std::optional<at::Tensor>& tags,
                                                   const at::Tensor& mask, const at::Tensor& start,
                                                   const at::Tensor& end, const at::Tensor& transitions) {
  check_emissions_and_start(emissions, start);
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2);
  const auto f32 = emissions.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B}, f32);          // shape: (B,)
  at::Tensor alpha = at::empty({B, n, T}, f32);  // shape: (B, n, T)
  if (B == 0) return {out, alpha};
  check_common(mask, end, transitions, tags, B, n, T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emissions.scalar_type(), "crf_forward_cpu", [&] {
    forward_impl<scalar_t>(emissions, tags, mask, start, end, transitions, out, alpha);
  });
  return {out, alpha};
}

std::tuple<at::Tensor, at::Tensor> crf_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& tags,
                                                    const at::Tensor& mask, const at::Tensor& end,
                                                    const at::Tensor& transitions, const at::Tensor& alpha,
                                                    at::ScalarType grad_dtype) {
  check_cpu(grad, "grad");
  check_cpu(alpha, "alpha");
  TORCH_CHECK(alpha.dim() == 3 && alpha.scalar_type() == at::kFloat, "crf_backward_cpu: alpha must be fp32 (B, n, T)");
  TORCH_CHECK(at::isFloatingType(grad_dtype), "crf_backward_cpu: grad_dtype must be a float dtype, got ", grad_dtype);
  const int64_t B = alpha.size(0), n = alpha.size(1), T = alpha.size(2);
  at::Tensor g_em = at::empty({B, n, T}, alpha.options().dtype(grad_dtype));            // shape: (B, n, T)
  at::Tensor g_par = at::empty({B, 2 * T + T * T}, alpha.options().dtype(at::kFloat));  // shape: (B, 2T + T*T)
  if (B == 0) return {g_em, g_par};
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B && at::isFloatingType(grad.scalar_type()),
              "crf_backward_cpu: grad must be a float (B,) tensor");
  check_common(mask, end, transitions, tags, B, n, T);
  const at::Tensor grad_f = grad.to(at::kFloat);  // shape: (B,), keeps its stride (an expanded scalar: 0)
  const at::Tensor alpha_c = alpha.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_dtype, "crf_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_f, tags, mask, end, transitions, alpha_c, g_em, g_par);
  });
  return {g_em, g_par};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cpu(const at::Tensor& emissions, const at::Tensor& mask,
                                                   const at::Tensor& start, const at::Tensor& end,
                                                   const at::Tensor& transitions) {
  check_emissions_and_start(emissions, start);
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2);
  const auto i64 = emissions.options().dtype(at::kLong);
  at::Tensor best = at::empty({B, n}, i64);  // shape: (B, n)
  at::Tensor lengths = at::empty({B}, i64);  // shape: (B,)
  if (B == 0) return {best, lengths};
  check_common(mask, end, transitions, std::nullopt, B, n, T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emissions.scalar_type(), "crf_viterbi_cpu", [&] {
    viterbi_impl<scalar_t>(emissions, mask, start, end, transitions, best, lengths);
  });
  return {best, lengths};
}

}  // namespace tpm_fast
