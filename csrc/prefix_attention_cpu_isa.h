// The CPU prefix attention kernels for one instruction set: per (batch, head) forward and backward over compacted
// visible keys (the algorithm is described in csrc/prefix_attention_cpu.cpp).
// Included inside namespace tpm_fast::pa_cpu::isa_<name> (csrc/prefix_attention_cpu.cpp, once per instruction set),
// which defines kW (floats per vector), kMR and kNV (the register tile: kMR rows x kNV vectors of accumulators); so
// no include guard. Every buffer row below is padded to a multiple of kW.

#include "prefix_attention_cpu_simd.h"

// ------------------------------------------------------------------------------------------------ scratch

// One fp32 arena per parallel chunk, carved into 64-byte aligned blocks by Arena::carve.
struct Arena {
  at::Tensor storage;
  float* base = nullptr;  // null while measuring
  int64_t used = 0;       // floats taken so far

  float* take(int64_t floats) {
    float* out = base ? base + used : nullptr;
    used += round_up(floats, 16);
    return out;
  }

  // The arena of the blocks that take_all(arena) takes, handed to it: a first pass measures them, the second
  // carves them out of one allocation (so each block's size is written once).
  template <typename F>
  static Arena carve(F&& take_all) {
    Arena measure;
    take_all(measure);
    Arena arena;
    arena.storage = at::empty({measure.used + 16}, at::TensorOptions().dtype(at::kFloat));
    const auto addr = reinterpret_cast<uintptr_t>(arena.storage.data_ptr<float>());
    arena.base = reinterpret_cast<float*>((addr + 63) & ~uintptr_t{63});
    take_all(arena);
    return arena;
  }
};

// fn(T{}) for the inputs' dtype T: fp32, bf16 or fp16.
template <typename F>
static void for_dtype(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "prefix_attention (CPU): unsupported dtype ", dtype);
  }
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

// softmax_rows over all n rows of an (n, cp) score block whose first c columns are keys: 4 rows at a time, then 1.
static inline void softmax_block(float* s, int64_t n, int64_t c, int64_t cp, float* rmax, float* rsum) {
  const vi tail_ok = lane_index() < static_cast<int32_t>(c - (cp - kW));  // visible lanes of the last vector
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) softmax_rows<4>(s + i * cp, cp, tail_ok, rmax + i, rsum + i);
  for (; i < n; ++i) softmax_rows<1>(s + i * cp, cp, tail_ok, rmax + i, rsum + i);
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
  if (c == 0) {  // no visible key at all: out 0, lse +inf (the backward gives 0 gradients)
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
  softmax_block(w.s, n, c, cp, w.rmax, w.rsum);
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
  FwdWork w{};
  const Arena arena = Arena::carve([&](Arena& ar) {
    w.q = ar.take(n * d);
    w.kb = ar.take(cp * dp);
    w.kt = ar.take(dp * cp);
    w.vb = ar.take(cp * dp);
    w.s = ar.take(n * cp);
    w.o = ar.take(n * dp);
    w.z = ar.take(cp);
    w.rmax = ar.take(np);
    w.rsum = ar.take(np);
    w.col = reinterpret_cast<uint32_t*>(ar.take(cp));
  });
  for (int64_t bh = begin; bh < end; ++bh) fwd_one<T>(a, bh, w);
}

void fwd_range(const void* args, int64_t begin, int64_t end) {
  const FwdArgs& a = *static_cast<const FwdArgs*>(args);
  for_dtype(a.dtype, [&](auto tag) { fwd_range_t<decltype(tag)>(a, begin, end); });
}

// ------------------------------------------------------------------------------------------------ backward

struct BwdWork {
  float *q, *dout, *kt, *vt, *kb, *vb, *s, *dp, *dq, *dk, *dv, *z, *rmax, *rsum;
  uint32_t* col;
};

