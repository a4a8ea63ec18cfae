// Fused prefix-K/V attention on the CPU: the C++ twin of the Triton launchers in kernels/prefix_attention.py.
//
// out = softmax(scale * q [k_p; k]^T + mask) [v_p; v] per (b, h): the m prefix slots are always visible, token key j
// is visible iff (no mask or mask[b, j]) and (no lengths or j < lengths[b]); K/V are never concatenated in memory.
// Same contract as the Triton kernels: lse in log2 units (+inf and out 0 for a row with no visible key), dropout
// keep-mask bit-identical to `tl.rand(seed, ((b * H + h) * n + i) * (m + n_k) + j) >= p` over the joined columns
// (prefix first; Philox 4x32-10, see triton/language/random.py), padded keys get exactly 0 gradient.
//
// Work split: at::parallel_for over the B*H (batch, head) pairs. Each pair gathers its visible keys (prefix first,
// then the visible tokens, compacted: keys past the bound or masked out cost nothing) into fp32 tiles, materializes
// the (n, c) score block (c = m + visible tokens; n <= 512 in this project, so it stays in L1/L2) and runs small
// register-blocked GEMMs on it. Everything is fp32 (bf16 / fp16 inputs are converted per tile, outputs rounded once).
//   forward:  S = Q K'^T, P = exp2(S * scale * log2(e) - max) / sum, (dropout), O = P V'
//   backward: P = exp2(S * scale * log2(e) - lse2), dV' = (P * Z)^T dO, dP = dO V'^T, dS = P * (dP * Z - delta)
//             with delta = rowsum(dO * O) and Z the dropout factor, dQ = dS K' * scale, dK' = dS^T Q * scale.
//
// SIMD: the kernels are written with GCC vector extensions of kW floats. This file includes itself once per
// instruction set (AVX-512, AVX2 + FMA, baseline) inside `#pragma GCC target` regions, the scheme of Google
// Highway's foreach_target.h, so one `-O3` build (no -march) runs at full width on any x86-64 CPU; the set is
// picked at first use from at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=avx2|default selects the narrower
// ones). Other compilers / architectures build the baseline body only.
//
// No bindings here: csrc/bindings.cpp registers these functions as torch.ops.tpm_fast_native.prefix_attention_fwd
// / prefix_attention_bwd.

#ifndef TPM_PA_ISA_BODY  // ===================================================== first pass: shared code, dispatch

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if !defined(__GNUC__)
#error "csrc/prefix_attention_cpu.cpp needs GCC / Clang vector extensions"
#endif
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "prefix_attention_cpu.cpp built without -fopenmp: at::parallel_for (inline OpenMP) would run serially"
#endif

#include "tpm_fast.h"  // the declarations; csrc/bindings.cpp registers them as torch.ops.tpm_fast_native.*

