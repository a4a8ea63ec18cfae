// Per-sequence CRF kernels on the CPU (csrc/crf_cpu.cpp describes the algorithm): forward, backward by marginals and
// Viterbi over one sequence, float-only and W-lane, instantiated for W = 4 and (AVX2 + FMA) W = 8, picked at run
// time by kernels().
#pragma once

#include <algorithm>
#include <cmath>

#include "crf_cpu_simd.h"

namespace tpm_fast {
namespace {

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

// Shifts a (TP,) by the max of its T real entries when that is finite (else leaves it as it is); returns the shift.
TPM_INLINE float shift_to_max(float* a, int64_t T, int64_t TP) {
  float amax = kNegInf;
  for (int64_t j = 0; j < T; ++j) amax = a[j] > amax ? a[j] : amax;
  if (!(amax > kNegInf && amax < kInf)) return 0.0f;
  for (int64_t j = 0; j < TP; ++j) a[j] -= amax;
  return amax;
}

// Forward alphas of one row, each step shifted so that its max is 0 (a step's softmax and the backward's marginals
// do not depend on the shift, and small numbers keep their fp32 precision where unshifted alphas grow with t).
// e: (L, TP) emissions (padding lanes 0); al: (L, T) out, the shifted alphas; ws: (3 TP,) scratch. Returns the sum
// of the shifts (log Z = that + logsumexp(al[L-1] + end)).
template <int W>
TPM_INLINE double forward_row(const Params& P, const float* e, int64_t L, float* al, float* ws) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  const int64_t T = P.T, TP = P.TP;
  float* cur = ws;          // shape: (TP,) alpha_{t-1}, padding -inf
  float* nxt = ws + TP;     // shape: (TP,) alpha_t
  float* p = ws + 2 * TP;   // shape: (TP,) exp(alpha_{t-1} - max)
  for (int64_t j = 0; j < TP; ++j) cur[j] = P.start[j] + e[j];
  double shift = shift_to_max(cur, T, TP);
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
    shift += shift_to_max(cur, T, TP);
    std::memcpy(al + t * T, cur, T * sizeof(float));
  }
  return shift;
}

// d = g * (onehot(y) - gamma) over T tags, its gold entry as g * (the sum of the other marginals): equal to
// g * (1 - gamma[y]) since the marginals sum to 1, without that difference's cancellation when the model is sure of
// y (gamma[y] ~ 1 - 1e-4: fp32 rounding of gamma[y] would be ~1e-3 of the gradient, here it is ~1e-7 of it).
TPM_INLINE void gold_minus_marginals(const float* gamma, int64_t T, int64_t y, float g, float* d) {
  float rest = 0.0f;
  for (int64_t j = 0; j < T; ++j) {
    d[j] = -g * gamma[j];
    rest += j == y ? 0.0f : gamma[j];
  }
  d[y] = g * rest;
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
  if (tags != nullptr) {
    gold_minus_marginals(gamma, T, cur, g, d);
  } else {
    for (int64_t j = 0; j < T; ++j) d[j] = g * gamma[j];
  }
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
    const int64_t prev_tag = tags != nullptr ? tags[t - 1] : 0;
    const float gold_before = gtr[prev_tag * TP + cur];  // the gold pair's partial before this step
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
    if (tags != nullptr) {  // the gold pair gets 1 - xi[y_{t-1}, y_t] as the sum of the other pairs' xi (see above)
      float rest = 0.0f;
      for (int64_t i = 0; i < T; ++i) rest += i == prev_tag ? 0.0f : gamma[i];
      for (int64_t j = 0; j < T; ++j) rest += j == cur ? 0.0f : ex[prev_tag * TP + j] * w[j];
      gtr[prev_tag * TP + cur] = gold_before + rest;
      gold_minus_marginals(gamma, T, prev_tag, g, d);
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

double forward_row4(const Params& P, const float* e, int64_t L, float* al, float* ws) {
  return forward_row<4>(P, e, L, al, ws);
}
void backward_row4(const Params& P, const float* al, int64_t L, const int64_t* tags, float g, float log_z, float* gd,
                   float* par, float* ws) {
  backward_row<4>(P, al, L, tags, g, log_z, gd, par, ws);
}
void viterbi_row4(const Params& P, const float* e, int64_t L, int64_t* out, int32_t* bp, float* ws) {
  viterbi_row<4>(P, e, L, out, bp, ws);
}

#ifdef TPM_FAST_CRF_AVX2
__attribute__((target("avx2,fma"))) double forward_row8(const Params& P, const float* e, int64_t L, float* al,
                                                        float* ws) {
  return forward_row<8>(P, e, L, al, ws);
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
}  // namespace
}  // namespace tpm_fast
