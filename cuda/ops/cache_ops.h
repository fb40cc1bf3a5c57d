// vdopt's cache ops as plain CUDA: kernels behind extern "C" launchers, callable from the torch binding
// (vdopt_ops_cuda.cpp), a TensorRT plugin (cuda/plugins) or the C++ runtime without torch's CUDA headers.
// Semantics: vdopt/ops/decompositions.py. Each launcher enqueues on `stream` (a cudaStream_t) and returns
// the cudaError_t of the launch (0: success). dtype: VDOPT_FLOAT32, VDOPT_FLOAT16 or VDOPT_BFLOAT16.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { VDOPT_FLOAT32 = 0, VDOPT_FLOAT16 = 1, VDOPT_BFLOAT16 = 2 };

// probe, prev, prev_next: rows x width elements of `dtype`, row-major. accumulated, value, accumulated_next:
// float[rows]; forced, mask: bool[rows]; any: one bool; coefficients: float[degree], highest degree first.
int vdopt_cache_decision(int dtype, const void* probe, const void* prev, const float* accumulated, const bool* forced,
                         const float* coefficients, int64_t degree, float threshold, int64_t rows, int64_t width,
                         bool* mask, bool* any, float* value, float* accumulated_next, void* prev_next, void* stream);

// cache, previous, out: rows x width elements of `dtype`; weight: float[rows]. out = cache + (cache - previous) * weight.
int vdopt_taylor_forecast(int dtype, const void* cache, const void* previous, const float* weight, int64_t rows,
                          int64_t width, void* out, void* stream);

// x, out: rows x tokens x width elements of `dtype`; scale, shift: scale_rows x scale_tokens x width (each 1 or
// the full count: broadcast). out = layer_norm(x over width, no affine) * (1 + scale) + shift.
int vdopt_layer_norm_modulate(int dtype, const void* x, const void* scale, const void* shift, int64_t rows, int64_t tokens,
                              int64_t width, int64_t scale_rows, int64_t scale_tokens, int64_t shift_rows,
                              int64_t shift_tokens, float eps, void* out, void* stream);

#ifdef __cplusplus
}
#endif
