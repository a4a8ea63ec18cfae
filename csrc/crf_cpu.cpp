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
// - Forward: alpha_0 = start + em_0; alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + em_t[j], each step
//   then shifted by its max over the tags (the shifts summed in fp64: log Z = their sum + logsumexp_j(alpha_last[j]
//   + end[j])). The saved alphas (B, n, T) fp32 are the shifted ones (rows t >= length 0): unshifted alphas grow
//   with t (to ~400 for 40 confident tokens, fp32 ulp 3e-5) and every softmax recomputed from them would carry
//   that error. The gold score is summed in fp64, so gold - log Z keeps its bits when both are large and close.
// - Backward: the reverse-mode (adjoint) recursion of kernels/crf_bwd.py over the saved alphas (forward-backward
//   in normalized form): gamma_last = exp(alpha_last + end - log Z) (log Z of the shifted alphas); for t = last .. 1,
//   with the step's column softmax P_t[i, j] = exp(alpha_{t-1}[i] + trans[i, j] - lse_i(...)[j]) recomputed from the
//   saved alphas, xi_t = P_t * gamma_t[None, :] (pairwise marginal), gamma_{t-1} = xi_t.sum(1).
//   With tags (out = gold - log Z): d_t = onehot(y_t) - gamma_t, transitions sum_t (onehot(y_{t-1}, y_t) - xi_t);
//   without (out = log Z): d_t = gamma_t, transitions sum_t xi_t. Everything is scaled by the incoming grad g_b.
//   The gold entries 1 - gamma_t[y_t] and 1 - xi_t[y_{t-1}, y_t] are formed as the sums of the other marginals
//   (equal, as marginals sum to 1): for a confident model they are ~1e-4, and 1 - (a value near 1) would keep only
//   ~1e-3 of them. Against fp64 on a trained tagger's batches the gradients are within ~5e-7 (the fp32 PyTorch
//   reference: 1e-5 to 1e-3); before these two changes they were off by 1e-3 to 4e-2, which slowed training down.
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
#include "crf_cpu_rows.h"  // the per-sequence kernels (over the SIMD helpers of crf_cpu_simd.h)

namespace tpm_fast {
namespace {

// ------------------------------------------------------------------------------------------------ tensor plumbing

inline int64_t round_up(int64_t t, int64_t w) { return (t + w - 1) / w * w; }

inline int64_t clamp_tag(int64_t tag, int64_t T) { return std::min(std::max<int64_t>(tag, 0), T - 1); }

// The mask (B, n) bool / uint8 and the optional tags (B, n) int64 of a call, any strides.
struct Rows {
  const uint8_t* mask;
  int64_t smb, smn, n;
  const int64_t* tags;  // nullptr without tags
  int64_t stb, stn;

  Rows(const at::Tensor& mask_t, const std::optional<at::Tensor>& tags_t)
      : mask(static_cast<const uint8_t*>(mask_t.data_ptr())), smb(mask_t.stride(0)), smn(mask_t.stride(1)),
        n(mask_t.size(1)), tags(tags_t ? tags_t->data_ptr<int64_t>() : nullptr), stb(tags_t ? tags_t->stride(0) : 0),
        stn(tags_t ? tags_t->stride(1) : 0) {}

  // Row b's length: its number of nonzero mask entries, clamped to [1, n].
  int64_t length(int64_t b) const {
    const uint8_t* row = mask + b * smb;
    int64_t count = 0;
    for (int64_t t = 0; t < n; ++t) count += row[t * smn] != 0;
    return std::min(std::max<int64_t>(count, 1), n);
  }

