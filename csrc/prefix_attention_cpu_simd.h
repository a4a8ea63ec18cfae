// Vector helpers of the CPU prefix attention for one instruction set: lane ops, exp2 / log2, the small register-
// tiled GEMMs, tile loads and stores (fp32 / bf16 / fp16 rows), and the Philox dropout stream of Triton's tl.rand.
// Included inside namespace tpm_fast::pa_cpu::isa_<name> (csrc/prefix_attention_cpu.cpp, once per instruction set),
// which defines kW (floats per vector), kMR and kNV (the register tile: kMR rows x kNV vectors of accumulators); so
// no include guard. Every buffer row below is padded to a multiple of kW.

typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef float vf_u __attribute__((vector_size(kW * 4), aligned(4), may_alias));  // unaligned access

static inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
static inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
// x - 0 is x in IEEE arithmetic, so this folds to a broadcast (from memory: vbroadcastss); vf{} + x may not fold
// (-0 + 0 = +0) and costs an add and a register broadcast per call, in the GEMM's innermost loop.
static inline vf splat(float x) { return x - vf{}; }

template <typename To, typename From>
static inline To bit_cast_vec(From x) {  // without type punning (the memcpy folds away)
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

// Lane l of x swapped with lane l ^ step (a constant mask after inlining: one permute).
static inline vf swap_lanes(vf x, int step) {
#if defined(__clang__)
  vf out;
  for (int l = 0; l < kW; ++l) out[l] = x[l ^ step];
  return out;
#else
  vi mask;
  for (int l = 0; l < kW; ++l) mask[l] = l ^ step;
  return __builtin_shuffle(x, mask);
#endif
}

// Sum / max of the lanes in every lane (butterfly: log2(kW) permutes, not a kW-long serial chain).
static inline vf allsum(vf x) {
#pragma GCC unroll 8
  for (int step = kW / 2; step >= 1; step /= 2) x += swap_lanes(x, step);
  return x;
}

static inline vf allmax(vf x) {
#pragma GCC unroll 8
  for (int step = kW / 2; step >= 1; step /= 2) {
    const vf y = swap_lanes(x, step);
    x = x > y ? x : y;
  }
  return x;
}

// 2^x (Cephes exp2f: round to nearest, degree-6 polynomial on [-0.5, 0.5], ~2 ulp); exactly 0 below -126 (-inf too).
static inline vf exp2v(vf x) {
  const vi tiny = x < splat(-126.0f);
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  x = x > splat(127.0f) ? splat(127.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: x + magic rounds x to an integer in the low mantissa bits
  const vf t = x + magic;
  const vf f = x - (t - magic);  // shape: in [-0.5, 0.5]
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi bits = bit_cast_vec<vi>(p) + ((bit_cast_vec<vi>(t) - 0x4B400000) << 23);  // p * 2^round(x)
  return bit_cast_vec<vf>(bits & ~tiny);
}

// log2(x) for normal x > 0 (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial, ~2 ulp).
static inline vf log2v(vf x) {
  const vi bits = bit_cast_vec<vi>(x);
  vi e = ((bits >> 23) & 0xff) - 127;
  vf mant = bit_cast_vec<vf>((bits & 0x007fffff) | 0x3f800000);  // shape: in [1, 2)
  const vi big = mant > splat(1.41421356f);
  mant = big ? mant * 0.5f : mant;
  e -= big;  // big is -1 where true
  const vf f = mant - 1.0f, z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const vf ln = f + (p * f * z - 0.5f * z);  // ln(mant)
  return ln * kLog2e + __builtin_convertvector(e, vf);
}

// ------------------------------------------------------------------------------------------------ small GEMMs

// C (R, NV * kW) = alpha * A (R, K) B (K, NV * kW): A[r, k] = A[r * ars + k * aks] (a row-major A or a transposed
// one), B row-major with row stride ldb, C row-major with row stride ldc. Accumulators stay in registers.
template <int R, int NV>
static inline void tile(int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, float* C,
                        int64_t ldc, float alpha) {
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    vf bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = load(B + kk * ldb + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf a = splat(A[r * ars + kk * aks]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kW, acc[r][v] * alpha);
  }
}

// One panel of R rows: full kNV-vector tiles, then the remaining vectors.
template <int R>
static inline void panel(int64_t nvec, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                         int64_t ldb, float* C, int64_t ldc, float alpha) {
  int64_t v0 = 0;
  for (; v0 + kNV <= nvec; v0 += kNV) tile<R, kNV>(K, A, ars, aks, B + v0 * kW, ldb, C + v0 * kW, ldc, alpha);
  const int64_t rest = nvec - v0;
  if constexpr (kNV > 3) {
    if (rest == 3) return tile<R, 3>(K, A, ars, aks, B + v0 * kW, ldb, C + v0 * kW, ldc, alpha);
  }
  if constexpr (kNV > 2) {
    if (rest == 2) return tile<R, 2>(K, A, ars, aks, B + v0 * kW, ldb, C + v0 * kW, ldc, alpha);
  }
  if (rest == 1) tile<R, 1>(K, A, ars, aks, B + v0 * kW, ldb, C + v0 * kW, ldc, alpha);
}

template <int R>
static inline void tail_rows(int64_t rows, int64_t nvec, int64_t K, const float* A, int64_t ars, int64_t aks,
                             const float* B, int64_t ldb, float* C, int64_t ldc, float alpha) {
  if constexpr (R > 0) {
    if (rows == R) return panel<R>(nvec, K, A, ars, aks, B, ldb, C, ldc, alpha);
    tail_rows<R - 1>(rows, nvec, K, A, ars, aks, B, ldb, C, ldc, alpha);
  }
}

// C (M, N) = alpha * A (M, K) B (K, N), N a multiple of kW (A indexed as in tile()).
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                 int64_t ldb, float* C, int64_t ldc, float alpha = 1.0f) {
  const int64_t nvec = N / kW;
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) panel<kMR>(nvec, K, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, alpha);
  tail_rows<kMR - 1>(M - i, nvec, K, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, alpha);
}