namespace tpm_fast::pa_cpu {

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------- problem description

// A (B, H, rows, d) tensor read or written through its element strides.
struct Strided {
  void* data;
  int64_t sb, sh, sr, sc;
};

struct Problem {
  int64_t B, H, n, n_k, m, d;
  float scale;               // score scale (the dq / dk factor)
  float qk_scale;            // scale * log2(e): scores in log2 units, as in the Triton kernels
  bool dropout;              // dropout_p > 0
  float drop_p;              // dropout_p as the Triton kernels see it (fp32)
  float keep_scale;          // 1 / (1 - p), computed in fp32 like the Triton kernels
  uint32_t seed_lo, seed_hi;  // the Philox key
  const int32_t* vis;        // visible token indices of every batch row, concatenated
  const int64_t* vis_off;    // shape: (B + 1,) row b's visible tokens are vis[vis_off[b] : vis_off[b + 1]]
};

struct FwdArgs {
  Problem p;
  at::ScalarType dtype;
  Strided q, k, v, kp, vp, out;
  float* lse;  // shape: (B, H, n) contiguous
};

struct BwdArgs {
  Problem p;
  at::ScalarType dtype;
  Strided dout, q, k, v, kp, vp, out;
  const float* lse;  // shape: (B, H, n) contiguous
  Strided dq, dk, dv, dkp, dvp;
};

using RangeFn = void (*)(const void* args, int64_t begin, int64_t end);

template <typename T>
static inline const T* row_ptr(const Strided& t, int64_t b, int64_t h, int64_t r) {
  return static_cast<const T*>(t.data) + b * t.sb + h * t.sh + r * t.sr;
}

template <typename T>
static inline T* row_ptr_mut(const Strided& t, int64_t b, int64_t h, int64_t r) {
  return static_cast<T*>(t.data) + b * t.sb + h * t.sh + r * t.sr;
}

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace tpm_fast::pa_cpu

// ------------------------------------------------------------------------------- the kernels, once per ISA

#define TPM_PA_ISA_BODY
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define TPM_PA_MULTI_ISA 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors by value inside the AVX-512 region (all inlined there)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace tpm_fast::pa_cpu::isa_avx512 {
constexpr int kW = 16;  // floats per vector
constexpr int kMR = 6;  // rows per register tile
constexpr int kNV = 4;  // vectors per register tile row: 6 x 4 accumulators of the 32 registers
#include "prefix_attention_cpu.cpp"
}  // namespace tpm_fast::pa_cpu::isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace tpm_fast::pa_cpu::isa_avx2 {
constexpr int kW = 8;
constexpr int kMR = 6;
constexpr int kNV = 2;  // 6 x 2 accumulators of the 16 registers
#include "prefix_attention_cpu.cpp"
}  // namespace tpm_fast::pa_cpu::isa_avx2
#pragma GCC pop_options

#pragma GCC diagnostic pop
#endif

namespace tpm_fast::pa_cpu::isa_base {  // SSE2 on x86-64, NEON on aarch64
constexpr int kW = 4;
constexpr int kMR = 4;
constexpr int kNV = 2;
#include "prefix_attention_cpu.cpp"
}  // namespace tpm_fast::pa_cpu::isa_base
#undef TPM_PA_ISA_BODY

// ------------------------------------------------------------------------------------- dispatch and checks

namespace tpm_fast::pa_cpu {

struct Kernels {
  RangeFn fwd, bwd;
  const char* isa;
};

static Kernels pick_kernels() {
#ifdef TPM_PA_MULTI_ISA
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  __builtin_cpu_init();
  if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return {isa_avx512::fwd_range, isa_avx512::bwd_range, "avx512"};
  }
  if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {isa_avx2::fwd_range, isa_avx2::bwd_range, "avx2"};
  }
#endif
  return {isa_base::fwd_range, isa_base::bwd_range, "base"};
}

static const Kernels& kernels() {
  static const Kernels chosen = pick_kernels();
  return chosen;
}

// The instruction set the kernels run with: "avx512", "avx2" or "base" (for tests and benchmarks).
const char* isa_name() { return kernels().isa; }

static Strided strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

