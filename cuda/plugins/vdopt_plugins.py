"""vdopt's ops as TensorRT plugins (QDP, `tensorrt.plugin`), registered as `vdopt::cache_decision`,
`vdopt::taylor_forecast` and `vdopt::layer_norm_modulate`.

Why QDP rather than a hand-written IPluginV3: the descriptor and the launch are ten lines each, TensorRT
serialises the attributes, and the kernels are the same `extern "C"` launchers (cuda/ops/cache_ops.h) the torch
binding calls, loaded from a library nvcc builds once (`vdopt.ops.kernel_library`). TensorRT's ONNX parser maps
a `trt.plugins` node whose op type is the plugin name and whose `plugin_namespace` attribute is `vdopt` to
these (vdopt.ops.onnx writes such nodes). Importing this module registers them; it needs the TensorRT
libraries (a GPU machine), so nothing imports it on the CPU. It is written against TensorRT 10.8+ and has
not run here: this machine has no TensorRT (research/cpp_cuda_profile.md).
"""

from __future__ import annotations

import ctypes

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp

from vdopt.ops import kernel_library

DTYPES = {trt.float32: 0, trt.float16: 1, trt.bfloat16: 2}  # cache_ops.h: VDOPT_FLOAT32, VDOPT_FLOAT16, VDOPT_BFLOAT16

_kernels = ctypes.CDLL(str(kernel_library()))
_kernels.vdopt_cache_decision.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_float,
                                          ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 6]
_kernels.vdopt_taylor_forecast.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_void_p, ctypes.c_void_p]
_kernels.vdopt_layer_norm_modulate.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 7, ctypes.c_float,
                                               ctypes.c_void_p, ctypes.c_void_p]


def checked(status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"vdopt::{op}: the CUDA launch failed with cudaError {status}")


@trtp.register("vdopt::cache_decision")
def cache_decision_desc(probe: trtp.TensorDesc, prev: trtp.TensorDesc, accumulated: trtp.TensorDesc, forced: trtp.TensorDesc,
                        coefficients: trtp.TensorDesc, threshold: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc,
                                                                                  trtp.TensorDesc, trtp.TensorDesc,
                                                                                  trtp.TensorDesc]:
    rows = forced.shape_expr
    return (trtp.from_shape_expr(rows, dtype=trt.bool), trtp.from_shape_expr((), dtype=trt.bool),
            accumulated.like(), accumulated.like(), prev.like())


@trtp.impl("vdopt::cache_decision")
def cache_decision_impl(probe: trtp.Tensor, prev: trtp.Tensor, accumulated: trtp.Tensor, forced: trtp.Tensor,
                        coefficients: trtp.Tensor, threshold: float, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    mask, any_due, value, accumulated_next, prev_next = outputs
    rows = forced.shape[0]
    width = probe.numel() // rows if rows else 0
    checked(_kernels.vdopt_cache_decision(DTYPES[probe.dtype], probe.data_ptr, prev.data_ptr, accumulated.data_ptr,
                                          forced.data_ptr, coefficients.data_ptr, coefficients.numel(), np.float32(threshold),
                                          rows, width, mask.data_ptr, any_due.data_ptr, value.data_ptr,
                                          accumulated_next.data_ptr, prev_next.data_ptr, stream), "cache_decision")


@trtp.register("vdopt::taylor_forecast")
def taylor_forecast_desc(cache: trtp.TensorDesc, previous: trtp.TensorDesc, weight: trtp.TensorDesc) -> trtp.TensorDesc:
    return cache.like()


@trtp.impl("vdopt::taylor_forecast")
def taylor_forecast_impl(cache: trtp.Tensor, previous: trtp.Tensor, weight: trtp.Tensor, outputs: tuple[trtp.Tensor],
                         stream: int) -> None:
    rows = weight.shape[0]
    checked(_kernels.vdopt_taylor_forecast(DTYPES[cache.dtype], cache.data_ptr, previous.data_ptr, weight.data_ptr, rows,
                                           cache.numel() // rows if rows else 0, outputs[0].data_ptr, stream),
            "taylor_forecast")


@trtp.register("vdopt::layer_norm_modulate")
def layer_norm_modulate_desc(x: trtp.TensorDesc, scale: trtp.TensorDesc, shift: trtp.TensorDesc, eps: float) -> trtp.TensorDesc:
    return x.like()


@trtp.impl("vdopt::layer_norm_modulate")
def layer_norm_modulate_impl(x: trtp.Tensor, scale: trtp.Tensor, shift: trtp.Tensor, eps: float, outputs: tuple[trtp.Tensor],
                             stream: int) -> None:
    rows, tokens, width = x.shape
    checked(_kernels.vdopt_layer_norm_modulate(DTYPES[x.dtype], x.data_ptr, scale.data_ptr, shift.data_ptr, rows, tokens, width,
                                               scale.shape[0], scale.shape[1], shift.shape[0], shift.shape[1],
                                               np.float32(eps), outputs[0].data_ptr, stream), "layer_norm_modulate")
