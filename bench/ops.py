"""vdopt's fused cache ops against their aten decompositions on the CPU, side by side in one run.

Two tables:
1. **Ops** at the shapes the cached step feeds them: the op (`torch.ops.vdopt.*`, one C++ kernel call) against
   its aten decomposition run eagerly (what `ops: aten` executes on the torch backend), median and worst of
   `--repeats` interleaved calls. Shapes: the shipped cached recipe's (teacache on the time embedding,
   forecast over the body's output) and a first-blocks probe, on the reference model and on the `wide`
   configuration of bench/backends.py (2048 tokens of width 512).
2. **Bundles**, whole clips timed in interleaved rounds on each `--backends` (per step = clip time / steps), each
   pair compared (max |diff|, and the cache's body evaluations per row):
   - `cache ops`: the shipped cached recipe (`recipes/reference_cached.yaml`, real teacher weights) with
     `ops: aten` against `ops: fused`;
   - `fuse_norm_modulate`: the teacher (`recipes/reference.yaml`) without and with the pass.

    python bench/ops.py [--backends aoti,torch,onnx] [--rounds 5] [--repeats 200] [--threads 1] [--json bench/results/ops.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vdopt.compiler import compile_bundle
from vdopt.ops import decompositions, library_path
from vdopt.recipe import load_recipe, recipe_with
from vdopt.runtime import Session
from vdopt.runtime.trace import CacheTrace

from results_file import write_results

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "vdopt" / "reference" / "weights"
PROMPTS = ["red circle moving up-left", "blue square moving right", "green triangle moving down", "yellow circle moving left"]
# rows = 2 (cond and uncond of one prompt); tokens x width of a clip: the reference model (8 frames of 8x8 patches,
# width 64) and bench/backends.py's `wide` configuration (8 frames of 16x16 patches, width 512)
SHAPES = {"reference": (512, 64), "wide": (2048, 512)}


def op_cases(rows: int = 2) -> dict[str, tuple]:
    generator = torch.Generator().manual_seed(0)
    cases = {}
    for name, (tokens, width) in SHAPES.items():
        probe = torch.randn(rows, tokens, width, generator=generator)
        prev = probe + 0.1 * torch.randn(rows, tokens, width, generator=generator)
        accumulated, forced = torch.zeros(rows), torch.zeros(rows, dtype=torch.bool)
        embedding, embedding_prev = torch.randn(rows, 6 * width, generator=generator), torch.randn(rows, 6 * width, generator=generator)
        cases[f"{name}: cache_decision, teacache on the time embedding [{rows}, {6 * width}]"] = (
            "cache_decision", (embedding, embedding_prev, accumulated, forced, torch.tensor([1.0, 0.0]), 0.3))
        cases[f"{name}: cache_decision, first-blocks probe [{rows}, {tokens}, {width}]"] = (
            "cache_decision", (probe, prev, accumulated, forced, torch.tensor([1.0, 0.0]), 0.1))
        cases[f"{name}: taylor_forecast over the body output [{rows}, {tokens}, {width}]"] = (
            "taylor_forecast", (probe, prev, torch.rand(rows, generator=generator)))
        frames = 8  # a spatial block's norm: frames folded into rows, modulation per row
        x = torch.randn(rows * frames, tokens // frames, width, generator=generator)
        scale, shift = (0.1 * torch.randn(rows * frames, 1, width, generator=generator) for _ in range(2))
        cases[f"{name}: layer_norm_modulate, a block's norm1 [{rows * frames}, {tokens // frames}, {width}]"] = (
            "layer_norm_modulate", (x, scale, shift, 1e-6))
    return cases


def time_call(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_ops(repeats: int) -> list[dict]:
    rows = []
    for label, (name, args) in op_cases().items():
        fused, aten = getattr(torch.ops.vdopt, name), getattr(decompositions, name)
        for _ in range(10):
            fused(*args), aten(*args)
        times = {"fused": [], "aten": []}
        for _ in range(repeats):  # interleaved, so both see the same machine state
            times["aten"].append(time_call(aten, args))
            times["fused"].append(time_call(fused, args))
        ratios = [a / f for a, f in zip(times["aten"], times["fused"])]
        row = {"case": label, **{f"{k}_us_median": round(1e6 * statistics.median(v), 1) for k, v in times.items()},
               **{f"{k}_us_worst": round(1e6 * max(v), 1) for k, v in times.items()},
               "speedup_of_medians": round(statistics.median(times["aten"]) / statistics.median(times["fused"]), 2),
               "speedup_worst_call_pair": round(min(ratios), 2)}
        rows.append(row)
        print(f"{label:<75} aten {row['aten_us_median']:>8.1f} us  fused {row['fused_us_median']:>8.1f} us  "
              f"x{row['speedup_of_medians']:.2f} (worst pair x{row['speedup_worst_call_pair']:.2f})", flush=True)
    return rows


def variants(name: str) -> tuple:
    """(recipe, baseline data, variant data) of a bundle comparison."""
    if name == "cache ops":
        recipe = load_recipe(ROOT / "recipes" / "reference_cached.yaml")
        cache = next(p for p in recipe.passes if p.name == "insert_cache")
        return recipe, [{"name": "insert_cache", "params": {**cache.params, "ops": "aten"}}], \
            [{"name": "insert_cache", "params": {**cache.params, "ops": "fused"}}]
    recipe = load_recipe(ROOT / "recipes" / "reference.yaml")
    return recipe, [], [{"name": "fuse_norm_modulate"}]


def bench_bundles(backends: list[str], rounds: int, tmp: Path) -> list[dict]:
    results = []
    for comparison in ("cache ops", "fuse_norm_modulate"):
        recipe, baseline, variant = variants(comparison)
        for backend in backends:
            sessions = {}
            for label, passes in (("baseline", baseline), ("variant", variant)):
                data = recipe_with(recipe, backend=backend).model_dump(mode="json")
                data["passes"] = passes
                path = tmp / f"{comparison.replace(' ', '_')}_{backend}_{label}.vdopt"
                start = time.perf_counter()
                compile_bundle(type(recipe).model_validate(data), WEIGHTS / "teacher.safetensors", path, verify=False)
                print(f"[{comparison}, {backend}] compiled {label} in {time.perf_counter() - start:.1f} s", flush=True)
                sessions[label] = Session(path)
            encoder = sessions["baseline"].prompt_encoder()
            cond, uncond = encoder(PROMPTS)
            clips, evaluations = {}, {}
            for label, session in sessions.items():
                trace = CacheTrace(session.manifest)
                clips[label] = session.run(cond, uncond, seed=0, progress=False, on_step=trace.on_step)
                evaluations[label] = trace.body_evaluations() if session.manifest.get("cache") else None
            steps = sessions["baseline"].num_steps
            times = {"baseline": [], "variant": []}
            for _ in range(rounds):
                for label, session in sessions.items():
                    times[label].append(time_call(lambda: session.run(cond, uncond, seed=0, progress=False), ()) / steps)
            ratios = [a / f for a, f in zip(times["baseline"], times["variant"])]
            row = {"comparison": comparison, "baseline": baseline, "variant": variant, "backend": backend,
                   "prompts_per_call": len(PROMPTS), "steps": steps,
                   "max_abs_diff": float((clips["baseline"] - clips["variant"]).abs().max()),
                   "body_evaluations_per_row": evaluations,
                   **{f"{k}_step_ms_median": round(1e3 * statistics.median(v), 2) for k, v in times.items()},
                   **{f"{k}_step_ms_worst": round(1e3 * max(v), 2) for k, v in times.items()},
                   "speedup_of_medians": round(statistics.median(times["baseline"]) / statistics.median(times["variant"]), 3),
                   "speedup_mean_of_rounds": round(statistics.mean(ratios), 3), "speedup_worst_round": round(min(ratios), 3)}
            results.append(row)
            print(f"[{comparison}, {backend}] step {row['baseline_step_ms_median']:.2f} ms -> {row['variant_step_ms_median']:.2f} ms  "
                  f"x{row['speedup_of_medians']:.3f} (worst round x{row['speedup_worst_round']:.3f}); clips differ by "
                  f"{row['max_abs_diff']:.1e}, same decisions: {evaluations['baseline'] == evaluations['variant']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="aoti,torch,onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "ops.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    library_path()
    load_start = os.getloadavg()
    ops = bench_ops(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = bench_bundles([b for b in args.backends.split(",") if b], args.rounds, Path(tmp))
    write_results(args.json, {"threads": args.threads, "ops": ops, "bundles": bundles}, load_start, os.getloadavg())


if __name__ == "__main__":
    main()
