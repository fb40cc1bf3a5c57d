"""What lowering CPU convolutions as oneDNN's gains (`vdopt.lower.aoti.convolution_as_onednn`), side by side.

At a batch of one PyTorch's CPU convolution runs small 3x3 filters with its native unfold + GEMM kernel
(`ConvParams::use_mkldnn`: "for some case, native is faster"). Two measurements:
- each convolution shape of the CMD decoder at batch 1, eager: `F.conv3d` (PyTorch's choice) against oneDNN's
  (`mkldnn._convolution_pointwise`), best of 5 rounds of `--calls` calls each;
- the CMD bundle compiled for AOTInductor with the rewrite and without it (`bench/aoti_rewrites.py`): the same clips in
  interleaved rounds, seconds per clip, milliseconds per stage, and how far apart the two bundles' clips are.
Writes JSON.

    python bench/onednn_convolution.py [--recipe recipes/cmd_reference.yaml] [--rounds 10] [--calls 200]
        [--json bench/results/onednn_convolution.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aoti_rewrites import compare_rewrite, print_row
from e2e import ROOT
from results_file import write_results
from vdopt.cmd.model import load_cmd
from vdopt.lower import aoti


def best_ms(call, calls: int) -> float:
    for _ in range(10):
        call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds) * 1e3


@torch.no_grad()
def eager_rows(weights: Path, calls: int) -> list[dict]:
    """Each 3-D convolution of the decoder at the decode's sizes (batch 1), PyTorch's kernel against oneDNN's."""
    autoencoder = load_cmd(weights)[0]
    shapes = {}

    def record(module, inputs, _):
        shapes.setdefault(module, inputs[0].shape)

    hooks = [m.register_forward_hook(record) for m in autoencoder.modules() if isinstance(m, torch.nn.Conv3d)]
    size = autoencoder.patch * 8
    autoencoder.decode(torch.randn(1, autoencoder.channels, size, size), torch.randn(1, autoencoder.motion_channels, 8, 1, 16))
    for hook in hooks:
        hook.remove()
    rows = []
    for conv, shape in shapes.items():
        x = torch.randn(shape)
        args = (conv.padding, conv.stride, conv.dilation, conv.groups)
        native = best_ms(lambda: F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups), calls)
        onednn = best_ms(lambda: torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args, "none", [None], ""), calls)
        rows.append({"input": list(shape), "weight": list(conv.weight.shape), "pytorch_ms": round(native, 4),
                     "onednn_ms": round(onednn, 4), "ratio": round(native / onednn, 2)})
        print(f"conv3d {list(shape)} * {list(conv.weight.shape)}: PyTorch {native:.3f} ms, oneDNN {onednn:.3f} ms "
              f"({native / onednn:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/cmd_reference.yaml")
    parser.add_argument("--weights", default="vdopt/reference/weights/cmd.safetensors", help="the recipe's CMD weights")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200, help="calls per round of each eager convolution")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "onednn_convolution.json"))
    args = parser.parse_args()
    os.chdir(ROOT)

    convolutions = eager_rows(Path(args.weights), args.calls)
    row = compare_rewrite(args.recipe, aoti.convolution_as_onednn, args.rounds)
    print_row("oneDNN convolutions", row)
    load_start, load_end = row.pop("load_average")
    write_results(args.json, {**row, "batch": 1, "rounds": args.rounds, "eager_convolutions": convolutions}, load_start, load_end)


if __name__ == "__main__":
    main()
