"""How much faster than the eager diffusers loop any backend could make a step on this CPU: a roofline.

Per config (bench/backends.py's `teacher` and `wide`): the FLOPs of one guided denoiser step
(`torch.utils.flop_counter.FlopCounterMode`: matmuls and attention), the eager step's time and so its
GFLOP/s, against the CPU's measured matmul peak on the same thread count (best of `--repeats` square
matmuls of `--peak-size`, fp32 and bf16). `ceiling` = peak / eager GFLOP/s bounds the speedup of any
backend that does the same FLOPs in the same precision; `target` is the issue's bar. Non-matmul work
(norms, activations, reshapes) only lowers the real ceiling.

    python bench/roofline.py [--configs teacher,wide] [--threads 1] [--json bench/results/roofline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from backends import config_recipe, eager_denoiser
from flops import forward_flops

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"teacher": 2.5, "wide": 1.5}


def step_inputs(denoiser) -> tuple:
    """One guided step's inputs (conditional and unconditional rows in one batch) at the model's clip size."""
    from latte_hooks import latte_of

    config = latte_of(denoiser).config
    x = torch.randn(2, config.out_channels, config.video_length, config.sample_size, config.sample_size)
    return x, torch.full((2,), 500.0), torch.randn(2, 3, config.caption_channels)


def matmul_peak(size: int, dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of `repeats` size x size matmuls."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def markdown(result: dict) -> str:
    """The README's roofline table."""
    lines = ["| config | GFLOP / step | eager ms / step: median | worst | eager GFLOP/s | speedup ceiling, fp32 | bf16 | target |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        lines.append(f"| {c['config']} | {c['flops_per_step'] / 1e9:.3f} | {c['eager_ms_per_step_median']:.2f} | {c['eager_ms_per_step_worst']:.2f} "
                     f"| {c['eager_gflops']:.1f} | {c['ceiling_fp32']:.2f}× | {c['ceiling_bf16']:.2f}× | "
                     + (f"{c['target']:g}× |" if c["target"] else "– |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="teacher,wide")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed step calls per config, and matmuls per peak")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "roofline.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = {"fp32": matmul_peak(args.peak_size, torch.float32, args.repeats),
            "bf16": matmul_peak(args.peak_size, torch.bfloat16, args.repeats)}
    configs = []
    for name in args.configs.split(","):
        recipe, _, weights = config_recipe(name)
        denoiser = eager_denoiser(recipe, weights)
        x, t, context = step_inputs(denoiser)
        flops = forward_flops(denoiser, x, t, context)
        with torch.no_grad():
            denoiser(x, t, context)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                denoiser(x, t, context)
                seconds.append(time.perf_counter() - start)
        gflops = flops / statistics.median(seconds) / 1e9
        configs.append({"config": name, "flops_per_step": flops, "shape": list(x.shape),
                        "eager_ms_per_step_median": round(1000 * statistics.median(seconds), 3),
                        "eager_ms_per_step_worst": round(1000 * max(seconds), 3),
                        "eager_gflops": round(gflops, 2), "ceiling_fp32": round(peak["fp32"] / gflops, 3),
                        "ceiling_bf16": round(peak["bf16"] / gflops, 3), "target": TARGETS.get(name)})
        c = configs[-1]
        print(f"{name}: {flops / 1e9:.3f} GFLOP/step, eager {c['eager_ms_per_step_median']:.2f} ms/step "
              f"(worst {c['eager_ms_per_step_worst']:.2f}) = {gflops:.1f} GFLOP/s; matmul peak fp32 {peak['fp32']:.1f}, "
              f"bf16 {peak['bf16']:.1f} GFLOP/s -> no same-FLOP backend exceeds {c['ceiling_fp32']:.2f}x in fp32 "
              f"({c['ceiling_bf16']:.2f}x in bf16); target {c['target']}x")
    result = {"threads": args.threads, "peak_gflops": {k: round(v, 2) for k, v in peak.items()}, "peak_size": args.peak_size,
              "repeats": args.repeats, "configs": configs, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
