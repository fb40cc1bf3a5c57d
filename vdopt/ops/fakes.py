"""Fake kernels of vdopt's ops (shapes and dtypes only) for export; registered once the op library, which
defines the schemas, is loaded (`vdopt.ops.load_library`)."""

import torch


@torch.library.register_fake("vdopt::cache_decision")
def _cache_decision_fake(probe, prev, accumulated, forced, coefficients, threshold):
    torch._check(probe.shape == prev.shape)
    return (forced.new_empty(forced.shape), forced.new_empty(()), accumulated.new_empty(accumulated.shape),
            accumulated.new_empty(accumulated.shape), prev.new_empty(prev.shape))


@torch.library.register_fake("vdopt::taylor_forecast")
def _taylor_forecast_fake(cache, previous, weight):
    torch._check(cache.shape == previous.shape)
    return cache.new_empty(cache.shape)


@torch.library.register_fake("vdopt::layer_norm_modulate")
def _layer_norm_modulate_fake(x, scale, shift, eps):
    return x.new_empty(x.shape)
