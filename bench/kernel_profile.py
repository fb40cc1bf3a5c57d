"""What AOTInductor's kernel profiler records cost when no profiler listens (why `lower.kernel_profile` is opt-in).

Each recipe is compiled for the aoti backend twice, with and without `lower.kernel_profile` (every kernel call
wrapped in a profiler record, `cpp.enable_kernel_profile`), and the two bundles generate the same clips in
interleaved rounds after a warm-up: seconds per clip (median and worst round) and the ratio per round. Writes JSON.

    python bench/kernel_profile.py [--recipes recipes/reference.yaml,recipes/cmd_reference.yaml] [--batch 1]
        [--rounds 10] [--json bench/results/kernel_profile.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from e2e import ROOT, TEACHER, interleaved_rounds, with_batch
from results_file import write_results
from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.runtime import Session

def aoti_recipe(path: str, batch: int, kernel_profile: bool):
    data = with_batch(load_recipe(path), batch).model_dump(mode="json")
    data["lower"] = {**data["lower"], "backend": "aoti", "kernel_profile": kernel_profile}
    return parse_recipe(data, f"{path} (aoti, kernel_profile {kernel_profile})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes/reference.yaml,recipes/cmd_reference.yaml")
    parser.add_argument("--batch", type=int, default=1, help="clips per generation")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "kernel_profile.json"))
    args = parser.parse_args()
    os.chdir(ROOT)

    prompts, seeds, _ = suite.prompt_set(args.rounds * args.batch, seed=0)
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-kernel-profile-") as tmp:
        sessions = {}
        for recipe in args.recipes.split(","):
            for records in (False, True):
                name = f"{Path(recipe).stem}, records {'on' if records else 'off'}"
                start = time.perf_counter()
                path = Path(tmp) / f"{len(sessions)}.vdopt"
                compile_bundle(aoti_recipe(recipe, args.batch, records), TEACHER, path, verify=False)
                sessions[name] = Session(path)
                print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
        encoders = {name: session.prompt_encoder() for name, session in sessions.items()}

        def generate(name: str, k: int) -> float:
            cond, uncond = encoders[name](prompts[k * args.batch:(k + 1) * args.batch])
            start = time.perf_counter()
            sessions[name].run(cond, uncond, seed=int(seeds[k]), progress=False)
            return time.perf_counter() - start

        per_call, load_start, load_end = interleaved_rounds(list(sessions), generate, args.rounds)

    rows = {}
    print(f"\naoti, {args.batch} clip(s) per generation, {args.rounds} interleaved rounds")
    print(f"{'recipe':<24} {'s/clip off':>10} {'s/clip on':>10} {'on/off':>7} {'least round':>12}")
    for recipe in args.recipes.split(","):
        off, on = (per_call[f"{Path(recipe).stem}, records {state}"] for state in ("off", "on"))
        ratios = [b / a for a, b in zip(off, on)]
        rows[Path(recipe).stem] = {
            "seconds_per_clip_off": [round(s / args.batch, 4) for s in off],
            "seconds_per_clip_on": [round(s / args.batch, 4) for s in on],
            "median_off": round(statistics.median(off) / args.batch, 4), "median_on": round(statistics.median(on) / args.batch, 4),
            "slowdown_median": round(statistics.median(on) / statistics.median(off), 3),
            "slowdown_least_round": round(min(ratios), 3), "slowdown_most_round": round(max(ratios), 3)}
        row = rows[Path(recipe).stem]
        print(f"{Path(recipe).stem:<24} {row['median_off']:>10.4f} {row['median_on']:>10.4f} {row['slowdown_median']:>6.2f}x "
              f"{row['slowdown_least_round']:>11.2f}x")
    write_results(args.json, {"backend": "aoti", "batch": args.batch, "rounds": args.rounds, "recipes": args.recipes.split(","),
                              "rows": rows}, load_start, load_end)


if __name__ == "__main__":
    main()
