"""Cache policies on the reference teacher, side by side: calibrated on one prompt set, judged on another.

For each policy (optionally with fixed parameters, e.g. `first_blocks:max_reuse=10`) this runs
`vdopt.calibrate` at the PSNR budget on a *calibration* prompt set, builds the calibrated bundle, and
evaluates it on a *different* prompt set (other prompts, other seeds) with the evaluation suite
(`vdopt.eval.suite.evaluate`, the uncached bundle's clips as the reference): body evaluations saved
(from `state.computed`), wall-clock speedup over the uncached bundle (interleaved timing rounds:
every round runs every bundle on the same prompt, uncached first), mean PSNR / SSIM vs uncached,
attribute accuracy, FVD-MS. A `floor` row (every block cached, the body never runs) bounds what
any body cache can gain on this model: its speedup is 1 / (non-body fraction of a step), Amdahl's law.

Attribute accuracy needs a few hundred held prompts to mean anything at a 2-point tolerance: on
64, the uncached teacher scores 100 % with four squares the classifier calls square at only
0.53-0.62, and any perturbation (even 32 % skipped at a loose threshold) flips some of them.
Calibration and evaluation run on `--eval-threads`; only the timing rounds use `--threads`.

MoReg ablation (`adacache` against `adacache:moreg=false`): body evaluations per clip for the
fast-moving prompts (diagonal directions, 2.8 px/frame) against the slow ones (axis directions,
2 px/frame), and quality at equal speed: each variant's calibration trials give mean PSNR as a
function of body evaluations saved, compared at the savings the variant without MoReg was
calibrated to (linear interpolation between trials).

Every row uses the same backend (torch by default: all bundles share one capture). Prints the
table, writes JSON, the trace plot of one held-out prompt under the fastest adaptive (non-static)
policy within the budget, and the best policy's calibrated recipe.

    python bench/cache.py [--quick] [--model vdopt/reference/weights/teacher.safetensors]
        [--policies POLICY[:k=v,...],...] [--budget 30] [--eval-prompts 256]
        [--json bench/results/cache.json] [--trace-png docs/cache_trace.png] [--recipe-out recipes/reference_cached.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cache_table import psnr_at
from vdopt.calibrate import Bundler, calibrate, recipe_with
from vdopt.data.moving_shapes import DIRECTION_VEC, DIRECTIONS, parse_prompt, prompt_of, sample_attrs
from vdopt.eval import suite
from vdopt.recipe import load_recipe
from vdopt.runtime import Session
from vdopt.runtime.trace import CacheTrace

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "reference.yaml"
WEIGHTS = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
FALLBACK_WEIGHTS = ROOT / "out" / "teacher" / "teacher.safetensors"
EVAL_SEED = 0          # suite.prompt_set seed of the held evaluation set
CALIBRATION_SEED = 1000
FLOOR = {"policy": "teacache", "first": 0, "threshold": 1e30, "warmup": 0, "final": 0, "max_reuse": -1}
POLICIES = ("static:max_reuse=-1,first=0", "static:max_reuse=-1,first=0,forecast=1", "first_blocks:max_reuse=10",
            "adacache", "adacache:moreg=false", "teacache:max_reuse=10,first=0", "teacache:max_reuse=10,first=0,forecast=0.5")
MOREG_PAIR = ("adacache", "adacache:moreg=false")


def is_fast(prompt: str) -> bool:
    """Diagonal motion: both axes move, 2.8 px/frame against 2 px/frame for the axis directions."""
    dx, dy = DIRECTION_VEC[DIRECTIONS[parse_prompt(prompt).direction]]
    return dx != 0 and dy != 0


def parse_policy(text: str) -> tuple[str, str, dict]:
    """`name` or `name:k=v,k=v` -> (label, policy, fixed params)."""
    from vdopt.calibrate import parse_value

    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = parse_value(value)
    return text, name.strip(), params


def split_policies(text: str) -> list[str]:
    """`a:k=v,k=v,b,c:k=v` -> ['a:k=v,k=v', 'b', 'c:k=v']: an item with `=` and no `:` is a parameter of the policy before it."""
    policies: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item and ":" not in item and policies:
            policies[-1] += "," + item
        else:
            policies.append(item)
    return policies


def calibration_prompts(n: int, exclude: set[str]) -> list[str]:
    """n distinct prompts, none of them in the evaluation set."""
    out, seed = [], CALIBRATION_SEED
    while len(out) < n:
        for attrs in sample_attrs(4 * n, seed, "train"):
            p = prompt_of(attrs)
            if p not in exclude and p not in out and len(out) < n:
                out.append(p)
        seed += 1
    return out


class Generator:
    """A suite `generate_fn` over a bundle that also records body evaluations from the cache trace."""

    def __init__(self, path: Path):
        self.session = Session(path)
        self.encoder = self.session.prompt_encoder()
        self.evals: list[int] = []       # body evaluations per clip, summed over rows
        self.prompts: list[str] = []     # the prompt of each entry of evals
        self.steps_with_body: list[int] = []
        self.rows = 0  # (sample, guidance branch) rows of a clip, from its trace

    def run(self, prompt: str, seed: int, trace: CacheTrace | None = None) -> torch.Tensor:
        cond, uncond = self.encoder(prompt)
        return self.session.run(cond, uncond, seed=seed, progress=False, on_step=trace.on_step if trace else None)

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        outs = []
        for p, s in zip(prompts, seeds):
            trace = CacheTrace(self.session.manifest)
            x = self.run(p, int(s), trace)
            if trace.steps:
                self.rows = len(trace.rows)
                self.evals.append(sum(trace.body_evaluations()))
                self.prompts.append(p)
                self.steps_with_body.append(sum(any(st["computed"]) for st in trace.steps))
            outs.append(x if x.dim() == 5 else x.unsqueeze(0))
        return torch.cat(outs).float().clamp(-1, 1)

    def evals_by_motion(self) -> dict[str, float]:
        """Mean body evaluations per clip for fast- and slow-moving prompts."""
        groups = {"fast": [e for e, p in zip(self.evals, self.prompts) if is_fast(p)],
                  "slow": [e for e, p in zip(self.evals, self.prompts) if not is_fast(p)]}
        return {k: round(statistics.mean(v), 2) for k, v in groups.items() if v}

    def saved(self) -> tuple[float, float]:
        if not self.evals:
            return 0.0, 0.0
        n, steps = len(self.evals), self.session.num_steps
        return 1 - sum(self.evals) / (n * self.rows * steps), 1 - sum(self.steps_with_body) / (n * steps)


def time_rounds(generators: dict[str, Generator], prompts: list[str], seeds: list[int], rounds: int, warmup: int) -> dict[str, list[float]]:
    times = {name: [] for name in generators}
    for r in range(warmup + rounds):
        k = r % len(prompts)
        for name, gen in generators.items():  # uncached first in every round
            start = time.perf_counter()
            gen.run(prompts[k], seeds[k])
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few prompts, short grid, 2 timing rounds")
    parser.add_argument("--model", help=f"teacher checkpoint (default {WEIGHTS.relative_to(ROOT)}, else {FALLBACK_WEIGHTS.relative_to(ROOT)})")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget", type=float, default=30.0, help="mean PSNR (dB) budget for calibration")
    parser.add_argument("--calibration-prompts", type=int, default=6)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing (1: steadier on a shared CPU)")
    parser.add_argument("--eval-threads", type=int, default=torch.get_num_threads(), help="torch threads for calibration and evaluation")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cache.json"))
    parser.add_argument("--trace-png", default=str(ROOT / "docs" / "cache_trace.png"))
    parser.add_argument("--recipe-out", default=str(ROOT / "recipes" / "reference_cached.yaml"))
    args = parser.parse_args()
    if args.quick:
        args.calibration_prompts, args.eval_prompts, args.rounds = 2, 4, 2
    torch.set_num_threads(args.eval_threads)
    model = Path(args.model) if args.model else (WEIGHTS if WEIGHTS.is_file() else FALLBACK_WEIGHTS)
    print(f"teacher weights: {model}")
    recipe = load_recipe(args.recipe)
    eval_prompts, eval_seeds, _ = suite.prompt_set(args.eval_prompts, EVAL_SEED)
    cal_prompts = calibration_prompts(args.calibration_prompts, set(eval_prompts))
    policies = [parse_policy(p) for p in split_policies(args.policies)]
    grid = {"threshold": (0.01, 0.04, 0.1, 0.2, 0.4, 1.0), "interval": (2, 3, 5, 8)} if args.quick else {}

    results: dict = {"rows": {}}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-cache-") as tmp:
        tmp = Path(tmp)
        calibrated = {}
        for label, policy, fixed in policies:
            print(f"\n== calibrating {label} (budget mean PSNR >= {args.budget} dB on {len(cal_prompts)} calibration prompts)")
            start = time.perf_counter()
            from vdopt.calibrate import knob_for

            knob = knob_for(policy)
            cal = calibrate(args.recipe, model, args.budget, cal_prompts, policy, tmp / f"{label}.yaml", params=fixed,
                            grid=grid.get(knob.param), refine=1 if args.quick else 3, seed=CALIBRATION_SEED)
            print(cal.table())
            calibrated[label] = (cal, time.perf_counter() - start)

        print("\n== building bundles (torch backend, one capture)")
        bundler = Bundler(recipe_with(recipe, []), model, tmp, print)
        paths = {"uncached": bundler.build([])}
        for label, (cal, _) in calibrated.items():
            paths[label] = bundler.build([("insert_cache", cal.params)])
        paths["floor"] = bundler.build([("insert_cache", FLOOR)])
        gens = {name: Generator(path) for name, path in paths.items()}

        print(f"\n== evaluating on {len(eval_prompts)} held prompts (suite seed {EVAL_SEED})")
        base = suite.evaluate(gens["uncached"], len(eval_prompts), EVAL_SEED, batch=len(eval_prompts), label="uncached", progress=False)
        evals = {"uncached": base}
        for name in gens:
            if name != "uncached":
                evals[name] = suite.evaluate(gens[name], len(eval_prompts), EVAL_SEED, batch=len(eval_prompts), label=name,
                                             reference_videos=base["_videos"], progress=False)

        print(f"== timing: {args.rounds} interleaved rounds of a full {recipe.sampler.steps}-step generation per bundle")
        torch.set_num_threads(args.threads)
        times = time_rounds(gens, eval_prompts, eval_seeds, args.rounds, warmup=1)

        uncached_s = statistics.median(times["uncached"])
        for name, gen in gens.items():
            e = evals[name]["all"]
            saved, step_saved = gen.saved()
            ratios = [u / t for u, t in zip(times["uncached"], times[name])]
            row = {
                "params": calibrated[name][0].params if name in calibrated else (FLOOR if name == "floor" else None),
                "body_evals_saved": round(saved, 4), "steps_without_body": round(step_saved, 4),
                "seconds_median": round(statistics.median(times[name]), 4), "seconds": [round(t, 4) for t in times[name]],
                "speedup": round(uncached_s / statistics.median(times[name]), 3),
                "speedup_per_round_median": round(statistics.median(ratios), 3),
                "body_evals_per_clip_by_motion": gen.evals_by_motion(),
                "accuracy_all": e["accuracy"]["all"], "accuracy": e["accuracy"],
                "fvd_ms_vs_real": e["fvd_ms"], "fvd_ms_floor": e["fvd_ms_floor"],
            }
            if "vs_reference" in e:
                v = e["vs_reference"]
                row.update(psnr_db=v["psnr_db"], psnr_db_median=v["psnr_db_median"], psnr_db_worst=v["psnr_db_worst"],
                           psnr_db_p5=v["psnr_db_p5"], ssim=v["ssim"], fvd_ms_vs_uncached=v["fvd_ms"])
            if name in calibrated:
                cal, seconds = calibrated[name]
                row["calibration"] = {"psnr_db": round(cal.best.psnr, 3), "body_evals_saved": round(cal.best.saved, 4),
                                      "seconds": round(seconds, 1), "trials": [t.row(cal.knob) for t in cal.trials]}
            results["rows"][name] = row

        if all(name in calibrated for name in MOREG_PAIR):
            level = results["rows"][MOREG_PAIR[1]]["calibration"]["body_evals_saved"]
            results["moreg_ablation"] = {
                "body_evals_per_clip_by_motion": {name: results["rows"][name]["body_evals_per_clip_by_motion"] for name in MOREG_PAIR},
                "equal_speed_body_evals_saved": level,
                "psnr_at_equal_speed": {name: psnr_at(results["rows"][name]["calibration"]["trials"], level) for name in MOREG_PAIR},
            }

        # the best policy: the fastest whose held-out mean PSNR meets the budget
        policy_rows = {n: r for n, r in results["rows"].items() if n in calibrated}
        within = {n: r for n, r in policy_rows.items() if r.get("psnr_db", 0) >= args.budget} or policy_rows
        best = max(within, key=lambda n: within[n]["speedup"])
        # a static schedule has no distance to plot: trace the fastest policy that decides at run time
        adaptive = {n: r for n, r in within.items() if r["params"]["policy"] != "static"} or within
        traced = max(adaptive, key=lambda n: adaptive[n]["speedup"])
        trace = CacheTrace(gens[traced].session.manifest)
        gens[traced].run(eval_prompts[0], eval_seeds[0], trace)
        Path(args.trace_png).parent.mkdir(parents=True, exist_ok=True)
        trace.plot(Path(args.trace_png))
        if not Path(args.trace_png).is_file():
            raise SystemExit(f"{args.trace_png} was not written: CacheTrace.plot needs matplotlib (pip install matplotlib)")
        results["trace"] = {"prompt": eval_prompts[0], "seed": eval_seeds[0], "policy": traced, "rows": trace.rows,
                            "body_evaluations": trace.body_evaluations()}
        cal = calibrated[best][0]
        text = (tmp / f"{best}.yaml").read_text()
        b = results["rows"][best]
        note = (f"# bench/cache.py: best of {', '.join(calibrated)} on {len(eval_prompts)} held prompts ({model.name}): "
                f"{100 * b['body_evals_saved']:.1f}% body evals saved, {b['speedup']:.2f}x wall clock (torch backend, CPU), "
                f"mean PSNR {b['psnr_db']:.2f} dB, SSIM {b['ssim']:.3f} vs uncached.\n")
        Path(args.recipe_out).write_text(note + text)

    acc0 = results["rows"]["uncached"]["accuracy_all"]
    bar = {"speedup_min": 2.5, "psnr_min": args.budget, "accuracy_drop_max_points": 2.0}
    b = results["rows"][best]
    met = b["speedup"] >= 2.5 and b.get("psnr_db", 0) >= args.budget and 100 * (acc0 - b["accuracy_all"]) <= 2.0
    results.update({
        "backend": "torch", "device": "cpu", "threads": args.threads, "eval_threads": args.eval_threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
        "weights": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model), "quick": args.quick,
        "weights_training": (json.loads((model.parent / "config.json").read_text()).get("training")
                             if (model.parent / "config.json").is_file() else None),
        "steps": recipe.sampler.steps, "guidance_scale": recipe.sampler.guidance_scale, "budget_psnr": args.budget,
        "calibration_prompts": cal_prompts, "calibration_seed": CALIBRATION_SEED,
        "eval_prompts": eval_prompts, "eval_seed": EVAL_SEED, "rounds": args.rounds,
        "non_body_fraction": round(results["rows"]["floor"]["seconds_median"] / uncached_s, 3),
        "best": best, "bar": bar, "bar_met": met,
    })
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    head = (f"{'policy':<28} {'params':<44} {'evals saved':>11} {'no-body steps':>13} {'speedup':>8} {'PSNR':>7} {'worst':>6} "
            f"{'SSIM':>6} {'acc all':>8} {'FVD-MS':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results["rows"].items():
        params = {k: v for k, v in (r["params"] or {}).items() if k != "policy"}
        print(f"{name:<28} {json.dumps(params)[:44]:<44} {100 * r['body_evals_saved']:>10.1f}% {100 * r['steps_without_body']:>12.1f}% "
              f"{r['speedup']:>7.2f}x {r.get('psnr_db', float('inf')):>7.2f} {r.get('psnr_db_worst', float('inf')):>6.2f} {r.get('ssim', 1.0):>6.3f} "
              f"{100 * r['accuracy_all']:>7.1f}% {r['fvd_ms_vs_real']:>8.2f}")
    print(f"\nnon-body fraction of a step (floor / uncached): {results['non_body_fraction']:.3f} -> "
          f"no body cache can exceed {1 / results['non_body_fraction']:.2f}x here")
    if "moreg_ablation" in results:
        ablation = results["moreg_ablation"]
        for name in MOREG_PAIR:
            by_motion = ablation["body_evals_per_clip_by_motion"][name]
            psnr = ablation["psnr_at_equal_speed"][name]
            print(f"MoReg ablation, {name:<22}: body evaluations per clip fast {by_motion.get('fast', float('nan')):.1f} / "
                  f"slow {by_motion.get('slow', float('nan')):.1f}; mean PSNR at "
                  f"{100 * ablation['equal_speed_body_evals_saved']:.1f}% saved: "
                  + (f"{psnr:.2f} dB" if psnr is not None else "outside its trials"))
    print(f"best: {best}; bar (>= 2.5x at PSNR >= {args.budget} dB, accuracy within 2 points): {'MET' if met else 'NOT met'}")
    print(f"wrote {args.json}, {args.trace_png}, {args.recipe_out}")


if __name__ == "__main__":
    main()
