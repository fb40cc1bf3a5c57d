"""What a cached step costs when it skips its body, against the uncached step's non-body work.

Compiles the shipped teacher uncached (`recipes/reference.yaml`) and cached
(`recipes/reference_cached.yaml`, whose body is the whole block stack) with the same backend (aoti with kernel
records, as `vdopt profile` needs), profiles both with `vdopt profile`'s machinery, and reports:
- the uncached step's non-body work: its step time without the profiler times the share of the
  profiled step *not* spent in block modules;
- the skip path: the cached bundle's reuse steps, timed without the profiler, and where their time
  goes (module table of the reuse steps);
- their ratio (issue 16 asks for <= 1.3).
Each bundle is profiled `--repeats` times, interleaved; medians are reported with the worst.

    python bench/skip_path.py [--backend aoti] [--threads 1] [--repeats 3] [--json bench/results/skip_path.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from vdopt.compiler import compile_bundle
from vdopt.families import descriptor_for
from vdopt.recipe import load_recipe
from vdopt.runtime import Session
from vdopt.runtime.profile import profile_bundle

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
PROMPT = "red circle moving up-left"


def in_block(path: str, descriptor) -> bool:
    names = path.split(".")
    prefixes = [".".join(names[:k]) for k in range(1, len(names) + 1)]
    return any(descriptor.is_block(p) or descriptor.is_temporal_block(p) for p in prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="aoti")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "skip_path.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    recipes = {"uncached": load_recipe(ROOT / "recipes" / "reference.yaml"),
               "cached": load_recipe(ROOT / "recipes" / "reference_cached.yaml")}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-skip-") as tmp:
        sessions = {}
        for name, recipe in recipes.items():
            recipe = recipe.model_copy(update={"lower": recipe.lower.model_copy(update={"backend": args.backend, "kernel_profile": True})})
            path = Path(tmp) / f"{name}.vdopt"
            compile_bundle(recipe, TEACHER, path, verify=False)
            sessions[name] = Session(path, profile=True)
            print(f"compiled {name} ({args.backend})", flush=True)
        cache = sessions["cached"].manifest["cache"]
        if cache["body_blocks"] != [0, cache["num_blocks"]]:
            raise SystemExit(f"this bench takes the body to be the whole block stack; the cached recipe caches {cache['body_blocks']}")
        descriptor = descriptor_for(sessions["uncached"].manifest["family"])
        cond, uncond = sessions["uncached"].prompt_encoder()(PROMPT)
        runs = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for name, session in sessions.items():
                runs[name].append(profile_bundle(session, cond, uncond))

    non_body, skip, skip_modules = [], [], []
    for uncached, cached in zip(runs["uncached"], runs["cached"]):
        modules = uncached.module_ms_per_step(per_block=True)
        body_share = sum(ms for path, ms in modules.items() if in_block(path, descriptor)) / uncached.profiled_ms_per_step
        non_body.append(uncached.unprofiled_ms_per_step * (1 - body_share))
        reuse = [s for s in cached.steps if s.decision == "reuse"]
        skip.append(statistics.mean(s.unprofiled_ms for s in reuse))
        totals: dict[str, float] = {}
        for step in reuse:
            for path, ms in step.module_ms.items():
                totals[path] = totals.get(path, 0.0) + ms / len(reuse)
        skip_modules.append(totals)
    ratios = [s / n for s, n in zip(skip, non_body)]
    result = {
        "command": f"python bench/skip_path.py --backend {args.backend} --threads {args.threads} --repeats {args.repeats}",
        "backend": args.backend, "threads": args.threads, "torch": torch.__version__, "prompt": PROMPT,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "uncached_step_ms": [round(r.unprofiled_ms_per_step, 4) for r in runs["uncached"]],
        "uncached_non_body_ms": [round(v, 4) for v in non_body],
        "skip_step_ms": [round(v, 4) for v in skip],
        "ratio": [round(v, 4) for v in ratios], "ratio_median": round(statistics.median(ratios), 4), "ratio_worst": round(max(ratios), 4),
        "bar": 1.3, "bar_met": max(ratios) <= 1.3,
        "reuse_steps": sum(s.decision == "reuse" for s in runs["cached"][0].steps),
        "skip_path_modules_ms_profiled": {k: round(v, 4) for k, v in sorted(skip_modules[0].items(), key=lambda kv: -kv[1])},
    }
    print(f"uncached step {statistics.median(result['uncached_step_ms']):.2f} ms, its non-body work "
          f"{statistics.median(non_body):.2f} ms; skip path {statistics.median(skip):.2f} ms; ratio median "
          f"{result['ratio_median']:.2f}, worst {result['ratio_worst']:.2f} (bar 1.3: {'met' if result['bar_met'] else 'NOT met'})")
    for path, ms in list(result["skip_path_modules_ms_profiled"].items())[:8]:
        print(f"  skip path, profiled: {path or '(step program)':<60} {ms:.3f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
