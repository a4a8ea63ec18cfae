// C++ autograd for the Triton kernels' eager path (tpm_fast._C.prefix_attention_autograd / crf_autograd).
//
// At TPM-MI's sizes a fused op's GPU work is a few microseconds, so its host path decides its speed. A Python
// torch.autograd.Function spends most of that path in Python: building ctx, saving tensors, the engine calling back
// into Python for the backward, allocating each gradient from Python. These torch::autograd::Function nodes keep all
// of it in C++ (allocations, saved tensors, the graph edges, the parameter-gradient reduction) and call Python only
// to launch: the attention through its allocation-free launchers (launch_fwd_into / launch_bwd_into of
// tpm_fast/kernels/prefix_attention.py, with the launch plan its three launches share); the CRF straight into
// Triton's launch entry (kernel.run), its per-call stride arguments built here. Semantics are those of the Python
// autograd.Functions they replace (PrefixAttentionFunc, CRFLogLikelihoodFunc), which stay as the fallback where
// tpm_fast._C is not built.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

namespace tpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A reference to a Python object, kept in ctx->saved_data as a capsule; released with the GIL held (the node may
// die on an autograd engine thread), leaked if the interpreter is already gone.
struct PyRef : torch::CustomClassHolder {
  explicit PyRef(const py::handle& obj) : obj(obj.inc_ref().ptr()) {}
  ~PyRef() override {
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      Py_DECREF(obj);
    }
  }
  PyObject* obj;
};

c10::IValue hold(const py::handle& obj) { return c10::IValue::make_capsule(c10::make_intrusive<PyRef>(obj)); }
py::handle held(AutogradContext* ctx, const char* key) {
  return static_cast<PyRef*>(ctx->saved_data.at(key).toCapsule().get())->obj;
}

// Prefix-K/V attention. Inputs already in the launch contract's layout (tpm_fast/kernels/prefix_attention.py):
// q (B, H, n, d); k, v (B, H, n_k, d); k_p, v_p (B, H, m, d); one dtype. `plan` is the call's LaunchPlan (mask,
// lengths and seed ride in it); `launch_fwd(plan, q, k, v, k_p, v_p, out, lse)` and `launch_bwd(plan, q, k, v, k_p,
// v_p, out, grad_out, lse, delta, dq, dk, dv, dk_p, dv_p)` launch into the buffers allocated here.
struct PrefixAttention : public torch::autograd::Function<PrefixAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_p, const at::Tensor& v_p, const py::object& plan,
                            const py::object& launch_fwd, const py::object& launch_bwd) {
    at::Tensor out = at::empty_like(q);                                                     // shape: (B, H, n, d)
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, H, n)
    launch_fwd(plan, q, k, v, k_p, v_p, out, lse);
    ctx->save_for_backward({q, k, v, k_p, v_p, out, lse});
    ctx->saved_data["plan"] = hold(plan);
    ctx->saved_data["launch_bwd"] = hold(launch_bwd);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &out = saved[5], &lse = saved[6];
    at::Tensor grad_out = grad_outputs[0];  // shape: (B, H, n, d), copied into q's strides if it has others
    if (grad_out.strides() != q.strides()) grad_out = at::empty_like(q).copy_(grad_out);
    variable_list grads;  // dq, dk, dv, dk_p, dv_p: each like its input
    for (int i = 0; i < 5; ++i) grads.push_back(at::empty_like(saved[i]));
    at::Tensor delta = at::empty_like(lse);  // shape: (B, H, n) rowsum(dO * O), written by the dQ kernel
    {
      py::gil_scoped_acquire gil;
      held(ctx, "launch_bwd")(py::reinterpret_borrow<py::object>(held(ctx, "plan")), q, saved[1], saved[2],
                              saved[3], saved[4], out, grad_out, lse, delta, grads[0], grads[1], grads[2], grads[3],
                              grads[4]);
    }
    grads.resize(8);  // no gradient for plan and the launchers
    return grads;
  }
};

// One Triton launch without a Python frame of ours: `kernel.run(*args, **keywords)`, the launch entry that
// `kernel[grid](*args, ...)` reaches (and that tpm_fast.profiling counts and stubs); `keywords` hold the grid.
// PyObject_Call, not pybind11's kernel.attr("run")(*args, **keywords), whose unpacking copies both (~5 us here).
void run_triton(const py::handle& kernel, const py::handle& keywords, const py::tuple& args) {
  const py::object run = kernel.attr("run");
  PyObject* result = PyObject_Call(run.ptr(), args.ptr(), keywords.ptr());
  if (result == nullptr) throw py::error_already_set();
  Py_DECREF(result);
}