template <typename T>
static void bwd_one(const BwdArgs& a, int64_t bh, const BwdWork& w) {
  const Problem& P = a.p;
  const int64_t b = bh / P.H, h = bh % P.H, n = P.n, d = P.d, m = P.m, n_k = P.n_k;
  const int32_t* vis = P.vis + P.vis_off[b];
  const int64_t nv = P.vis_off[b + 1] - P.vis_off[b];
  const int64_t c = m + nv, cp = round_up(c, kW), dp = round_up(d, kW);
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
  gather_rows<T>(a.kp, a.k, b, h, m, vis, c, cp, d, dp, w.kb);  // shape: (cp, dp) K'
  gather_rows<T>(a.vp, a.v, b, h, m, vis, c, cp, d, dp, w.vb);  // shape: (cp, dp) V'
  transpose(w.kb, dp, cp, dp, w.kt, cp);                         // shape: (dp, cp) K'^T
  transpose(w.vb, dp, cp, dp, w.vt, cp);                         // shape: (dp, cp) V'^T
  gemm(n, cp, d, q, ldq, 1, w.kt, cp, w.s, cp, P.qk_scale);  // shape: (n, cp) scores as in the forward
  gemm(n, cp, d, dout, ldo, 1, w.vt, cp, w.dp, cp);          // shape: (n, cp) dP = dO V'^T
  // P as the forward formed it: the same scores, numerators and row sums (not exp2(S - lse): at large logits the
  // fp32 lse, ~1e3, is off by up to half its ulp, which scales a whole row of P by up to 1e-4)
  softmax_block(w.s, n, c, cp, w.rmax, w.rsum);
  if (P.dropout) joined_columns(m, vis, nv, cp, w.col);
  // dS = P * (dP Z - delta) with delta = rowsum(P * dP Z): the softmax backward's row sum, from the same P and dP as
  // dS (FA-2's rowsum(dO * O) re-rounds O, in q's dtype: where a row's softmax is one-hot its dS, exactly 0, came
  // out ~1e-6 |dO| |V|, and ~4e-3 of that in bf16). The whole row is at hand here; padding columns hold P = 0.
  for (int64_t i = 0; i < n; ++i) {
    float* s = w.s + i * cp;     // becomes P * Z (the dV operand)
    float* dpr = w.dp + i * cp;  // becomes dS
    if (P.dropout) {
      dropout_factors(P, static_cast<uint64_t>(bh * n + i) * static_cast<uint64_t>(m + n_k), w.col, c, P.keep_scale,
                      w.z);
      for (int64_t j = 0; j < cp; j += kW) store(dpr + j, load(dpr + j) * load(w.z + j));
    }
    const vf inv = splat(1.0f / w.rsum[i]);
    vf acc = splat(0.0f);
    for (int64_t j = 0; j < cp; j += kW) {
      const vf p = load(s + j) * inv;
      store(s + j, p);
      acc += p * load(dpr + j);
    }
    const vf delta = allsum(acc);
    if (P.dropout) {
      for (int64_t j = 0; j < cp; j += kW) {
        const vf p = load(s + j);
        store(dpr + j, p * (load(dpr + j) - delta));
        store(s + j, p * load(w.z + j));
      }
    } else {
      for (int64_t j = 0; j < cp; j += kW) store(dpr + j, load(s + j) * (load(dpr + j) - delta));
    }
  }  // the GEMMs below read columns [0, c) only
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
  BwdWork w{};
  const Arena arena = Arena::carve([&](Arena& ar) {
    w.q = ar.take(n * dp);
    w.dout = ar.take(n * dp);
    w.kt = ar.take(dp * cp);
    w.vt = ar.take(dp * cp);
    w.kb = ar.take(cp * dp);
    w.vb = ar.take(cp * dp);
    w.s = ar.take(n * cp);
    w.dp = ar.take(n * cp);
    w.dq = ar.take(n * dp);
    w.dk = ar.take(cp * dp);
    w.dv = ar.take(cp * dp);
    w.z = ar.take(cp);
    w.rmax = ar.take(round_up(n, kW));
    w.rsum = ar.take(round_up(n, kW));
    w.col = reinterpret_cast<uint32_t*>(ar.take(cp));
  });
  for (int64_t bh = begin; bh < end; ++bh) bwd_one<T>(a, bh, w);
}

void bwd_range(const void* args, int64_t begin, int64_t end) {
  const BwdArgs& a = *static_cast<const BwdArgs*>(args);
  for_dtype(a.dtype, [&](auto tag) { bwd_range_t<decltype(tag)>(a, begin, end); });
}

// ------------------------------------------------------------------------------------------------ dropout op

// y[i] = x[i] * (u_i >= p ? kept : 0) for the flat indices i of the 64-element blocks [begin, end) (the last block
// cut at a.n). u_i is word w of Philox counter 16 * blk + l (tl.rand4x(seed, 16 * blk + l) of Triton), where
// i = 64 * blk + 16 * w + l, l < 16: all four words of each counter are used, and the layout does not depend on the
// vector width, so every instruction set (and the chunking of at::parallel_for) gives the same mask.
template <typename T>
static void drop_range_t(const DropArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const vu lanes = bit_cast_vec<vu>(lane_index());
  const vf kept = splat(a.kept), zero = splat(0.0f);
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t first = blk * 64, count = std::min<int64_t>(64, a.n - first);
    for (int64_t part = 0; part < 16; part += kW) {  // lanes l = part .. part + kW - 1 of the block's 16 counters
      vu lo, hi, words[4];
      counters(static_cast<uint64_t>(blk) * 16 + part, lanes, lo, hi);
      philox4(a.seed_lo, a.seed_hi, lo, hi, words);
      for (int w = 0; w < 4; ++w) {
        const vf f = to_uniform(words[w]) >= a.p ? kept : zero;
        const int64_t at = 16 * w + part, c = std::min<int64_t>(kW, count - at);  // elements first + at + [0, c)
        if constexpr (std::is_same_v<T, float>) {
          if (c == kW) {
            store(y + first + at, load(x + first + at) * f);
            continue;
          }
        }
        const T* xs = x + first + at;
        T* ys = y + first + at;
        for (int64_t l = 0; l < c; ++l) ys[l] = static_cast<T>(static_cast<float>(xs[l]) * f[l]);
      }
    }
  }
}

void drop_range(const void* args, int64_t begin, int64_t end) {
  const DropArgs& a = *static_cast<const DropArgs*>(args);
  for_dtype(a.dtype, [&](auto tag) { drop_range_t<decltype(tag)>(a, begin, end); });
}
