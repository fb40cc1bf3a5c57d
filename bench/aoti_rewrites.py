"""What one of the AOTInductor lowering's rewrites gains (`vdopt.lower.aoti.REWRITES`), side by side.

Each recipe is compiled for aoti twice, with the rewrite list as it is and without `--rewrite`, and the two bundles
generate the same clips (one per generation) in interleaved rounds after a warm-up: seconds per clip (median and
worst round), milliseconds per stage of a staged bundle, the ratio of the medians and the least ratio of a round,
and how far apart the two bundles' clips are. Writes JSON.

    python bench/aoti_rewrites.py [--rewrite patch_embedding_as_matmul]
        [--recipes recipes/cmd_reference.yaml,recipes/reference.yaml] [--rounds 10]
        [--json bench/results/patch_embedding.json]
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

from e2e import ROOT, TEACHER, interleaved_rounds, with_batch
from results_file import write_results
from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.lower import aoti
from vdopt.recipe import load_recipe, recipe_with
from vdopt.runtime import Session


def compare_rewrite(recipe: str, rewrite, rounds: int) -> dict:
    """The recipe's aoti bundle with and without `rewrite`, timed side by side (see the module docstring)."""
    prompts, seeds, _ = suite.prompt_set(rounds, seed=0)
    without = tuple(r for r in aoti.REWRITES if r[1] is not rewrite)
    assert len(without) < len(aoti.REWRITES), f"{rewrite.__name__} is not in vdopt.lower.aoti.REWRITES"
    names = {"with": aoti.REWRITES, "without": without}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-rewrite-") as tmp:
        sessions = {}
        for name, rewrites in names.items():
            path = Path(tmp) / f"{name}.vdopt"
            with mock.patch.object(aoti, "REWRITES", rewrites):
                compile_bundle(with_batch(recipe_with(load_recipe(recipe), backend="aoti"), 1), TEACHER, path, verify=False)
            sessions[name] = Session(path)
        encoder = sessions["with"].prompt_encoder()
        stage_ms: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        clips: dict[str, list[torch.Tensor | None]] = {name: [None] * rounds for name in names}

        def generate(name: str, k: int) -> float:
            cond, uncond = encoder(prompts[k])
            start = time.perf_counter()
            clips[name][k] = sessions[name].run(cond, uncond, seed=int(seeds[k]), progress=False, on_stage=lambda stage, s:
                                                stage_ms[name].setdefault(stage, []).append(s * 1e3))
            return time.perf_counter() - start

        per_call, load_start, load_end = interleaved_rounds(list(names), generate, rounds)

    ratios = [b / a for a, b in zip(per_call["with"], per_call["without"])]
    rows = {name: {"seconds_per_clip": [round(s, 4) for s in per_call[name]], "median": round(statistics.median(per_call[name]), 4),
                   "worst_round": round(max(per_call[name]), 4),
                   "stage_ms_median": {stage: round(statistics.median(ms[1:]), 2) for stage, ms in stage_ms[name].items()}}
            for name in names}
    return {"recipe": recipe, "bundles": rows,
            "speedup_median": round(statistics.median(per_call["without"]) / statistics.median(per_call["with"]), 3),
            "speedup_least_round": round(min(ratios), 3),
            "largest_clip_difference": max((a - b).abs().max().item() for a, b in zip(*clips.values())),
            "load_average": [load_start, load_end]}


def print_row(name: str, row: dict) -> None:
    for side, bundle in row["bundles"].items():
        print(f"{row['recipe']} {side} {name}: {bundle['median']:.4f} s/clip (worst round {bundle['worst_round']:.4f})"
              + (f", stages {bundle['stage_ms_median']} ms" if bundle["stage_ms_median"] else ""))
    print(f"{row['recipe']}: {name} {row['speedup_median']:.2f}x per clip (least round {row['speedup_least_round']:.2f}x); "
          f"largest difference between the two bundles' clips {row['largest_clip_difference']:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewrite", default="patch_embedding_as_matmul", help="a rewrite of vdopt.lower.aoti.REWRITES")
    parser.add_argument("--recipes", default="recipes/cmd_reference.yaml,recipes/reference.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "patch_embedding.json"))
    args = parser.parse_args()
    os.chdir(ROOT)

    rewrite = next((r for _, r, _ in aoti.REWRITES if r.__name__ == args.rewrite), None)
    if rewrite is None:
        parser.error(f"no rewrite '{args.rewrite}'; vdopt.lower.aoti.REWRITES has "
                     f"{', '.join(r.__name__ for _, r, _ in aoti.REWRITES)}")
    rows = {}
    for recipe in args.recipes.split(","):
        rows[recipe] = compare_rewrite(recipe, rewrite, args.rounds)
        print_row(args.rewrite, rows[recipe])
    loads = [load for row in rows.values() for load in row.pop("load_average")]
    write_results(args.json, {"rewrite": args.rewrite, "batch": 1, "rounds": args.rounds, "rows": rows}, loads[0], loads[-1])


if __name__ == "__main__":
    main()
