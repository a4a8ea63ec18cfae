// tpm_fast._C: registers the native kernels as torch ops in the `tpm_fast_native` namespace
// (torch.ops.tpm_fast_native.*), after checking devices, shapes and dtypes with clear errors. Fake (meta)
// implementations for torch.compile live in tpm_fast/ops/native.py. Importing tpm_fast._C registers everything.
// The module also carries the C++ autograd nodes of the Triton path (csrc/triton_autograd.cpp).
#include <torch/extension.h>

#include "tpm_fast.h"

namespace tpm_fast {
namespace {

void check_cpu(const at::Tensor& t, const char* name) { check_device(t, at::Device(at::kCPU), name); }

void check_padding(const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& lengths, int64_t b,
                   int64_t n_k) {
  if (mask) {
    check_cpu(*mask, "key_padding_mask");
    check_shape(*mask, {b, n_k}, "key_padding_mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must be bool, got ", mask->scalar_type());
  }
  if (lengths) {
    check_cpu(*lengths, "lengths");
    check_shape(*lengths, {b}, "lengths");
    TORCH_CHECK(lengths->scalar_type() == at::kLong || lengths->scalar_type() == at::kInt,
                "lengths must be int32 or int64, got ", lengths->scalar_type());
  }
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p,
                     const at::Tensor& v_p, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& seed,
                     double dropout_p) {
  const char* names[] = {"q", "k", "v", "k_p", "v_p"};
  const at::Tensor* ts[] = {&q, &k, &v, &k_p, &v_p};
  for (int i = 0; i < 5; ++i) {
    check_cpu(*ts[i], names[i]);
    TORCH_CHECK(ts[i]->dim() == 4, "prefix attention: ", names[i], " must be 4-d (B, H, len, d), got ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->scalar_type() == q.scalar_type(), "prefix attention: all inputs must have one dtype, got q ",
                q.scalar_type(), " and ", names[i], " ", ts[i]->scalar_type());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "prefix attention (native CPU): fp32 or bf16 inputs, got ", q.scalar_type());
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3), n_k = k.size(2), m = k_p.size(2);
  check_shape(k, {b, h, n_k, d}, "k");
  check_shape(v, {b, h, n_k, d}, "v");
  check_shape(k_p, {b, h, m, d}, "k_p");
  check_shape(v_p, {b, h, m, d}, "v_p");
  check_padding(mask, lengths, b, n_k);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "dropout needs a (1,) int64 seed tensor");
    check_cpu(*seed, "seed");
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& k_p, const at::Tensor& v_p,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& lengths,
                                                 const std::optional<at::Tensor>& seed, double dropout_p,
                                                 double scale) {
  check_attention(q, k, v, k_p, v_p, mask, lengths, seed, dropout_p);
  return prefix_attention_fwd_cpu(q, k, v, k_p, v_p, mask, lengths, seed, dropout_p, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_p, const at::Tensor& v_p, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale) {
  check_attention(q, k, v, k_p, v_p, mask, lengths, seed, dropout_p);
  check_cpu(grad_out, "grad_out");
  check_shape(grad_out, q.sizes(), "grad_out");
  check_shape(out, q.sizes(), "out");
  check_shape(lse, {q.size(0), q.size(1), q.size(2)}, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be fp32, got ", lse.scalar_type());
  return prefix_attention_bwd_cpu(grad_out.to(q.scalar_type()), q, k, v, k_p, v_p, out, lse, mask, lengths, seed,
                                  dropout_p, scale);
}

std::tuple<at::Tensor, at::Tensor> crf_forward(const at::Tensor& emissions, const std::optional<at::Tensor>& tags,
                                               const at::Tensor& mask, const at::Tensor& start,
                                               const at::Tensor& end, const at::Tensor& transitions) {
  check_crf(emissions, mask, end, transitions, tags, at::Device(at::kCPU));
  check_cpu(start, "start");
  check_shape(start, {emissions.size(2)}, "start");
  return crf_forward_cpu(emissions, tags, mask, start, end, transitions);
}

std::tuple<at::Tensor, at::Tensor> crf_backward(const at::Tensor& grad, const std::optional<at::Tensor>& tags,
                                                const at::Tensor& mask, const at::Tensor& end,
                                                const at::Tensor& transitions, const at::Tensor& alpha,
                                                at::ScalarType grad_dtype) {
  check_crf(alpha, mask, end, transitions, tags, at::Device(at::kCPU));
  check_cpu(grad, "grad");
  check_shape(grad, {alpha.size(0)}, "grad");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat, "CRF: alpha must be fp32, got ", alpha.scalar_type());
  return crf_backward_cpu(grad, tags, mask, end, transitions, alpha, grad_dtype);
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi(const at::Tensor& emissions, const at::Tensor& mask,
                                               const at::Tensor& start, const at::Tensor& end,
                                               const at::Tensor& transitions) {
  check_crf(emissions, mask, end, transitions, std::nullopt, at::Device(at::kCPU));
  check_cpu(start, "start");
  check_shape(start, {emissions.size(2)}, "start");
  return crf_viterbi_cpu(emissions, mask, start, end, transitions);
}

at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "dropout (native CPU): fp32, bf16 or fp16 input, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  check_cpu(seed, "seed");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout needs a (1,) int64 seed tensor, got ",
              seed.scalar_type(), " ", seed.sizes());
  return dropout_cpu(x, p, seed);
}

}  // namespace

void register_triton_autograd(py::module_& m);  // csrc/triton_autograd.cpp

}  // namespace tpm_fast

TORCH_LIBRARY(tpm_fast_native, m) {
  m.def("prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? key_padding_mask, "
        "Tensor? lengths, Tensor? seed, float dropout_p, float scale) -> (Tensor, Tensor)");
  m.def("prefix_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor out, "
        "Tensor lse, Tensor? key_padding_mask, Tensor? lengths, Tensor? seed, float dropout_p, float scale) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("crf_forward(Tensor emissions, Tensor? tags, Tensor mask, Tensor start, Tensor end, Tensor transitions) -> "
        "(Tensor, Tensor)");
  m.def("crf_backward(Tensor grad, Tensor? tags, Tensor mask, Tensor end, Tensor transitions, Tensor alpha, "
        "ScalarType grad_dtype) -> (Tensor, Tensor)");
  m.def("crf_viterbi(Tensor emissions, Tensor mask, Tensor start, Tensor end, Tensor transitions) -> "
        "(Tensor, Tensor)");
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpm_fast_native, CPU, m) {
  m.impl("prefix_attention_fwd", &tpm_fast::attention_fwd);
  m.impl("prefix_attention_bwd", &tpm_fast::attention_bwd);
  m.impl("crf_forward", &tpm_fast::crf_forward);
  m.impl("crf_backward", &tpm_fast::crf_backward);
  m.impl("crf_viterbi", &tpm_fast::crf_viterbi);
  m.impl("dropout", &tpm_fast::dropout);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tpm_fast native kernels; importing registers torch.ops.tpm_fast_native.*";
  tpm_fast::register_triton_autograd(m);
}
