// SIMD helpers of the CPU CRF kernels (csrc/crf_cpu.cpp): GCC / Clang generic vectors of W fp32 lanes, Cephes exp
// and log, the column max and exp-sum of one W-column block of a time step. Every helper is always inlined, so it
// is compiled for the instruction set of the kernel that calls it (W = 4 baseline, W = 8 AVX2 + FMA).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

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
}  // namespace
}  // namespace tpm_fast
