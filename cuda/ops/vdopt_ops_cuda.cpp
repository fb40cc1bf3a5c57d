// The torch binding of the CUDA kernels (cache_ops.cu): CUDA kernels for the ops that vdopt_ops.cpp defines.
// Built only against a CUDA torch (vdopt.ops.build_library); the kernels themselves need no torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cache_ops.h"

namespace vdopt {

using at::Tensor;

int dtype_code(const Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return VDOPT_FLOAT32;
    case at::kHalf: return VDOPT_FLOAT16;
    case at::kBFloat16: return VDOPT_BFLOAT16;
    default: TORCH_CHECK(false, "vdopt: the CUDA kernels take float32, float16 or bfloat16, got ", tensor.scalar_type());
  }
}

void check_launch(int status, const char* op) {
  TORCH_CHECK(status == 0, "vdopt::", op, ": the CUDA launch failed with cudaError ", status);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cache_decision_cuda(
    const Tensor& probe, const Tensor& prev, const Tensor& accumulated, const Tensor& forced, const Tensor& coefficients,
    double threshold) {
  const int64_t rows = forced.size(0);
  TORCH_CHECK(probe.sizes() == prev.sizes() && probe.scalar_type() == prev.scalar_type(),
              "vdopt::cache_decision: probe ", probe.sizes(), " and prev ", prev.sizes(), " differ");
  TORCH_CHECK(rows == 0 ? probe.numel() == 0 : probe.numel() % rows == 0, "vdopt::cache_decision: probe ", probe.sizes(),
              " does not split into ", rows, " rows");
  TORCH_CHECK(accumulated.scalar_type() == at::kFloat && forced.scalar_type() == at::kBool &&
                  coefficients.scalar_type() == at::kFloat && accumulated.numel() == rows,
              "vdopt::cache_decision: accumulated (float32), forced (bool) and coefficients (float32) do not match");
  const c10::cuda::CUDAGuard guard(probe.device());
  const Tensor probe_c = probe.contiguous(), prev_c = prev.contiguous(), acc_c = accumulated.contiguous();
  const Tensor forced_c = forced.contiguous(), coef = coefficients.to(probe.device()).contiguous();
  Tensor mask = at::empty({rows}, forced.options()), any = at::empty({}, forced.options());
  Tensor value = at::empty({rows}, accumulated.options()), accumulated_next = at::empty({rows}, accumulated.options());
  Tensor prev_next = at::empty_like(prev_c);
  check_launch(vdopt_cache_decision(dtype_code(probe), probe_c.data_ptr(), prev_c.data_ptr(), acc_c.data_ptr<float>(),
                                    forced_c.data_ptr<bool>(), coef.data_ptr<float>(), coef.numel(),
                                    static_cast<float>(threshold), rows, rows == 0 ? 0 : probe.numel() / rows,
                                    mask.data_ptr<bool>(), any.data_ptr<bool>(), value.data_ptr<float>(),
                                    accumulated_next.data_ptr<float>(), prev_next.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "cache_decision");
  return {mask, any, value, accumulated_next, prev_next.view(prev.sizes())};
}

Tensor taylor_forecast_cuda(const Tensor& cache, const Tensor& previous, const Tensor& weight) {
  const int64_t rows = weight.size(0);
  TORCH_CHECK(cache.sizes() == previous.sizes() && cache.scalar_type() == previous.scalar_type() &&
                  weight.scalar_type() == at::kFloat,
              "vdopt::taylor_forecast: cache ", cache.sizes(), ", previous ", previous.sizes(), " or weight do not match");
  TORCH_CHECK(rows == 0 ? cache.numel() == 0 : cache.numel() % rows == 0, "vdopt::taylor_forecast: cache ",
              cache.sizes(), " does not split into ", rows, " rows");
  const c10::cuda::CUDAGuard guard(cache.device());
  const Tensor cache_c = cache.contiguous(), previous_c = previous.contiguous(), weight_c = weight.contiguous();
  Tensor out = at::empty_like(cache_c);
  check_launch(vdopt_taylor_forecast(dtype_code(cache), cache_c.data_ptr(), previous_c.data_ptr(), weight_c.data_ptr<float>(),
                                     rows, rows == 0 ? 0 : cache.numel() / rows, out.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
               "taylor_forecast");
  return out.view(cache.sizes());
}

Tensor layer_norm_modulate_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift, double eps) {
  TORCH_CHECK(x.dim() == 3 && scale.dim() == 3 && shift.dim() == 3 && scale.size(2) == x.size(2) &&
                  shift.size(2) == x.size(2) && scale.scalar_type() == x.scalar_type() &&
                  shift.scalar_type() == x.scalar_type(),
              "vdopt::layer_norm_modulate: x [rows, tokens, width] with scale and shift [rows or 1, tokens or 1, width] "
              "of its dtype, got ", x.sizes(), ", ", scale.sizes(), ", ", shift.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x_c = x.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  Tensor out = at::empty_like(x_c);
  check_launch(vdopt_layer_norm_modulate(dtype_code(x), x_c.data_ptr(), scale_c.data_ptr(), shift_c.data_ptr(), x.size(0),
                                         x.size(1), x.size(2), scale.size(0), scale.size(1), shift.size(0), shift.size(1),
                                         static_cast<float>(eps), out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "layer_norm_modulate");
  return out;
}

}  // namespace vdopt

TORCH_LIBRARY_IMPL(vdopt, CUDA, m) {
  m.impl("cache_decision", &vdopt::cache_decision_cuda);
  m.impl("taylor_forecast", &vdopt::taylor_forecast_cuda);
  m.impl("layer_norm_modulate", &vdopt::layer_norm_modulate_cuda);
}
