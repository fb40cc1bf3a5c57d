"""Named ranges for profilers: a `torch.profiler` range (Chrome traces, `vdopt profile`) and an NVTX
range in the `vdopt` domain (Nsight Systems), around compile stages, steps and step parts.

NVTX comes from the `nvtx` package, which works on every build (`torch.cuda.nvtx` raises on CPU
builds of torch) and costs a function call when no tool listens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import nvtx
import torch

DOMAIN = "vdopt"


@contextmanager
def named_range(name: str, payload: int | float | None = None) -> Iterator[None]:
    """`payload`: a number Nsight shows with the range (a step's cache decision, a part's flag)."""
    with torch.profiler.record_function(name), nvtx.annotate(name, domain=DOMAIN, payload=payload):
        yield


def mark(name: str, payload: int | float | None = None) -> None:
    """An instant NVTX event, for facts known only after a range closed (rows a cached step recomputed)."""
    nvtx.mark(name, domain=DOMAIN, payload=payload)
