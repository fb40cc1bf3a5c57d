"""The aten decompositions of vdopt's ops: their meaning, written once.

`ops: aten` programs call these functions inline; `ops: fused` programs call `torch.ops.vdopt.*`, whose
C++, CUDA, ONNX and TensorRT forms are all tested against these.
"""

from __future__ import annotations

import torch


def by_row(tensor: torch.Tensor, rows) -> torch.Tensor:
    """[rows, rest] (an empty tensor has no `-1` to infer)."""
    return tensor.reshape(rows, -1) if tensor.numel() else tensor.reshape(rows, 0)


def cache_decision(probe: torch.Tensor, prev: torch.Tensor, accumulated: torch.Tensor, forced: torch.Tensor,
                   coefficients: torch.Tensor, threshold: float):
    """A cache's per-row decision in one pass over the probe.

    Rows are the leading `forced.shape[0]` slices of `probe` (sample-major). Per row r:
      distance = mean|probe_r - prev_r| / max(mean|prev_r|, 1e-12)  (float32, whatever the probe dtype)
      value    = accumulated_r + poly(coefficients)(distance)        (Horner, highest degree first)
      mask_r   = value >= threshold or forced_r                      (a NaN probe never decides by itself)
    Returns (mask, any(mask), value, accumulated_next = 0 where mask else value,
             prev_next = probe_r where mask else prev_r).
    """
    rows = forced.shape[0]
    now, before = by_row(probe, rows).float(), by_row(prev, rows).float()
    distance = (now - before).abs().mean(1) / before.abs().mean(1).clamp(min=1e-12)
    rescaled = torch.zeros_like(distance)
    for k in range(coefficients.shape[0]):
        rescaled = rescaled * distance + coefficients[k]
    value = accumulated + rescaled
    mask = (value >= threshold) | forced
    prev_next = torch.where(mask[:, None], by_row(probe, rows), by_row(prev, rows)).reshape(prev.shape)
    return mask, mask.any(), value, torch.where(mask, torch.zeros_like(value), value), prev_next


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN's modulate fused with its LayerNorm: `layer_norm(x) * (1 + scale) + shift` over the last dim, without
    affine weights; x [rows, tokens, width], scale and shift [rows or 1, tokens or 1, width] (DiT, Latte, PixArt)."""
    return torch.nn.functional.layer_norm(x, [x.shape[-1]], eps=eps) * (scale + 1) + shift


def taylor_forecast(cache: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`cache + (cache - previous) * weight_r` per row (rows: the leading `weight.shape[0]` slices, sample-major),
    in the cache's dtype: a cached residual moved along its first-order forecast."""
    rows = weight.shape[0]
    step = by_row(cache - previous, rows) * weight.to(cache.dtype)[:, None]
    return cache + step.reshape(cache.shape)
