// The vdopt:: custom ops: schemas and CPU kernels. The Python package (vdopt/ops) registers the fake
// kernels and the aten decompositions; cuda/ops/cache_ops.cu holds the CUDA kernels, bound by
// vdopt_ops_cuda.cpp where a CUDA torch exists. Semantics are documented on the decompositions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace vdopt {

using at::Tensor;

void check_rows(const Tensor& tensor, int64_t rows, const char* name) {
  TORCH_CHECK(tensor.dim() >= 1, "vdopt: ", name, " needs at least one dim (rows), got a 0-d tensor");
  TORCH_CHECK(rows == 0 ? tensor.numel() == 0 : tensor.numel() % rows == 0, "vdopt: ", name, " ",
              tensor.sizes(), " does not split into ", rows, " rows");
}

void check_row_vector(const Tensor& tensor, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == rows && tensor.scalar_type() == dtype, "vdopt: ", name,
              " must be a ", c10::toString(dtype), " vector of ", rows, " rows, got ", tensor.scalar_type(), " ",
              tensor.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cache_decision_cpu(
    const Tensor& probe, const Tensor& prev, const Tensor& accumulated, const Tensor& forced,
    const Tensor& coefficients, double threshold) {
  const int64_t rows = forced.size(0);
  TORCH_CHECK(probe.sizes() == prev.sizes() && probe.scalar_type() == prev.scalar_type(),
              "vdopt::cache_decision: probe ", probe.sizes(), " and prev ", prev.sizes(), " differ");
  check_rows(probe, rows, "probe");
  check_row_vector(forced, rows, at::kBool, "forced");
  check_row_vector(accumulated, rows, at::kFloat, "accumulated");
  TORCH_CHECK(coefficients.dim() == 1 && coefficients.scalar_type() == at::kFloat,
              "vdopt::cache_decision: coefficients must be a float32 vector");
  const Tensor probe_c = probe.contiguous(), prev_c = prev.contiguous(), coef = coefficients.contiguous();
  const Tensor acc_c = accumulated.contiguous(), forced_c = forced.contiguous();
  Tensor mask = at::empty({rows}, forced.options());
  Tensor value = at::empty({rows}, accumulated.options());
  Tensor accumulated_next = at::empty({rows}, accumulated.options());
  Tensor prev_next = at::empty_like(prev_c);
  const int64_t width = rows == 0 ? 0 : probe.numel() / rows;
  const float* c = coef.data_ptr<float>();
  const int64_t degree = coef.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probe.scalar_type(), "vdopt::cache_decision", [&] {
    const scalar_t* now = probe_c.data_ptr<scalar_t>();
    const scalar_t* before = prev_c.data_ptr<scalar_t>();
    scalar_t* out = prev_next.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* a = now + r * width;
        const scalar_t* b = before + r * width;
        double changed = 0, size = 0;
        for (int64_t k = 0; k < width; ++k) {
          const float bk = static_cast<float>(b[k]);
          changed += std::abs(static_cast<float>(a[k]) - bk);
          size += std::abs(bk);
        }
        // mean(|a - b|) / max(mean(|b|), 1e-12), NaN kept (a NaN probe never decides a recompute by itself)
        const float mean_size = static_cast<float>(size / width);
        const float distance = static_cast<float>(changed / width) / (std::isnan(mean_size) ? mean_size : std::max(mean_size, 1e-12f));
        float rescaled = 0.f;
        for (int64_t d = 0; d < degree; ++d) rescaled = rescaled * distance + c[d];
        const float total = acc_c.data_ptr<float>()[r] + rescaled;
        const bool due = (total >= threshold) || forced_c.data_ptr<bool>()[r];
        mask.data_ptr<bool>()[r] = due;
        value.data_ptr<float>()[r] = total;
        accumulated_next.data_ptr<float>()[r] = due ? 0.f : total;
        std::copy(due ? a : b, (due ? a : b) + width, out + r * width);
      }
    });
  });
  Tensor any = mask.any();
  return {mask, any, value, accumulated_next, prev_next.view(prev.sizes())};
}

Tensor taylor_forecast_cpu(const Tensor& cache, const Tensor& previous, const Tensor& weight) {
  const int64_t rows = weight.size(0);
  TORCH_CHECK(cache.sizes() == previous.sizes() && cache.scalar_type() == previous.scalar_type(),
              "vdopt::taylor_forecast: cache ", cache.sizes(), " and previous ", previous.sizes(), " differ");
  check_rows(cache, rows, "cache");
  check_row_vector(weight, rows, at::kFloat, "weight");
  const Tensor cache_c = cache.contiguous(), previous_c = previous.contiguous(), weight_c = weight.contiguous();
  Tensor out = at::empty_like(cache_c);
  const int64_t width = rows == 0 ? 0 : cache.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "vdopt::taylor_forecast", [&] {
    const scalar_t* k = cache_c.data_ptr<scalar_t>();
    const scalar_t* j = previous_c.data_ptr<scalar_t>();
    const float* w = weight_c.data_ptr<float>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * width, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end;) {
        const int64_t row = e / width, row_end = std::min(end, (row + 1) * width);
        const scalar_t w_row = static_cast<scalar_t>(w[row]);
        for (; e < row_end; ++e) {  // rounded like aten's three elementwise ops in the cache dtype: k + (k - j) * w
          const scalar_t step = static_cast<scalar_t>(k[e] - j[e]);
          o[e] = static_cast<scalar_t>(k[e] + static_cast<scalar_t>(step * w_row));
        }
      }
    });
  });
  return out.view(cache.sizes());
}