// ------------------------------------------------------------------------------------------------ tile movement

// The (rows, cols) matrix src[r * rs + c * cs] as fp32 with row stride `ld` and `width` >= cols readable columns
// (zeros past cols): src itself when it already is (fp32, unit column stride, width == cols), else a copy in buf.
template <typename T>
static inline const float* as_fp32(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t width,
                                   float* buf, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (cs == 1 && width == cols) {
      ld = rs;
      return src;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = src + r * rs;
    float* dst = buf + r * width;
    if (cs == 1) {
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(row[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(row[c * cs]);
    }
    for (int64_t c = cols; c < width; ++c) dst[c] = 0.0f;
  }
  ld = width;
  return buf;
}

// Row j of the joined keys [k_p; visible tokens of k] (or values) of (b, h).
template <typename T>
static inline const T* joined_row(const Strided& prefix, const Strided& tokens, int64_t b, int64_t h, int64_t m,
                                  const int32_t* vis, int64_t j) {
  return j < m ? row_ptr<T>(prefix, b, h, j) : row_ptr<T>(tokens, b, h, vis[j - m]);
}

// Joined rows [0, c) as fp32 rows (cp, dp) of `out`: zeros in columns [d, dp) and rows [c, cp).
template <typename T>
static inline void gather_rows(const Strided& prefix, const Strided& tokens, int64_t b, int64_t h, int64_t m,
                               const int32_t* vis, int64_t c, int64_t cp, int64_t d, int64_t dp, float* out) {
  const int64_t cs = tokens.sc, pcs = prefix.sc;
  for (int64_t j = 0; j < c; ++j) {
    const T* row = joined_row<T>(prefix, tokens, b, h, m, vis, j);
    const int64_t s = j < m ? pcs : cs;
    float* dst = out + j * dp;
    if (s == 1) {
      for (int64_t x = 0; x < d; ++x) dst[x] = static_cast<float>(row[x]);
    } else {
      for (int64_t x = 0; x < d; ++x) dst[x] = static_cast<float>(row[x * s]);
    }
    for (int64_t x = d; x < dp; ++x) dst[x] = 0.0f;
  }
  std::fill(out + c * dp, out + cp * dp, 0.0f);
}

// dst (cols, ldd) = src (rows, cols)^T, rows and cols multiples of kW: kW x kW blocks transposed in registers by
// log2(kW) rounds of "perfect shuffle" interleaves (GCC's __builtin_shuffle; a scalar loop elsewhere).
static void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
#if defined(__clang__)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < cols; ++x) dst[x * ldd + r] = src[r * lds + x];
  }
#else
  vi lo, hi;  // lo(a, b) = a0 b0 a1 b1 ... (first halves interleaved), hi(a, b) the same for the second halves
  for (int t = 0; t < kW / 2; ++t) {
    lo[2 * t] = t;
    lo[2 * t + 1] = kW + t;
    hi[2 * t] = kW / 2 + t;
    hi[2 * t + 1] = kW + kW / 2 + t;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kW) {
    for (int64_t x0 = 0; x0 < cols; x0 += kW) {
      vf a[kW], b[kW];
#pragma GCC unroll 16
      for (int t = 0; t < kW; ++t) a[t] = load(src + (r0 + t) * lds + x0);
#pragma GCC unroll 4
      for (int round = 1; round < kW; round *= 2) {  // after log2(kW) rounds row t of a = column t of the block
#pragma GCC unroll 16
        for (int t = 0; t < kW / 2; ++t) {
          b[2 * t] = __builtin_shuffle(a[t], a[t + kW / 2], lo);
          b[2 * t + 1] = __builtin_shuffle(a[t], a[t + kW / 2], hi);
        }
#pragma GCC unroll 16
        for (int t = 0; t < kW; ++t) a[t] = b[t];
      }
#pragma GCC unroll 16
      for (int t = 0; t < kW; ++t) store(dst + (x0 + t) * ldd + r0, a[t]);
    }
  }
#endif
}