  // Row b's tag at position t, clamped into [0, T).
  int64_t tag(int64_t b, int64_t t, int64_t T) const { return clamp_tag(tags[b * stb + t * stn], T); }
};

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

template <typename scalar_t>
void forward_impl(const at::Tensor& emissions, const std::optional<at::Tensor>& tags, const at::Tensor& mask,
                  const at::Tensor& start_t, const at::Tensor& end_t, const at::Tensor& trans_t, at::Tensor& out,
                  at::Tensor& alpha) {
  const Kernels& k = kernels();
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2), TP = round_up(T, k.lanes);
  const scalar_t* em = emissions.data_ptr<scalar_t>();  // shape: (B, n, T), any strides
  const int64_t seb = emissions.stride(0), sen = emissions.stride(1), set = emissions.stride(2);
  const Rows rows(mask, tags);
  const Prepared prep(start_t, end_t, trans_t, T, TP);
  const Params P = prep.view();
  float* out_p = out.data_ptr<float>();   // shape: (B,)
  float* al_p = alpha.data_ptr<float>();  // shape: (B, n, T) contiguous

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> e(n * TP, 0.0f), ws(3 * TP);  // shape: (n, TP) one row's emissions; kernel scratch
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = rows.length(b);
      const scalar_t* em_row = em + b * seb;
      float* al = al_p + b * n * T;
      load_emissions(em_row, sen, set, L, T, TP, e.data());
      const double shift = k.forward(P, e.data(), L, al, ws.data());
      std::fill(al + L * T, al + n * T, 0.0f);  // padding rows
      const double log_z = shift + log_z_of(al + (L - 1) * T, P.end, T);
      if (rows.tags == nullptr) {
        out_p[b] = static_cast<float>(log_z);
        continue;
      }
      // gold score: start[y_0] + sum_t em[t, y_t] + sum_{t>=1} trans[y_{t-1}, y_t] + end[y_last], summed in fp64 so
      // that gold - log Z (small for a confident model, from two values ~ the sequence's total score) keeps its bits
      const int64_t first = rows.tag(b, 0, T);
      int64_t prev = first;
      double gold = e[prev];
      for (int64_t t = 1; t < L; ++t) {
        const int64_t cur = rows.tag(b, t, T);
        gold += static_cast<double>(e[t * TP + cur]) + P.tr[prev * TP + cur];
        prev = cur;
      }
      gold += static_cast<double>(P.start[first]) + P.end[prev];
      out_p[b] = static_cast<float>(gold - log_z);
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
  const Rows rows(mask, tags);
  const Prepared prep(at::Tensor(), end_t, trans_t, T, TP);
  const Params P = prep.view();
  const float* al_p = alpha.data_ptr<float>();            // shape: (B, n, T) contiguous
  out_t* gem_p = g_em.data_ptr<out_t>();                  // shape: (B, n, T) contiguous
  float* par_p = g_par.data_ptr<float>();                 // shape: (B, 2T + T*T)
  constexpr bool kDirect = std::is_same_v<out_t, float>;  // fp32 grads are written in place

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> ws(5 * TP + 2 * T * TP);            // kernel scratch
    std::vector<float> gd(kDirect ? 0 : n * T);            // shape: (n, T) g * d_t before the cast
    std::vector<int64_t> tag_buf(rows.tags != nullptr ? n : 0);  // shape: (n,) clamped tags of one row
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = rows.length(b);
      const float* al = al_p + b * n * T;
      out_t* gem = gem_p + b * n * T;
      if (rows.tags != nullptr) {
        for (int64_t t = 0; t < L; ++t) tag_buf[t] = rows.tag(b, t, T);
      }
      float* gd_row = nullptr;
      if constexpr (kDirect) {
        gd_row = gem;
      } else {
        gd_row = gd.data();
      }
      const float log_z = log_z_of(al + (L - 1) * T, P.end, T);  // of the shifted alphas, as the forward's
      k.backward(P, al, L, rows.tags != nullptr ? tag_buf.data() : nullptr, gp[b * sg], log_z, gd_row,
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
  const Rows rows(mask, std::nullopt);
  const Prepared prep(start_t, end_t, trans_t, T, TP);
  const Params P = prep.view();
  int64_t* out_p = best.data_ptr<int64_t>();     // shape: (B, n)
  int64_t* len_p = lengths.data_ptr<int64_t>();  // shape: (B,)

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> e(n * TP, 0.0f), ws(2 * TP);  // shape: (n, TP) one row's emissions; kernel scratch
    std::vector<int32_t> bp(n * TP);                 // shape: (n, TP) back-pointers, rows 1 .. L-1
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t L = rows.length(b);
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