static void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p,
                         const at::Tensor& v_p, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& seed,
                         double dropout_p) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k_p.dim() == 4 && v_p.dim() == 4,
              "prefix_attention: expected q (B,H,n,d), k/v (B,H,n_k,d), k_p/v_p (B,H,m,d); got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes(), ", k_p ", k_p.sizes(), ", v_p ", v_p.sizes());
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes() && k_p.sizes() == v_p.sizes() && k.size(0) == B && k.size(1) == H &&
                  k.size(3) == d && k_p.size(0) == B && k_p.size(1) == H && k_p.size(3) == d,
              "prefix_attention: batch/head/head-dim mismatch: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              ", k_p ", k_p.sizes(), ", v_p ", v_p.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "prefix_attention (CPU): inputs must be fp32, bf16 or fp16, got ", dtype);
  for (const at::Tensor* t : {&k, &v, &k_p, &v_p}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prefix_attention (CPU): q, k, v, k_p, v_p must share one dtype, got ",
                dtype, " and ", t->scalar_type());
  }
  for (const at::Tensor* t : {&q, &k, &v, &k_p, &v_p}) {
    TORCH_CHECK(t->device().is_cpu(), "prefix_attention (CPU): inputs must be CPU tensors");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "prefix_attention: dropout_p must be in [0, 1), got ", dropout_p);
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == k.size(2) && mask->device().is_cpu() &&
                    (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte),
                "prefix_attention: key_padding_mask must be a CPU bool tensor of shape (", B, ", ", k.size(2),
                "), got ", mask->scalar_type(), " ", mask->sizes());
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->device().is_cpu() &&
                    at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false),
                "prefix_attention: lengths must be a CPU integer tensor of shape (", B, ",), got ",
                lengths->scalar_type(), " ", lengths->sizes());
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->device().is_cpu() &&
                    at::isIntegralType(seed->scalar_type(), /*includeBool=*/false),
                "prefix_attention: dropout_p > 0 needs a (1,) int64 CPU seed tensor");
  }
}

// The problem's scalars and the visible token list of every batch row (host side, O(B * n_k)).
struct ProblemBuilder {
  Problem p{};
  std::vector<int32_t> vis;
  std::vector<int64_t> vis_off;

  ProblemBuilder(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_p,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& lengths,
                 const std::optional<at::Tensor>& seed, double dropout_p, double scale) {
    p.B = q.size(0);
    p.H = q.size(1);
    p.n = q.size(2);
    p.d = q.size(3);
    p.n_k = k.size(2);
    p.m = k_p.size(2);
    p.scale = static_cast<float>(scale);
    p.qk_scale = p.scale * kLog2e;
    p.dropout = dropout_p > 0.0;
    p.drop_p = static_cast<float>(dropout_p);
    p.keep_scale = 1.0f / (1.0f - p.drop_p);
    if (p.dropout) {
      const uint64_t s = static_cast<uint64_t>(seed->reshape({-1})[0].item<int64_t>());
      p.seed_lo = static_cast<uint32_t>(s);
      p.seed_hi = static_cast<uint32_t>(s >> 32);
    }
    at::Tensor len_t, mask_t;
    const int64_t* len = nullptr;
    const uint8_t* mk = nullptr;
    if (lengths.has_value()) {
      len_t = lengths->to(at::kLong).contiguous();
      len = len_t.data_ptr<int64_t>();
    }
    if (mask.has_value()) {
      mask_t = mask->contiguous();
      mk = static_cast<const uint8_t*>(mask_t.data_ptr());  // bool and uint8: one byte, nonzero = visible
    }
    vis.reserve(static_cast<size_t>(p.B * p.n_k));
    vis_off.assign(static_cast<size_t>(p.B + 1), 0);
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t hi = len ? std::clamp<int64_t>(len[b], 0, p.n_k) : p.n_k;  // the Triton kernels clamp too
      for (int64_t j = 0; j < hi; ++j) {
        if (!mk || mk[b * p.n_k + j]) vis.push_back(static_cast<int32_t>(j));
      }
      vis_off[b + 1] = static_cast<int64_t>(vis.size());
    }
    p.vis = vis.data();
    p.vis_off = vis_off.data();
  }
};

}  // namespace tpm_fast::pa_cpu

