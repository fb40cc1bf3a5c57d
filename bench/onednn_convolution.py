"""What lowering CPU convolutions as oneDNN's gains (`vdopt.lower.aoti.convolution_as_onednn`), side by side.

At a batch of one PyTorch's CPU convolution runs small 3x3 filters with its native unfold + GEMM kernel
(`ConvParams::use_mkldnn`: "for some case, native is faster"). Two measurements:
- each convolution shape of the CMD decoder at batch 1, eager: `F.conv3d` (PyTorch's choice) against oneDNN's
  (`mkldnn._convolution_pointwise`), best of 5 rounds of `--calls` calls each;
- the CMD bundle compiled for AOTInductor with the rewrite and without it (the rewrite list without
  `convolution_as_onednn`), the same clips in interleaved rounds: seconds per clip, milliseconds per stage, and how
  far apart the two bundles' clips are.
Writes JSON.

    python bench/onednn_convolution.py [--recipe recipes/cmd_reference.yaml] [--rounds 10] [--calls 200]
        [--json bench/results/onednn_convolution.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from e2e import ROOT, TEACHER, interleaved_rounds, with_batch
from results_file import write_results
from vdopt.cmd.model import load_cmd
from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.lower import aoti
from vdopt.recipe import load_recipe
from vdopt.runtime import Session


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
    prompts, seeds, _ = suite.prompt_set(args.rounds, seed=0)
    without = tuple(r for r in aoti.REWRITES if r[1] is not aoti.convolution_as_onednn)
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-onednn-") as tmp:
        sessions = {}
        for name, rewrites in (("oneDNN convolutions", aoti.REWRITES), ("PyTorch's convolutions", without)):
            path = Path(tmp) / f"{len(sessions)}.vdopt"
            with mock.patch.object(aoti, "REWRITES", rewrites):
                compile_bundle(with_batch(load_recipe(args.recipe), 1), TEACHER, path, verify=False)
            sessions[name] = Session(path)
        encoder = next(iter(sessions.values())).prompt_encoder()
        stage_ms: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
        clips: dict[str, list[torch.Tensor]] = {name: [None] * args.rounds for name in sessions}

        def generate(name: str, k: int) -> float:
            cond, uncond = encoder(prompts[k])
            start = time.perf_counter()
            clips[name][k] = sessions[name].run(cond, uncond, seed=int(seeds[k]), progress=False, on_stage=lambda stage, s:
                                                stage_ms[name].setdefault(stage, []).append(s * 1e3))
            return time.perf_counter() - start

        per_call, load_start, load_end = interleaved_rounds(list(sessions), generate, args.rounds)

    fast, slow = per_call["oneDNN convolutions"], per_call["PyTorch's convolutions"]
    ratios = [b / a for a, b in zip(fast, slow)]
    rows = {name: {"seconds_per_clip": [round(s, 4) for s in per_call[name]], "median": round(statistics.median(per_call[name]), 4),
                   "worst_round": round(max(per_call[name]), 4),
                   "stage_ms_median": {stage: round(statistics.median(ms[1:]), 2) for stage, ms in stage_ms[name].items()}}
            for name in sessions}
    difference = max((a - b).abs().max().item() for a, b in zip(*clips.values()))
    for name, row in rows.items():
        print(f"{name:<24} {row['median']:.4f} s/clip (worst round {row['worst_round']:.4f}), stages {row['stage_ms_median']} ms")
    print(f"oneDNN: {statistics.median(slow) / statistics.median(fast):.2f}x per clip (least round {min(ratios):.2f}x); "
          f"largest difference between the two bundles' clips {difference:.1e}")
    write_results(args.json, {"recipe": args.recipe, "batch": 1, "rounds": args.rounds, "eager_convolutions": convolutions,
                              "bundles": rows, "speedup_median": round(statistics.median(slow) / statistics.median(fast), 3),
                              "speedup_least_round": round(min(ratios), 3), "largest_clip_difference": difference},
                  load_start, load_end)


if __name__ == "__main__":
    main()