// Mean and 1/std of a line in float with 16 independent partial sums (which the compiler vectorises; one running
// sum would be a dependency chain), two passes like aten's layer_norm.
template <typename scalar_t>
void line_moments(const scalar_t* v, int64_t width, double eps, float& mean, float& rstd) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= width; k += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] += static_cast<float>(v[k + l]);
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  for (; k < width; ++k) sum += static_cast<float>(v[k]);
  mean = sum / static_cast<float>(width);
  float squares[kLanes] = {};
  for (k = 0; k + kLanes <= width; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = static_cast<float>(v[k + l]) - mean;
      squares[l] += d * d;
    }
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += squares[l];
  for (; k < width; ++k) {
    const float d = static_cast<float>(v[k]) - mean;
    total += d * d;
  }
  rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(total) / width + eps));
}

// x [rows, tokens, width]; scale and shift [rows or 1, tokens or 1, width]: broadcast like aten's mul and add.
Tensor layer_norm_modulate_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, double eps) {
  TORCH_CHECK(x.dim() == 3, "vdopt::layer_norm_modulate: x must be [rows, tokens, width], got ", x.sizes());
  const int64_t rows = x.size(0), tokens = x.size(1), width = x.size(2);
  for (const Tensor* t : {&scale, &shift}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == rows || t->size(0) == 1) && (t->size(1) == tokens || t->size(1) == 1) &&
                    t->size(2) == width && t->scalar_type() == x.scalar_type(),
                "vdopt::layer_norm_modulate: scale and shift must be [", rows, " or 1, ", tokens, " or 1, ", width, "] of ",
                x.scalar_type(), ", got ", t->scalar_type(), " ", t->sizes());
  }
  const Tensor x_c = x.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  Tensor out = at::empty_like(x_c);
  const int64_t scale_rows = scale.size(0) == 1 ? 0 : 1, scale_tokens = scale.size(1) == 1 ? 0 : 1;
  const int64_t shift_rows = shift.size(0) == 1 ? 0 : 1, shift_tokens = shift.size(1) == 1 ? 0 : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vdopt::layer_norm_modulate", [&] {
    const scalar_t* in = x_c.data_ptr<scalar_t>();
    const scalar_t* sc = scale_c.data_ptr<scalar_t>();
    const scalar_t* sh = shift_c.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line) {
        const int64_t r = line / tokens, n = line % tokens;
        const scalar_t* v = in + line * width;
        float mean_f = 0.f, rstd = 0.f;
        line_moments(v, width, eps, mean_f, rstd);
        const scalar_t* s = sc + ((r * scale_rows) * scale.size(1) + n * scale_tokens) * width;
        const scalar_t* t = sh + ((r * shift_rows) * shift.size(1) + n * shift_tokens) * width;
        for (int64_t k = 0; k < width; ++k) {  // rounded like aten: layer_norm, 1 + scale, mul, add in the dtype
          const scalar_t normed = static_cast<scalar_t>((static_cast<float>(v[k]) - mean_f) * rstd);
          const scalar_t gain = static_cast<scalar_t>(static_cast<float>(s[k]) + 1.f);
          o[line * width + k] = static_cast<scalar_t>(static_cast<scalar_t>(normed * gain) + t[k]);
        }
      }
    });
  });
  return out;
}

}  // namespace vdopt

TORCH_LIBRARY(vdopt, m) {
  m.def("cache_decision(Tensor probe, Tensor prev, Tensor accumulated, Tensor forced, "
        "Tensor coefficients, float threshold) -> (Tensor mask, Tensor any, Tensor value, Tensor accumulated_next, "
        "Tensor prev_next)");
  m.def("taylor_forecast(Tensor cache, Tensor previous, Tensor weight) -> Tensor");
  m.def("layer_norm_modulate(Tensor x, Tensor scale, Tensor shift, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(vdopt, CPU, m) {
  m.impl("cache_decision", &vdopt::cache_decision_cpu);
  m.impl("taylor_forecast", &vdopt::taylor_forecast_cpu);
  m.impl("layer_norm_modulate", &vdopt::layer_norm_modulate_cpu);
}