// CRF log-likelihood (tags given) or log partition (tags absent): emissions (B, n, T) float, tags (B, n) int64,
// mask (B, n) bool or uint8, start / end (T,), transitions (T, T). Returns (B,) fp32, differentiable w.r.t.
// emissions (grad in their dtype), start, end and transitions (grads in each one's dtype; reduced over the batch
// only when needed); with `reduction` 1 (sum) or 2 (mean over the batch) the node returns that scalar itself, so a
// reduced loss costs no reduction node of its own in the graph (its backward divides the scalar grad by B where
// MeanBackward would, and the kernel reads it with stride 0). `launch` = tpm_fast.kernels.crf.launch_spec(T, tags
// given, B): (forward kernel, its keywords,
// backward kernel, its keywords). The launch arguments are built here, as launch_crf_forward / launch_crf_backward
// build them (tests/test_triton_autograd.py holds the two paths to the same bits), so the CRF's eager host path runs
// no Python of its own between the op and Triton's launch entry (bench/test_host_overhead.py).
struct CRFLogLikelihood : public torch::autograd::Function<CRFLogLikelihood> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& emissions, const std::optional<at::Tensor>& tags,
                            const at::Tensor& mask, const at::Tensor& start, const at::Tensor& end,
                            const at::Tensor& transitions, const py::tuple& launch, int64_t reduction) {
    const int64_t b = emissions.size(0), n = emissions.size(1), t = emissions.size(2);
    const auto f32 = emissions.options().dtype(at::kFloat);
    at::Tensor out = at::empty({b}, f32);          // shape: (B,)
    at::Tensor alpha = at::empty({b, n, t}, f32);  // shape: (B, n, T)
    // shape: (B, n) uint8, left-aligned; the tags' stand-in (never read) without tags
    const at::Tensor mask_u8 = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).view(at::kByte);
    const at::Tensor gold = tags ? *tags : mask_u8;  // shape: (B, n) int64
    const int64_t stb = tags ? gold.stride(0) : 0, stn = tags ? gold.stride(1) : 0;
    const at::Tensor end_c = end.contiguous(), trans_c = transitions.contiguous();
    if (b > 0) {
      const at::Tensor em = emissions.stride(2) == 1 ? emissions : emissions.contiguous();  // shape: (B, n, T)
      run_triton(launch[0], launch[1],
                 py::make_tuple(em, gold, mask_u8, start.contiguous(), end_c, trans_c, out, alpha, n, t, em.stride(0),
                                em.stride(1), stb, stn, mask_u8.stride(0), mask_u8.stride(1)));
    }
    ctx->save_for_backward({gold, mask_u8, end_c, trans_c, alpha});
    // the four inputs' dtypes, whether tags were given, the tags' strides
    ctx->saved_data["meta"] = std::vector<int64_t>{static_cast<int64_t>(emissions.scalar_type()),
                                                   static_cast<int64_t>(start.scalar_type()),
                                                   static_cast<int64_t>(end.scalar_type()),
                                                   static_cast<int64_t>(transitions.scalar_type()),
                                                   tags.has_value(), stb, stn, reduction};
    ctx->saved_data["launch"] = hold(launch);
    if (reduction == 0) return out;
    return reduction == 1 ? out.sum() : out.mean();  // shape: ()
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &mask_u8 = saved[1], &alpha = saved[4];
    const auto meta = ctx->saved_data.at("meta").toIntVector();
    const int64_t b = alpha.size(0), n = alpha.size(1), t = alpha.size(2);
    at::Tensor grad = grad_outputs[0];  // shape: (B,) any stride, or () after a reduction
    if (meta[7] == 2 && b > 0) grad = grad / b;  // the mean's grad, as MeanBackward computes it
    const auto dtype = [&](int i) { return static_cast<at::ScalarType>(meta[i]); };
    at::Tensor g_em = at::empty({b, n, t}, alpha.options().dtype(dtype(0)));  // shape: (B, n, T)
    at::Tensor g_par = at::empty({b, 2 * t + t * t}, alpha.options());        // shape: (B, 2T + T*T) fp32
    if (b > 0) {
      py::gil_scoped_acquire gil;
      const py::tuple launch = py::reinterpret_borrow<py::tuple>(held(ctx, "launch"));
      run_triton(launch[2], launch[3],
                 py::make_tuple(grad, saved[0], mask_u8, saved[2], saved[3], alpha, g_em, g_par, n, t,
                                meta[7] ? 0 : grad.stride(0), meta[5], meta[6], mask_u8.stride(0), mask_u8.stride(1)));
    }
    variable_list grads(8);  // one per forward argument; none for tags, mask, the launch spec and the reduction
    grads[0] = g_em;
    const size_t first_param = meta[4] ? 3 : 2;  // needs_input_grad counts tensor inputs only
    if (ctx->needs_input_grad(first_param) || ctx->needs_input_grad(first_param + 1) ||
        ctx->needs_input_grad(first_param + 2)) {
      const at::Tensor sums = g_par.sum(0);  // shape: (2T + T*T,) [start | end | transitions]
      // as_strided views, not split + view: ~7 us less on the host here (bench/test_host_overhead.py)
      grads[3] = sums.as_strided({t}, {1}, 0);             // shape: (T,)
      grads[4] = sums.as_strided({t}, {1}, t);             // shape: (T,)
      grads[5] = sums.as_strided({t, t}, {t, 1}, 2 * t);  // shape: (T, T)
      for (int i = 0; i < 3; ++i) {
        if (dtype(1 + i) != at::kFloat) grads[3 + i] = grads[3 + i].to(dtype(1 + i));
      }
    }
    return grads;
  }
};

}  // namespace

void register_triton_autograd(py::module_& m) {
  m.def(
      "prefix_attention_autograd",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p, const at::Tensor& v_p,
         const py::object& plan, const py::object& launch_fwd, const py::object& launch_bwd) {
        return PrefixAttention::apply(q, k, v, k_p, v_p, plan, launch_fwd, launch_bwd);
      },
      "Prefix attention through a C++ autograd node over the Triton launchers (see csrc/triton_autograd.cpp).");
  m.def(
      "crf_autograd",
      [](const at::Tensor& emissions, const std::optional<at::Tensor>& tags, const at::Tensor& mask,
         const at::Tensor& start, const at::Tensor& end, const at::Tensor& transitions, const py::tuple& launch,
         int64_t reduction) {
        return CRFLogLikelihood::apply(emissions, tags, mask, start, end, transitions, launch, reduction);
      },
      "CRF log-likelihood through a C++ autograd node launching the Triton kernels (see csrc/triton_autograd.cpp).");
}

}  // namespace tpm_fast