// dst[r * rs + x * cs] = T(src[r * ld + x] * scale) for (rows, d).
template <typename T>
static inline void store_rows(T* dst, int64_t rs, int64_t cs, const float* src, int64_t ld, int64_t rows, int64_t d,
                              float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * ld;
    T* out = dst + r * rs;
    if (cs == 1) {
      for (int64_t x = 0; x < d; ++x) out[x] = static_cast<T>(row[x] * scale);
    } else {
      for (int64_t x = 0; x < d; ++x) out[x * cs] = static_cast<T>(row[x] * scale);
    }
  }
}

template <typename T>
static inline void zero_rows(T* dst, int64_t rs, int64_t cs, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < d; ++x) dst[r * rs + x * cs] = static_cast<T>(0.0f);
  }
}

// ------------------------------------------------------------------------------------------------ dropout

typedef uint32_t vu __attribute__((vector_size(kW * 4)));
typedef uint64_t vu2 __attribute__((vector_size(kW * 4)));  // the same bits as kW / 2 64-bit lanes

// Low and high 32 bits of k * x in every lane (even and odd lanes as 32 x 32 -> 64-bit products: pmuludq).
static inline void mul_wide(vu x, uint32_t k, vu& lo, vu& hi) {
  const vu2 x2 = bit_cast_vec<vu2>(x);
  const vu2 even = (x2 & 0xFFFFFFFFull) * uint64_t{k};  // lanes 0, 2, ... (little-endian low halves)
  const vu2 odd = (x2 >> 32) * uint64_t{k};             // lanes 1, 3, ...
  lo = bit_cast_vec<vu>((even & 0xFFFFFFFFull) | (odd << 32));
  hi = bit_cast_vec<vu>((even >> 32) | (odd & 0xFFFFFFFF00000000ull));
}

// Philox 4x32-10 of triton.language.random per lane: the four words of counter (c0, c1, 0, 0) under key (k0, k1).
static inline void philox4(uint32_t k0, uint32_t k1, vu c0, vu c1, vu words[4]) {
  vu c2 = vu{}, c3 = vu{};
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    vu a_lo, a_hi, b_lo, b_hi;
    mul_wide(c0, 0xD2511F53u, a_lo, a_hi);  // PHILOX_ROUND_A * c0
    mul_wide(c2, 0xCD9E8D57u, b_lo, b_hi);  // PHILOX_ROUND_B * c2
    c0 = b_hi ^ c1 ^ k0;
    c2 = a_hi ^ c3 ^ k1;
    c1 = b_lo;
    c3 = a_lo;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// uint_to_uniform_float of triton.language.random: the word as int32, x < 0 -> -x - 1 (= ~x), times 4.6566127342e-10
// in fp32 (so in [0, 1)).
static inline vf to_uniform(vu word) {
  const vi x = bit_cast_vec<vi>(word);
  return __builtin_convertvector(x < 0 ? ~x : x, vf) * 4.6566127342e-10f;
}

// tl.rand(seed, offset) per lane, offset = (hi << 32) | lo: the first word of Philox on counter (lo, hi, 0, 0).
static inline vf philox_uniform(uint32_t k0, uint32_t k1, vu c0, vu c1) {
  vu words[4];
  philox4(k0, k1, c0, c1, words);
  return to_uniform(words[0]);
}

// Philox counters base + offs per lane as (lo, hi) 32-bit words, the carry of the low word added to the high one.
static inline void counters(uint64_t base, vu offs, vu& lo, vu& hi) {
  lo = static_cast<uint32_t>(base) + offs;
  hi = static_cast<uint32_t>(base >> 32) - bit_cast_vec<vu>(lo < offs);  // a true comparison lane is -1
}

// Dropout factors of one query row over its c joined columns (z and col padded to a multiple of kW):
// z[j] = keep ? kept : 0 with keep = tl.rand(seed, row_offset + col[j]) >= p, col[j] the joined column index.
static inline void dropout_factors(const Problem& P, uint64_t row_offset, const uint32_t* col, int64_t c, float kept,
                                   float* z) {
  for (int64_t j = 0; j < c; j += kW) {
    vu cols;
    std::memcpy(&cols, col + j, sizeof(cols));
    vu lo, hi;
    counters(row_offset, cols, lo, hi);
    const vf u = philox_uniform(P.seed_lo, P.seed_hi, lo, hi);
    store(z + j, u >= P.drop_p ? splat(kept) : splat(0.0f));
  }
}

// Joined column index of every compacted column: j for the prefix, m + token for a visible token (0 in the padding
// [m + nv, cp), whose dropout factors are never used).
static inline void joined_columns(int64_t m, const int32_t* vis, int64_t nv, int64_t cp, uint32_t* col) {
  for (int64_t j = 0; j < m; ++j) col[j] = static_cast<uint32_t>(j);
  for (int64_t t = 0; t < nv; ++t) col[m + t] = static_cast<uint32_t>(m + vis[t]);
  std::fill(col + m + nv, col + cp, 0u);
}
