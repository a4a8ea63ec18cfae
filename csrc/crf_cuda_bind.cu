// tpm_fast._C, CUDA part: registers the CUDA CRF kernels (csrc/crf_cuda.h) for CUDA tensors under the schemas that
// csrc/bindings.cpp defines (torch.ops.tpm_fast_native.crf_forward / crf_backward / crf_viterbi), after the checks
// the CPU registrations make (csrc/tpm_fast.h, on the first input's CUDA device) plus the CUDA kernels' own limit
// (T <= kCrfCudaMaxTags). Inputs are brought to what the kernels read: fp32 contiguous parameters, emissions with
// last-dim stride 1 (fp64 ones rounded to fp32, as the CPU kernels read them). Launches go to the current stream of
// the inputs' device. Built only by the CUDA build of setup.py; fakes and autograd are in tpm_fast/ops/native.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "crf_cuda.h"
#include "tpm_fast.h"

namespace tpm_fast {
namespace {

// `first` (emissions, or alpha for the backward) on a CUDA device, everything else there too, shapes and dtypes as
// the CPU registration checks them, and T / n within the kernels' limits.
void check_crf_cuda(const at::Tensor& first, const char* first_name, const at::Tensor& mask, const at::Tensor& end,
                    const at::Tensor& transitions, const std::optional<at::Tensor>& tags) {
  TORCH_CHECK(first.is_cuda(), "CRF (native CUDA): ", first_name, " must be a CUDA tensor, got ", first.device());
  check_crf(first, mask, end, transitions, tags, first.device());
  const int64_t t = first.size(2);
  TORCH_CHECK(t >= 1 && t <= kCrfCudaMaxTags, "CRF (native CUDA): the number of tags T must be in [1, ",
              kCrfCudaMaxTags, "], got ", t, " (", first_name, " ", first.sizes(), ")");
  TORCH_CHECK(first.size(0) <= INT32_MAX && first.size(1) <= INT32_MAX, "CRF (native CUDA): batch size and sequence "
              "length must be < 2^31, got ", first.sizes());
  TORCH_CHECK(at::isFloatingType(end.scalar_type()), "CRF: end must be a float tensor, got ", end.scalar_type());
  TORCH_CHECK(at::isFloatingType(transitions.scalar_type()), "CRF: transitions must be a float tensor, got ",
              transitions.scalar_type());
}

void check_start(const at::Tensor& start, const at::Tensor& emissions) {
  check_device(start, emissions.device(), "start");
  check_shape(start, {emissions.size(2)}, "start");
  TORCH_CHECK(at::isFloatingType(start.scalar_type()), "CRF: start must be a float tensor, got ", start.scalar_type());
}

CrfDtype dtype_code(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat:
      return CrfDtype::kFloat32;
    case at::kHalf:
      return CrfDtype::kFloat16;
    case at::kBFloat16:
      return CrfDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "CRF (native CUDA): ", name, " must be fp32, fp16, bf16 or fp64, got ", dtype);
  }
}

// Emissions as the kernels read them: fp32 / fp16 / bf16 (fp64 rounded to fp32), last-dim stride 1.
at::Tensor kernel_emissions(const at::Tensor& emissions) {
  const at::Tensor e = emissions.scalar_type() == at::kDouble ? emissions.to(at::kFloat) : emissions;
  return e.stride(2) == 1 ? e : e.contiguous();
}

at::Tensor fp32(const at::Tensor& p) { return p.to(at::kFloat).contiguous(); }  // shape kept; a no-op when fp32

const uint8_t* mask_data(const at::Tensor& mask) { return static_cast<const uint8_t*>(mask.data_ptr()); }  // bool

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }  // under the device guard

std::tuple<at::Tensor, at::Tensor> crf_forward_cuda(const at::Tensor& emissions,
                                                    const std::optional<at::Tensor>& tags, const at::Tensor& mask,
                                                    const at::Tensor& start, const at::Tensor& end,
                                                    const at::Tensor& transitions) {
  check_crf_cuda(emissions, "emissions", mask, end, transitions, tags);
  check_start(start, emissions);
  const c10::cuda::CUDAGuard guard(emissions.device());
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2);
  const auto f32 = emissions.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B}, f32);          // shape: (B,)
  at::Tensor alpha = at::empty({B, n, T}, f32);  // shape: (B, n, T)
  if (B == 0) return {out, alpha};
  const at::Tensor em = kernel_emissions(emissions);  // shape: (B, n, T), last-dim stride 1
  const at::Tensor start_f = fp32(start), end_f = fp32(end), trans_f = fp32(transitions);
  C10_CUDA_CHECK(launch_crf_forward(
      em.data_ptr(), dtype_code(em.scalar_type(), "emissions"), em.stride(0), em.stride(1),
      tags ? tags->data_ptr<int64_t>() : nullptr, tags ? tags->stride(0) : 0, tags ? tags->stride(1) : 0,
      mask_data(mask), mask.stride(0), mask.stride(1), start_f.data_ptr<float>(), end_f.data_ptr<float>(),
      trans_f.data_ptr<float>(), out.data_ptr<float>(), alpha.data_ptr<float>(), B, n, T, current_stream()));
  return {out, alpha};
}

