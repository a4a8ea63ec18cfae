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
//   backward: P = exp2(S * scale * log2(e) - max) / sum, dV' = (P * Z)^T dO, dP = dO V'^T, dS = P * (dP * Z - delta)
//             with Z the dropout factor and delta = rowsum(P * dP * Z) (the softmax backward's; equal to FA-2's
//             rowsum(dO * O) in exact arithmetic, and exact where P is one-hot), P recomputed exactly as the
//             forward formed it (max, numerators, sum: neither O nor lse is read),
//             dQ = dS K' * scale, dK' = dS^T Q * scale.
//
// SIMD: the kernels (prefix_attention_cpu_isa.h, over the vector helpers of prefix_attention_cpu_simd.h) are
// written with GCC vector extensions of kW floats. This file includes them once per instruction set (AVX-512, AVX2 + FMA, baseline) inside `#pragma GCC target` regions, the scheme of Google
// Highway's foreach_target.h, so one `-O3` build (no -march) runs at full width on any x86-64 CPU; the set is
// picked at first use from at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=avx2|default selects the narrower
// ones). Other compilers / architectures build the baseline body only.
//
// No bindings here: csrc/bindings.cpp registers these functions as torch.ops.tpm_fast_native.prefix_attention_fwd
// / prefix_attention_bwd.


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

// The standalone dropout op (dropout_cpu below) over contiguous x and y of n elements, fp32 / bf16 / fp16: the
// Philox generator of the attention's dropout, four words a counter (drop_range in prefix_attention_cpu_isa.h).
struct DropArgs {
  at::ScalarType dtype;
  const void* x;
  void* y;
  int64_t n;
  float p, kept;
  uint32_t seed_lo, seed_hi;
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
  Strided dout, q, k, v, kp, vp;
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
#include "prefix_attention_cpu_isa.h"
}  // namespace tpm_fast::pa_cpu::isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace tpm_fast::pa_cpu::isa_avx2 {
constexpr int kW = 8;
constexpr int kMR = 6;
constexpr int kNV = 2;  // 6 x 2 accumulators of the 16 registers
#include "prefix_attention_cpu_isa.h"
}  // namespace tpm_fast::pa_cpu::isa_avx2
#pragma GCC pop_options

#pragma GCC diagnostic pop
#endif

namespace tpm_fast::pa_cpu::isa_base {  // SSE2 on x86-64, NEON on aarch64
constexpr int kW = 4;
constexpr int kMR = 4;
constexpr int kNV = 2;
#include "prefix_attention_cpu_isa.h"
}  // namespace tpm_fast::pa_cpu::isa_base

// ------------------------------------------------------------------------------------- dispatch and checks

namespace tpm_fast::pa_cpu {

struct Kernels {
  RangeFn fwd, bwd, drop;
  const char* isa;
};

static Kernels pick_kernels() {
#ifdef TPM_PA_MULTI_ISA
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  __builtin_cpu_init();
  if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return {isa_avx512::fwd_range, isa_avx512::bwd_range, isa_avx512::drop_range, "avx512"};
  }
  if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {isa_avx2::fwd_range, isa_avx2::bwd_range, isa_avx2::drop_range, "avx2"};
  }
#endif
  return {isa_base::fwd_range, isa_base::bwd_range, isa_base::drop_range, "base"};
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
                    seed->scalar_type() == at::kLong,
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
      const uint64_t s = static_cast<uint64_t>(*seed->data_ptr<int64_t>());  // a read, no aten op
      p.seed_lo = static_cast<uint32_t>(s);
      p.seed_hi = static_cast<uint32_t>(s >> 32);
    }
    at::Tensor len_t, mask_t;
    const uint8_t* mk = nullptr;
    if (lengths.has_value()) {  // int32 (key_bounds) or int64, read in place when dense
      len_t = lengths->scalar_type() == at::kInt || lengths->scalar_type() == at::kLong ? lengths->contiguous()
                                                                                         : lengths->to(at::kLong);
    }
    const auto len_at = [&](int64_t b) -> int64_t {
      return len_t.scalar_type() == at::kInt ? len_t.data_ptr<int32_t>()[b] : len_t.data_ptr<int64_t>()[b];
    };
    if (mask.has_value()) {
      mask_t = mask->contiguous();
      mk = static_cast<const uint8_t*>(mask_t.data_ptr());  // bool and uint8: one byte, nonzero = visible
    }
    vis.reserve(static_cast<size_t>(p.B * p.n_k));
    vis_off.assign(static_cast<size_t>(p.B + 1), 0);
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t hi = len_t.defined() ? std::clamp<int64_t>(len_at(b), 0, p.n_k) : p.n_k;  // clamped as Triton
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
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dk_p = at::empty_like(k_p), dv_p = at::empty_like(v_p);
  if (q.size(0) * q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0) {  // nothing attends: all gradients 0
    return {dq.zero_(), dk.zero_(), dv.zero_(), dk_p.zero_(), dv_p.zero_()};
  }
  ProblemBuilder pb(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale);
  BwdArgs args{pb.p,        dtype,       strided(dout_t), strided(q),    strided(k),    strided(v), strided(k_p),
               strided(v_p), strided(dq), strided(dk),     strided(dv),   strided(dk_p), strided(dv_p)};
  const RangeFn fn = kernels().bwd;
  at::parallel_for(0, pb.p.B * pb.p.H, 1, [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
  return {dq, dk, dv, dk_p, dv_p};
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  using namespace pa_cpu;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);  // contiguous, x's shape
  if (xc.numel() == 0) return y;
  const uint64_t s = static_cast<uint64_t>(*seed.data_ptr<int64_t>());  // a read, no aten op
  const float drop_p = static_cast<float>(p);
  const DropArgs args{xc.scalar_type(), xc.data_ptr(), y.data_ptr(), xc.numel(), drop_p, 1.0f / (1.0f - drop_p),
                      static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
  const RangeFn fn = kernels().drop;
  const int64_t blocks = (xc.numel() + 63) / 64;  // of 64 elements
  at::parallel_for(0, blocks, 512, [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
  return y;
}

}  // namespace tpm_fast

