"""How well does a handful of prompts measure a cached bundle's quality budget?

Renders the shipped cached recipe (torch backend) against the uncached program on its calibration
prompt set (what `vdopt compile` verifies) and on held-out sets of several sizes and seeds, and
writes mean, worst-clip and 5th-percentile PSNR per set to bench/results/verify_sampling.json.

    python bench/verify_sampling.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdopt.compiler import compile_bundle  # noqa: E402
from vdopt.recipe import load_recipe, recipe_with  # noqa: E402
from vdopt.verify import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "reference_cached.yaml"))
    parser.add_argument("--weights", default=str(ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"))
    parser.add_argument("--sets", default="6:1000,4:2000,16:2000,16:2001", help="PROMPTS:SEED,...")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "verify_sampling.json"))
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    sets = [tuple(int(v) for v in item.split(":")) for item in args.sets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cached, uncached = Path(tmp) / "cached.vdopt", Path(tmp) / "uncached.vdopt"
        compile_bundle(recipe_with(recipe, backend="torch"), args.weights, cached, verify=False)
        compile_bundle(recipe_with(recipe, [], "torch"), args.weights, uncached, verify=False)
        for prompts, seed in sets:
            start = time.perf_counter()
            report = measure(cached, uncached, prompts, seed, progress=False)
            report["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(report)
            print(f"{prompts:>3} prompts, seed {seed}: mean {report['psnr_mean']:.2f} dB, worst {report['psnr_worst']:.2f} dB, "
                  f"p5 {report['psnr_p5']:.2f} dB", flush=True)
    result = {"command": "python bench/verify_sampling.py " + " ".join(sys.argv[1:]), "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)),
              "backend": "torch", "sets": rows}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
