"""Network FLOPs of one forward call, counted the one way the benches count them: torch's FlopCounterMode
(matmuls, convolutions and attention; elementwise work is not counted)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())