namespace tpm_fast {

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p, const at::Tensor& v_p,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale) {
  using namespace pa_cpu;
  check_inputs(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p);
  at::Tensor out = at::empty_like(q);  // q's strides when q is dense
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};  // no query rows
  ProblemBuilder pb(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale);
  FwdArgs args{pb.p, q.scalar_type(), strided(q), strided(k), strided(v), strided(k_p), strided(v_p),
               strided(out), lse.data_ptr<float>()};
  const RangeFn fn = kernels().fwd;
  at::parallel_for(0, pb.p.B * pb.p.H, 1, [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p,
    const at::Tensor& v_p, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale) {
  using namespace pa_cpu;
  check_inputs(q, k, v, k_p, v_p, key_padding_mask, lengths, seed, dropout_p);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "prefix_attention_bwd: grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "prefix_attention_bwd: lse must have shape (B, H, n), got ", lse.sizes());
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "prefix_attention_bwd (CPU): grad_out, out and lse must be CPU tensors");
  const auto dtype = q.scalar_type();
  const at::Tensor dout_t = grad_out.scalar_type() == dtype ? grad_out : grad_out.to(dtype);
  const at::Tensor out_t = out.scalar_type() == dtype ? out : out.to(dtype);
  const at::Tensor lse_t = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dk_p = at::empty_like(k_p), dv_p = at::empty_like(v_p);
  if (q.size(0) * q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0) {  // nothing attends: all gradients 0
    return {dq.zero_(), dk.zero_(), dv.zero_(), dk_p.zero_(), dv_p.zero_()};
  }
  ProblemBuilder pb(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale);
  BwdArgs args{pb.p,         dtype,        strided(dout_t), strided(q),  strided(k),   strided(v),
               strided(k_p), strided(v_p), strided(out_t),  lse_t.data_ptr<float>(),  strided(dq),
               strided(dk),  strided(dv),  strided(dk_p),   strided(dv_p)};
  const RangeFn fn = kernels().bwd;
  at::parallel_for(0, pb.p.B * pb.p.H, 1, [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
  return {dq, dk, dv, dk_p, dv_p};
}

}  // namespace tpm_fast

#else  // =========================================================== TPM_PA_ISA_BODY: the kernels of one ISA
// Included inside namespace tpm_fast::pa_cpu::isa_<name>, which defines kW (floats per vector), kMR and kNV (the
// register tile: kMR rows x kNV vectors of accumulators). Every buffer row below is padded to a multiple of kW.

typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef float vf_u __attribute__((vector_size(kW * 4), aligned(4), may_alias));  // unaligned access

static inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
static inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
static inline vf splat(float x) { return vf{} + x; }

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

// tl.rand(seed, offset) of triton.language.random per lane, offset = (hi << 32) | lo: the first word of Philox
// 4x32-10 on counter (lo, hi, 0, 0) with key (seed lo, seed hi), then uint_to_uniform_float: the word as int32,
// x < 0 -> -x - 1 (= ~x), times 4.6566127342e-10 in fp32 (so in [0, 1)).
static inline vf philox_uniform(uint32_t k0, uint32_t k1, vu c0, vu c1) {
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
  const vi x = bit_cast_vec<vi>(c0);
  return __builtin_convertvector(x < 0 ? ~x : x, vf) * 4.6566127342e-10f;
}

// Dropout factors of one query row over its c joined columns (z and col padded to a multiple of kW):
// z[j] = keep ? kept : 0 with keep = tl.rand(seed, row_offset + col[j]) >= p, col[j] the joined column index.
static inline void dropout_factors(const Problem& P, uint64_t row_offset, const uint32_t* col, int64_t c, float kept,
                                   float* z) {
  const uint32_t base_lo = static_cast<uint32_t>(row_offset), base_hi = static_cast<uint32_t>(row_offset >> 32);
  for (int64_t j = 0; j < c; j += kW) {
    vu cols;
    std::memcpy(&cols, col + j, sizeof(cols));
    const vu lo = base_lo + cols;
    const vu hi = base_hi - bit_cast_vec<vu>(lo < cols);  // + carry (a true comparison lane is -1)
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

// ------------------------------------------------------------------------------------------------ scratch

// One fp32 arena per parallel chunk, carved into 64-byte aligned blocks.
struct Arena {
  at::Tensor storage;
  float* next = nullptr;

  explicit Arena(int64_t floats) {
    storage = at::empty({floats + 16}, at::TensorOptions().dtype(at::kFloat));
    const auto addr = reinterpret_cast<uintptr_t>(storage.data_ptr<float>());
    next = reinterpret_cast<float*>((addr + 63) & ~uintptr_t{63});
  }
  float* take(int64_t floats) {
    float* out = next;
    next += round_up(floats, 16);
    return out;
  }
};

static inline int64_t arena_floats(std::initializer_list<int64_t> blocks) {
  int64_t total = 0;
  for (int64_t b : blocks) total += round_up(b, 16);
  return total;
}

// ------------------------------------------------------------------------------------------------ forward

static inline vi lane_index() {
  vi out;
  for (int l = 0; l < kW; ++l) out[l] = l;
  return out;
}

// Softmax numerators of RB rows of scores (row stride cp, log2 units; lanes of the last vector outside tail_ok are
// padding): s <- exp2(s - rowmax) (0 in the padding), rmax / rsum <- row max and row sum. RB rows at once so that
// their reduction chains overlap.
template <int RB>
static inline void softmax_rows(float* s, int64_t cp, vi tail_ok, float* rmax, float* rsum) {
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  const int64_t last = cp - kW;
  vf mx[RB], sm[RB];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    float* row = s + r * cp;
    const vf x = load(row + last);
    mx[r] = tail_ok ? x : ninf;
    store(row + last, mx[r]);
  }
  for (int64_t j = 0; j < last; j += kW) {
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const vf x = load(s + r * cp + j);
      mx[r] = x > mx[r] ? x : mx[r];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    mx[r] = allmax(mx[r]);  // finite: column 0 is visible
    sm[r] = splat(0.0f);
  }
  for (int64_t j = 0; j < cp; j += kW) {
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const vf e = exp2v(load(s + r * cp + j) - mx[r]);
      store(s + r * cp + j, e);
      sm[r] += e;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    rmax[r] = mx[r][0];
    rsum[r] = allsum(sm[r])[0];  // >= 1: the max column gives 1
  }
}

struct FwdWork {
  float *q, *kb, *kt, *vb, *s, *o, *z, *rmax, *rsum;
  uint32_t* col;
};

template <typename T>
static void fwd_one(const FwdArgs& a, int64_t bh, const FwdWork& w) {
  const Problem& P = a.p;
  const int64_t b = bh / P.H, h = bh % P.H, n = P.n, d = P.d, m = P.m;
  const int32_t* vis = P.vis + P.vis_off[b];
  const int64_t nv = P.vis_off[b + 1] - P.vis_off[b];
  const int64_t c = m + nv, cp = round_up(c, kW), dp = round_up(d, kW);
  float* lse = a.lse + bh * n;  // shape: (n,)
  T* out = row_ptr_mut<T>(a.out, b, h, 0);
  if (c == 0) {  // no visible key at all: out 0, lse +inf (the backward then recomputes p = 0)
    zero_rows(out, a.out.sr, a.out.sc, n, d);
    std::fill(lse, lse + n, std::numeric_limits<float>::infinity());
    return;
  }
  int64_t ldq;
  const float* q = as_fp32(row_ptr<T>(a.q, b, h, 0), n, d, a.q.sr, a.q.sc, d, w.q, ldq);  // shape: (n, d)
  gather_rows<T>(a.kp, a.k, b, h, m, vis, c, cp, d, dp, w.kb);  // shape: (cp, dp) K'
  transpose(w.kb, dp, cp, dp, w.kt, cp);                         // shape: (dp, cp) K'^T
  gather_rows<T>(a.vp, a.v, b, h, m, vis, c, cp, d, dp, w.vb);  // shape: (cp, dp) V'
  gemm(n, cp, d, q, ldq, 1, w.kt, cp, w.s, cp, P.qk_scale);  // shape: (n, cp) scores, log2 units
  if (P.dropout) joined_columns(m, vis, nv, cp, w.col);
  const vi tail_ok = lane_index() < static_cast<int32_t>(c - (cp - kW));  // visible lanes of the last vector
  int64_t i0 = 0;
  for (; i0 + 4 <= n; i0 += 4) softmax_rows<4>(w.s + i0 * cp, cp, tail_ok, w.rmax + i0, w.rsum + i0);
  for (; i0 < n; ++i0) softmax_rows<1>(w.s + i0 * cp, cp, tail_ok, w.rmax + i0, w.rsum + i0);
  if (P.dropout) {  // after the row sums (as in the Triton kernel: l accumulates the undropped p)
    for (int64_t r = 0; r < n; ++r) {
      dropout_factors(P, static_cast<uint64_t>(bh * n + r) * static_cast<uint64_t>(m + P.n_k), w.col, c, 1.0f, w.z);
      float* row = w.s + r * cp;
      for (int64_t j = 0; j < c; ++j) row[j] *= w.z[j];
    }
  }
  // lse in log2 units, per row; rows [n, round_up(n, kW)) of rmax / rsum are padding
  for (int64_t i = n; i < round_up(n, kW); ++i) w.rmax[i] = w.rsum[i] = 1.0f;
  for (int64_t i = 0; i < n; i += kW) store(w.rmax + i, load(w.rmax + i) + log2v(load(w.rsum + i)));
  std::copy(w.rmax, w.rmax + n, lse);
  const float out_scale = P.dropout ? P.keep_scale : 1.0f;
  for (int64_t i = 0; i < n; ++i) w.rsum[i] = out_scale / w.rsum[i];
  gemm(n, dp, c, w.s, cp, 1, w.vb, dp, w.o, dp);  // shape: (n, dp) unnormalized P V'
  for (int64_t i = 0; i < n; ++i) {
    store_rows(out + i * a.out.sr, 0, a.out.sc, w.o + i * dp, dp, 1, d, w.rsum[i]);
  }
}

template <typename T>
static void fwd_range_t(const FwdArgs& a, int64_t begin, int64_t end) {
  const Problem& P = a.p;
  const int64_t n = P.n, d = P.d, cmax = P.m + P.n_k, cp = round_up(cmax, kW), dp = round_up(d, kW);
  const int64_t np = round_up(n, kW);
  Arena arena(arena_floats({n * d, cp * dp, dp * cp, cp * dp, n * cp, n * dp, cp, np, np, cp}));
  FwdWork w{};
  w.q = arena.take(n * d);
  w.kb = arena.take(cp * dp);
  w.kt = arena.take(dp * cp);
  w.vb = arena.take(cp * dp);
  w.s = arena.take(n * cp);
  w.o = arena.take(n * dp);
  w.z = arena.take(cp);
  w.rmax = arena.take(np);
  w.rsum = arena.take(np);
  w.col = reinterpret_cast<uint32_t*>(arena.take(cp));
  for (int64_t bh = begin; bh < end; ++bh) fwd_one<T>(a, bh, w);
}

void fwd_range(const void* args, int64_t begin, int64_t end) {
  const FwdArgs& a = *static_cast<const FwdArgs*>(args);
  switch (a.dtype) {
    case at::kFloat: return fwd_range_t<float>(a, begin, end);
    case at::kBFloat16: return fwd_range_t<c10::BFloat16>(a, begin, end);
    case at::kHalf: return fwd_range_t<c10::Half>(a, begin, end);
    default: TORCH_CHECK(false, "prefix_attention (CPU): unsupported dtype ", a.dtype);
  }
}

// ------------------------------------------------------------------------------------------------ backward

struct BwdWork {
  float *q, *dout, *o, *kt, *vt, *kb, *vb, *s, *dp, *dq, *dk, *dv, *z, *delta;
  uint32_t* col;
};

template <typename T>
static void bwd_one(const BwdArgs& a, int64_t bh, const BwdWork& w) {
  const Problem& P = a.p;
  const int64_t b = bh / P.H, h = bh % P.H, n = P.n, d = P.d, m = P.m, n_k = P.n_k;
  const int32_t* vis = P.vis + P.vis_off[b];
  const int64_t nv = P.vis_off[b + 1] - P.vis_off[b];
  const int64_t c = m + nv, cp = round_up(c, kW), dp = round_up(d, kW);
  const float* lse = a.lse + bh * n;  // shape: (n,)
  T* dq_out = row_ptr_mut<T>(a.dq, b, h, 0);
  T* dk_out = row_ptr_mut<T>(a.dk, b, h, 0);
  T* dv_out = row_ptr_mut<T>(a.dv, b, h, 0);
  T* dkp_out = row_ptr_mut<T>(a.dkp, b, h, 0);
  T* dvp_out = row_ptr_mut<T>(a.dvp, b, h, 0);
  if (c == 0) {  // no visible key: every gradient of this (b, h) is 0 (m == 0 here)
    zero_rows(dq_out, a.dq.sr, a.dq.sc, n, d);
    zero_rows(dk_out, a.dk.sr, a.dk.sc, n_k, d);
    zero_rows(dv_out, a.dv.sr, a.dv.sc, n_k, d);
    return;
  }
  int64_t ldq, ldo;
  const float* q = as_fp32(row_ptr<T>(a.q, b, h, 0), n, d, a.q.sr, a.q.sc, dp, w.q, ldq);  // shape: (n, dp)
  const float* dout = as_fp32(row_ptr<T>(a.dout, b, h, 0), n, d, a.dout.sr, a.dout.sc, dp, w.dout, ldo);
  // delta = rowsum(dO * O) (FA-2's preprocess), O as stored by the forward (q's dtype)
  int64_t ldo2;
  const float* o = as_fp32(row_ptr<T>(a.out, b, h, 0), n, d, a.out.sr, a.out.sc, dp, w.o, ldo2);  // shape: (n, dp)
  for (int64_t i = 0; i < n; ++i) {
    vf acc = splat(0.0f);
    for (int64_t x = 0; x < dp; x += kW) acc += load(dout + i * ldo + x) * load(o + i * ldo2 + x);
    w.delta[i] = allsum(acc)[0];
  }
  gather_rows<T>(a.kp, a.k, b, h, m, vis, c, cp, d, dp, w.kb);  // shape: (cp, dp) K'
  gather_rows<T>(a.vp, a.v, b, h, m, vis, c, cp, d, dp, w.vb);  // shape: (cp, dp) V'
  transpose(w.kb, dp, cp, dp, w.kt, cp);                         // shape: (dp, cp) K'^T
  transpose(w.vb, dp, cp, dp, w.vt, cp);                         // shape: (dp, cp) V'^T
  gemm(n, cp, d, q, ldq, 1, w.kt, cp, w.s, cp, P.qk_scale);  // shape: (n, cp) scores as in the forward
  gemm(n, cp, d, dout, ldo, 1, w.vt, cp, w.dp, cp);          // shape: (n, cp) dP = dO V'^T
  if (P.dropout) joined_columns(m, vis, nv, cp, w.col);
  for (int64_t i = 0; i < n; ++i) {
    float* s = w.s + i * cp;    // becomes P * Z (the dV operand)
    float* dpr = w.dp + i * cp;  // becomes dS
    const vf l2 = splat(lse[i]), dl = splat(w.delta[i]);
    if (P.dropout) {
      dropout_factors(P, static_cast<uint64_t>(bh * n + i) * static_cast<uint64_t>(m + n_k), w.col, c, P.keep_scale,
                      w.z);
      for (int64_t j = 0; j < cp; j += kW) {
        const vf p = exp2v(load(s + j) - l2), z = load(w.z + j);
        store(s + j, p * z);
        store(dpr + j, p * (load(dpr + j) * z - dl));
      }
    } else {
      for (int64_t j = 0; j < cp; j += kW) {
        const vf p = exp2v(load(s + j) - l2);
        store(s + j, p);
        store(dpr + j, p * (load(dpr + j) - dl));
      }
    }
  }  // columns [c, cp) of P Z and dS hold junk: the GEMMs below read columns [0, c) only
  gemm(c, dp, n, w.s, 1, cp, dout, ldo, w.dv, dp);               // shape: (c, dp) dV' = (P Z)^T dO
  gemm(c, dp, n, w.dp, 1, cp, q, ldq, w.dk, dp, P.scale);         // shape: (c, dp) dK' = dS^T Q * scale
  gemm(n, dp, c, w.dp, cp, 1, w.kb, dp, w.dq, dp, P.scale);       // shape: (n, dp) dQ = dS K' * scale
  store_rows(dq_out, a.dq.sr, a.dq.sc, w.dq, dp, n, d, 1.0f);
  store_rows(dkp_out, a.dkp.sr, a.dkp.sc, w.dk, dp, m, d, 1.0f);
  store_rows(dvp_out, a.dvp.sr, a.dvp.sc, w.dv, dp, m, d, 1.0f);
  int64_t next = 0;  // token rows in order: a visible token takes its compacted row, the others get 0
  for (int64_t t = 0; t < nv; ++t) {
    const int64_t j = vis[t];
    zero_rows(dk_out + next * a.dk.sr, a.dk.sr, a.dk.sc, j - next, d);
    zero_rows(dv_out + next * a.dv.sr, a.dv.sr, a.dv.sc, j - next, d);
    store_rows(dk_out + j * a.dk.sr, a.dk.sr, a.dk.sc, w.dk + (m + t) * dp, dp, 1, d, 1.0f);
    store_rows(dv_out + j * a.dv.sr, a.dv.sr, a.dv.sc, w.dv + (m + t) * dp, dp, 1, d, 1.0f);
    next = j + 1;
  }
  zero_rows(dk_out + next * a.dk.sr, a.dk.sr, a.dk.sc, n_k - next, d);
  zero_rows(dv_out + next * a.dv.sr, a.dv.sr, a.dv.sc, n_k - next, d);
}

template <typename T>
static void bwd_range_t(const BwdArgs& a, int64_t begin, int64_t end) {
  const Problem& P = a.p;
  const int64_t n = P.n, d = P.d, cmax = P.m + P.n_k, cp = round_up(cmax, kW), dp = round_up(d, kW);
  Arena arena(arena_floats({n * dp, n * dp, n * dp, dp * cp, dp * cp, cp * dp, cp * dp, n * cp, n * cp, n * dp,
                            cp * dp, cp * dp, cp, n, cp}));
  BwdWork w{};
  w.q = arena.take(n * dp);
  w.dout = arena.take(n * dp);
  w.o = arena.take(n * dp);
  w.kt = arena.take(dp * cp);
  w.vt = arena.take(dp * cp);
  w.kb = arena.take(cp * dp);
  w.vb = arena.take(cp * dp);
  w.s = arena.take(n * cp);
  w.dp = arena.take(n * cp);
  w.dq = arena.take(n * dp);
  w.dk = arena.take(cp * dp);
  w.dv = arena.take(cp * dp);
  w.z = arena.take(cp);
  w.delta = arena.take(n);
  w.col = reinterpret_cast<uint32_t*>(arena.take(cp));
  for (int64_t bh = begin; bh < end; ++bh) bwd_one<T>(a, bh, w);
}

void bwd_range(const void* args, int64_t begin, int64_t end) {
  const BwdArgs& a = *static_cast<const BwdArgs*>(args);
  switch (a.dtype) {
    case at::kFloat: return bwd_range_t<float>(a, begin, end);
    case at::kBFloat16: return bwd_range_t<c10::BFloat16>(a, begin, end);
    case at::kHalf: return bwd_range_t<c10::Half>(a, begin, end);
    default: TORCH_CHECK(false, "prefix_attention (CPU): unsupported dtype ", a.dtype);
  }
}

#endif  // TPM_PA_ISA_BODY