std::tuple<at::Tensor, at::Tensor> crf_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& tags,
                                                     const at::Tensor& mask, const at::Tensor& end,
                                                     const at::Tensor& transitions, const at::Tensor& alpha,
                                                     at::ScalarType grad_dtype) {
  check_crf_cuda(alpha, "alpha", mask, end, transitions, tags);
  TORCH_CHECK(alpha.scalar_type() == at::kFloat, "CRF: alpha must be fp32, got ", alpha.scalar_type());
  check_device(grad, alpha.device(), "grad");
  check_shape(grad, {alpha.size(0)}, "grad");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "CRF: grad must be a float tensor, got ", grad.scalar_type());
  // fp64 emissions' gradient: computed in fp32 and widened, as the CPU kernels do
  const at::ScalarType out_dtype = grad_dtype == at::kDouble ? at::kFloat : grad_dtype;
  const CrfDtype out_code = dtype_code(out_dtype, "grad_dtype");
  const c10::cuda::CUDAGuard guard(alpha.device());
  const int64_t B = alpha.size(0), n = alpha.size(1), T = alpha.size(2);
  at::Tensor g_em = at::empty({B, n, T}, alpha.options().dtype(out_dtype));            // shape: (B, n, T)
  at::Tensor g_par = at::empty({B, 2 * T + T * T}, alpha.options().dtype(at::kFloat));  // shape: (B, 2T + T*T)
  if (B > 0) {
    const at::Tensor grad_f = grad.to(at::kFloat);  // shape: (B,), keeps its stride (an expanded scalar: 0)
    const at::Tensor alpha_c = alpha.contiguous(), end_f = fp32(end), trans_f = fp32(transitions);
    C10_CUDA_CHECK(launch_crf_backward(
        grad_f.data_ptr<float>(), grad_f.stride(0), tags ? tags->data_ptr<int64_t>() : nullptr,
        tags ? tags->stride(0) : 0, tags ? tags->stride(1) : 0, mask_data(mask), mask.stride(0), mask.stride(1),
        end_f.data_ptr<float>(), trans_f.data_ptr<float>(), alpha_c.data_ptr<float>(), g_em.data_ptr(), out_code,
        g_par.data_ptr<float>(), B, n, T, current_stream()));
  }
  return {out_dtype == grad_dtype ? g_em : g_em.to(grad_dtype), g_par};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cuda(const at::Tensor& emissions, const at::Tensor& mask,
                                                    const at::Tensor& start, const at::Tensor& end,
                                                    const at::Tensor& transitions) {
  check_crf_cuda(emissions, "emissions", mask, end, transitions, std::nullopt);
  check_start(start, emissions);
  const c10::cuda::CUDAGuard guard(emissions.device());
  const int64_t B = emissions.size(0), n = emissions.size(1), T = emissions.size(2);
  const auto i64 = emissions.options().dtype(at::kLong);
  at::Tensor best = at::empty({B, n}, i64);  // shape: (B, n)
  at::Tensor lengths = at::empty({B}, i64);  // shape: (B,)
  if (B == 0) return {best, lengths};
  const at::Tensor em = kernel_emissions(emissions);                            // shape: (B, n, T)
  at::Tensor bp = at::empty({B, n, T}, emissions.options().dtype(at::kByte));  // shape: (B, n, T) back-pointers
  const at::Tensor start_f = fp32(start), end_f = fp32(end), trans_f = fp32(transitions);
  C10_CUDA_CHECK(launch_crf_viterbi(em.data_ptr(), dtype_code(em.scalar_type(), "emissions"), em.stride(0),
                                    em.stride(1), mask_data(mask), mask.stride(0), mask.stride(1),
                                    start_f.data_ptr<float>(), end_f.data_ptr<float>(), trans_f.data_ptr<float>(),
                                    bp.data_ptr<uint8_t>(), best.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), B,
                                    n, T, current_stream()));
  return {best, lengths};
}

}  // namespace
}  // namespace tpm_fast

TORCH_LIBRARY_IMPL(tpm_fast_native, CUDA, m) {
  m.impl("crf_forward", &tpm_fast::crf_forward_cuda);
  m.impl("crf_backward", &tpm_fast::crf_backward_cuda);
  m.impl("crf_viterbi", &tpm_fast::crf_viterbi_cuda);
}
