// CUDA kernels of vdopt's cache ops (cache_ops.h). Reductions accumulate in float; elementwise results are
// rounded in the tensor's dtype after each operation, like aten's elementwise ops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cache_ops.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per row: both sums in one pass over the probe, the decision in thread 0, then the row of prev_next.
template <typename T>
__global__ void __launch_bounds__(kThreads) cache_decision_kernel(
    const T* __restrict__ probe, const T* __restrict__ prev, const float* __restrict__ accumulated,
    const bool* __restrict__ forced, const float* __restrict__ coefficients, int64_t degree, float threshold,
    int64_t width, bool* __restrict__ mask, bool* __restrict__ any, float* __restrict__ value,
    float* __restrict__ accumulated_next, T* __restrict__ prev_next) {
  const int64_t row = blockIdx.x;
  const T* a = probe + row * width;
  const T* b = prev + row * width;
  float changed = 0.f, size = 0.f;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    const float bk = to_float(b[k]);
    changed += fabsf(to_float(a[k]) - bk);
    size += fabsf(bk);
  }
  __shared__ float partial[2][kThreads / 32];
  __shared__ bool due;
  changed = warp_sum(changed);
  size = warp_sum(size);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    partial[0][warp] = changed;
    partial[1][warp] = size;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    changed = size = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) {
      changed += partial[0][w];
      size += partial[1][w];
    }
    const float mean_size = size / static_cast<float>(width);
    const float distance = (changed / static_cast<float>(width)) / (isnan(mean_size) ? mean_size : fmaxf(mean_size, 1e-12f));
    float rescaled = 0.f;
    for (int64_t d = 0; d < degree; ++d) rescaled = __fadd_rn(__fmul_rn(rescaled, distance), coefficients[d]);
    const float total = accumulated[row] + rescaled;
    due = (total >= threshold) || forced[row];
    mask[row] = due;
    value[row] = total;
    accumulated_next[row] = due ? 0.f : total;
    if (due) *any = true;  // every writer writes true; `any` was cleared before the launch
  }
  __syncthreads();
  const T* source = due ? a : b;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) prev_next[row * width + k] = source[k];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) taylor_forecast_kernel(const T* __restrict__ cache, const T* __restrict__ previous,
                                                                   const float* __restrict__ weight, int64_t width,
                                                                   int64_t total, T* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // _rn intrinsics: no fused multiply-add, so each operation rounds as the CPU kernel's does
    const float k = to_float(cache[e]);
    const float step = to_float(from_float<T>(__fsub_rn(k, to_float(previous[e]))));
    const float moved = to_float(from_float<T>(__fmul_rn(step, to_float(from_float<T>(weight[e / width])))));
    out[e] = from_float<T>(__fadd_rn(k, moved));
  }
}

// One block per (row, token) line: mean, then variance around it (two passes, float sums), then the modulated output.
template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_modulate_kernel(
    const T* __restrict__ x, const T* __restrict__ scale, const T* __restrict__ shift, int64_t tokens, int64_t width,
    int64_t scale_rows, int64_t scale_tokens, int64_t shift_rows, int64_t shift_tokens, float eps, T* __restrict__ out) {
  const int64_t line = blockIdx.x, row = line / tokens, token = line % tokens;
  const T* v = x + line * width;
  __shared__ float partial[kThreads / 32];
  __shared__ float mean, rstd;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float sum = 0.f;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) sum += to_float(v[k]);
  sum = warp_sum(sum);
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    mean = total / static_cast<float>(width);
  }
  __syncthreads();
  float squares = 0.f;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    const float d = to_float(v[k]) - mean;
    squares += d * d;
  }
  squares = warp_sum(squares);
  __syncthreads();  // every thread has read `partial` for the mean
  if (lane == 0) partial[warp] = squares;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    rstd = rsqrtf(total / static_cast<float>(width) + eps);
  }
  __syncthreads();
  const T* s = scale + ((row * scale_rows) * (scale_tokens ? tokens : 1) + token * scale_tokens) * width;
  const T* t = shift + ((row * shift_rows) * (shift_tokens ? tokens : 1) + token * shift_tokens) * width;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    const float normed = to_float(from_float<T>(__fmul_rn(to_float(v[k]) - mean, rstd)));
    const float gain = to_float(from_float<T>(__fadd_rn(to_float(s[k]), 1.f)));
    out[line * width + k] = from_float<T>(__fadd_rn(to_float(from_float<T>(__fmul_rn(normed, gain))), to_float(t[k])));
  }
}

template <typename T>
int launch_layer_norm_modulate(const void* x, const void* scale, const void* shift, int64_t rows, int64_t tokens,
                               int64_t width, int64_t scale_rows, int64_t scale_tokens, int64_t shift_rows,
                               int64_t shift_tokens, float eps, void* out, cudaStream_t stream) {
  if (rows * tokens == 0) return cudaSuccess;
  layer_norm_modulate_kernel<T><<<static_cast<unsigned>(rows * tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<const T*>(shift), tokens, width,
      scale_rows > 1 ? 1 : 0, scale_tokens > 1 ? 1 : 0, shift_rows > 1 ? 1 : 0, shift_tokens > 1 ? 1 : 0, eps,
      static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
int launch_cache_decision(const void* probe, const void* prev, const float* accumulated, const bool* forced,
                          const float* coefficients, int64_t degree, float threshold, int64_t rows, int64_t width,
                          bool* mask, bool* any, float* value, float* accumulated_next, void* prev_next, cudaStream_t stream) {
  cudaError_t status = cudaMemsetAsync(any, 0, sizeof(bool), stream);
  if (status != cudaSuccess || rows == 0) return status;
  cache_decision_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(probe), static_cast<const T*>(prev), accumulated, forced, coefficients, degree, threshold,
      width, mask, any, value, accumulated_next, static_cast<T*>(prev_next));
  return cudaGetLastError();
}

template <typename T>
int launch_taylor_forecast(const void* cache, const void* previous, const float* weight, int64_t rows, int64_t width,
                           void* out, cudaStream_t stream) {
  const int64_t total = rows * width;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  taylor_forecast_kernel<T><<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), kThreads, 0, stream>>>(
      static_cast<const T*>(cache), static_cast<const T*>(previous), weight, width, total, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

extern "C" int vdopt_cache_decision(int dtype, const void* probe, const void* prev, const float* accumulated,
                                    const bool* forced, const float* coefficients, int64_t degree, float threshold,
                                    int64_t rows, int64_t width, bool* mask, bool* any, float* value,
                                    float* accumulated_next, void* prev_next, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VDOPT_FLOAT32:
      return launch_cache_decision<float>(probe, prev, accumulated, forced, coefficients, degree, threshold, rows, width,
                                          mask, any, value, accumulated_next, prev_next, s);
    case VDOPT_FLOAT16:
      return launch_cache_decision<__half>(probe, prev, accumulated, forced, coefficients, degree, threshold, rows, width,
                                           mask, any, value, accumulated_next, prev_next, s);
    case VDOPT_BFLOAT16:
      return launch_cache_decision<__nv_bfloat16>(probe, prev, accumulated, forced, coefficients, degree, threshold, rows,
                                                  width, mask, any, value, accumulated_next, prev_next, s);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int vdopt_layer_norm_modulate(int dtype, const void* x, const void* scale, const void* shift, int64_t rows,
                                         int64_t tokens, int64_t width, int64_t scale_rows, int64_t scale_tokens,
                                         int64_t shift_rows, int64_t shift_tokens, float eps, void* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VDOPT_FLOAT32:
      return launch_layer_norm_modulate<float>(x, scale, shift, rows, tokens, width, scale_rows, scale_tokens, shift_rows,
                                               shift_tokens, eps, out, s);
    case VDOPT_FLOAT16:
      return launch_layer_norm_modulate<__half>(x, scale, shift, rows, tokens, width, scale_rows, scale_tokens, shift_rows,
                                                shift_tokens, eps, out, s);
    case VDOPT_BFLOAT16:
      return launch_layer_norm_modulate<__nv_bfloat16>(x, scale, shift, rows, tokens, width, scale_rows, scale_tokens,
                                                       shift_rows, shift_tokens, eps, out, s);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int vdopt_taylor_forecast(int dtype, const void* cache, const void* previous, const float* weight, int64_t rows,
                                     int64_t width, void* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VDOPT_FLOAT32:
      return launch_taylor_forecast<float>(cache, previous, weight, rows, width, out, s);
    case VDOPT_FLOAT16:
      return launch_taylor_forecast<__half>(cache, previous, weight, rows, width, out, s);
    case VDOPT_BFLOAT16:
      return launch_taylor_forecast<__nv_bfloat16>(cache, previous, weight, rows, width, out, s);
    default:
      return cudaErrorInvalidValue;
  }
}
