"""The shipped cached recipe against diffusers' cache hooks on the same teacher, prompts, seeds and steps, side by side in one run.

Rows (every PSNR against the uncached bundle's clips, as in bench/cache.py):
- `uncached bundle`: recipes/reference.yaml on the torch backend, the reference;
- `eager diffusers loop`: the teacher in diffusers' `LatteTransformer3DModel` in a plain guided loop
  (bench/backends.py's), what users run today;
- one row per diffusers hook (bench/latte_hooks.py: FirstBlockCache, MagCache, TaylorSeer, Pyramid
  Attention Broadcast) on that loop, at the setting chosen the way bench/cache.py chooses ours: the
  value of its knob that skips the most work with mean PSNR >= the budget on the calibration prompts
  (bench/cache.py's, disjoint from the held ones). Every value tried is kept in the JSON
  (`hook_sweeps`): work skipped, mean and worst-clip PSNR per value;
- `vdopt ...`: recipes/reference_cached.yaml (bench/cache.py's best policy, calibrated at the same
  budget) as shipped on the torch backend, and on aoti (its default backend) at the shipped value and
  at the other `--knob-values` of its calibrated knob, fixed before the run: the vdopt side's
  speed/quality frontier.
For each hook the JSON names the fastest vdopt row whose held-out mean *and* worst-clip PSNR are at
least the hook's (`dominating`), and the wall-clock ratio between the two.
Each row is evaluated on the held prompts with the evaluation suite (mean, worst and 5th-percentile
PSNR, SSIM, attribute accuracy) and timed in interleaved rounds of a full clip, the uncached bundle
first in every round, on `--threads` torch threads. Work skipped: body evaluations saved for the
vdopt rows (per guidance row, from the cache trace); for hooks, transformer blocks and attentions
that did not run (counted by forward hooks on modules only a computing block or attention calls).

    python bench/cache_hooks.py [--eval-prompts 256] [--budget 30] [--threads 1] [--knob-values 0.07,0.1,0.15,0.2]
        [--hooks NAME,...] [--json bench/results/cache_hooks.json]
        [--json bench/results/cache_hooks.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from backends import eager_denoiser, eager_loop
from cache import CALIBRATION_SEED, EVAL_SEED, WEIGHTS, Generator, calibration_prompts, time_rounds
from latte_hooks import HOOKS, MAG_CALIBRATION, BlockCounter, Hook, calibrate_mag_ratios, latte_of, pair_blocks
from vdopt.calibrate import knob_for
from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.measure import PsnrStats, clip_psnr, make_inputs, render
from vdopt.recipe import load_recipe, recipe_with
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "reference.yaml"
CACHED_RECIPE = ROOT / "recipes" / "reference_cached.yaml"


class HookedEager:
    """A suite `generate_fn`: the eager loop over a fresh teacher, with one diffusers hook (or none)."""

    def __init__(self, recipe, reference: Session, hook: Hook | None = None, value=None, context: dict | None = None):
        self.recipe, self.reference = recipe, reference
        self.encoder = reference.prompt_encoder()
        denoiser = eager_denoiser(recipe, WEIGHTS)
        self.model = latte_of(denoiser)
        if hook is not None and hook.paired:
            pair_blocks(self.model)
        self.counter = BlockCounter(self.model)
        self.timestep = 0
        if hook is not None:
            self.model.enable_cache(hook.config(value, {**(context or {}), "timestep": lambda: self.timestep}))
        self.hooked = hook is not None
        self.loop = eager_loop(recipe, denoiser, step_context=self.step_context)
        self.steps = recipe.sampler.steps
        self.clips = 0

    @contextlib.contextmanager
    def step_context(self, i: int, t: torch.Tensor):
        self.timestep = int(t)
        context = self.model.cache_context("cond_uncond", step_index=i, num_inference_steps=self.steps, timestep=t) \
            if self.hooked else contextlib.nullcontext()
        with context:
            yield

    def run_inputs(self, cond: dict, uncond: dict, seed: int) -> torch.Tensor:
        if self.hooked:
            self.model._reset_stateful_cache()
        x = self.reference.initial_noise(seed, self.reference.latent_shape(1, None, None, None))
        self.clips += 1
        return self.loop(x, cond["encoder_hidden_states"], uncond["encoder_hidden_states"])

    def run(self, prompt: str, seed: int) -> torch.Tensor:
        cond, uncond = self.encoder(prompt)
        return self.run_inputs(cond, uncond, seed)

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.cat([self.run(p, int(s)) for p, s in zip(prompts, seeds)]).float().clamp(-1, 1)

    def reset_counts(self) -> None:
        self.counter.reset()
        self.clips = 0

    def skipped(self) -> dict[str, float]:
        """Fractions of transformer-block and attention evaluations that did not run."""
        if not self.clips:
            return {"blocks_skipped": 0.0, "attentions_skipped": 0.0}
        c = self.counter
        return {"blocks_skipped": round(1 - c.block_calls / (self.clips * self.steps * len(c.blocks)), 4),
                "attentions_skipped": round(1 - c.attention_calls / (self.clips * self.steps * len(c.attentions)), 4)}


def render_hooked(gen: HookedEager, inputs) -> list[torch.Tensor]:
    return [gen.run_inputs(cond, uncond, seed).float().clamp(-1, 1) for _, cond, uncond, seed in inputs.items]


def sweep(hook: Hook, recipe, reference: Session, inputs, refs, context: dict, budget: float, bar) -> tuple[object, list[dict]]:
    """Every knob value on the calibration prompts; returns the most skipping value within the budget."""
    trials, chosen = [], None
    for value in hook.values:
        bar.set_postfix_str(f"{hook.name} {hook.knob}={value}")
        gen = HookedEager(recipe, reference, hook, value, context)
        stats = PsnrStats.of(clip_psnr(render_hooked(gen, inputs), refs))
        trial = {hook.knob: value, **gen.skipped(), **stats.to_json(), "within_budget": stats.mean >= budget}
        trials.append(trial)
        bar.update()
        if trial["within_budget"] and (chosen is None or trial["blocks_skipped"] + trial["attentions_skipped"]
                                       >= chosen["blocks_skipped"] + chosen["attentions_skipped"]):
            chosen = trial
    return (chosen[hook.knob] if chosen else None), trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="mean PSNR (dB) a hook setting must meet on the calibration prompts")
    parser.add_argument("--calibration-prompts", type=int, default=6)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing")
    parser.add_argument("--eval-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--knob-values", default="0.07,0.1,0.15,0.2",
                        help="other values of the cached recipe's calibrated knob to compile on aoti (empty: none)")
    parser.add_argument("--hooks", default=",".join(h.name for h in HOOKS), help="comma-separated subset of: " + ", ".join(h.name for h in HOOKS))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cache_hooks.json"))
    args = parser.parse_args()
    names = [n.strip() for n in args.hooks.split(",") if n.strip()]
    unknown = set(names) - {h.name for h in HOOKS}
    if unknown:
        raise SystemExit(f"unknown hook(s) {sorted(unknown)}; known: {', '.join(h.name for h in HOOKS)}")
    hooks = [h for h in HOOKS if h.name in names]
    torch.set_num_threads(args.eval_threads)
    recipe = load_recipe(RECIPE)
    eval_prompts, eval_seeds, _ = suite.prompt_set(args.eval_prompts, EVAL_SEED)
    cal_prompts = calibration_prompts(args.calibration_prompts, set(eval_prompts))

    with tempfile.TemporaryDirectory(prefix="vdopt-bench-hooks-") as tmp:
        tmp = Path(tmp)
        paths = {"uncached bundle": tmp / "uncached.vdopt"}
        compile_bundle(recipe, WEIGHTS, paths["uncached bundle"], verify=False)
        cached = load_recipe(CACHED_RECIPE)
        cache = next(p.params for p in cached.passes if p.name == "insert_cache")
        knob = knob_for(cache["policy"]).param
        variants = [("torch", cache[knob])] + [("aoti", v) for v in sorted({cache[knob], *map(float, filter(None, args.knob_values.split(",")))})]
        for backend, value in variants:
            label = f"vdopt {cache['policy']} ({backend}), {knob} {value:g}" + (" (shipped)" if value == cache[knob] else "")
            passes = [(p.name, {**p.params, knob: value} if p.name == "insert_cache" else p.params) for p in cached.passes]
            paths[label] = tmp / f"cached_{backend}_{value:g}.vdopt"
            compile_bundle(recipe_with(cached, passes, backend), WEIGHTS, paths[label], verify=False)
        reference = Session(paths["uncached bundle"])

        print(f"== diffusers hooks: sweeping each knob on {len(cal_prompts)} calibration prompts (budget mean PSNR >= {args.budget} dB)")
        inputs = make_inputs(reference, cal_prompts, CALIBRATION_SEED)
        refs, _ = render(reference, inputs)
        context = {"steps": recipe.sampler.steps}
        if any(h.name.startswith("diffusers MagCache") for h in hooks):
            probe = HookedEager(recipe, reference, MAG_CALIBRATION, True, context)
            _, cond, uncond, seed = inputs.items[0]
            context["mag_ratios"] = calibrate_mag_ratios(lambda: probe.run_inputs(cond, uncond, seed))
        sweeps, chosen = {}, {}
        with tqdm(total=sum(len(h.values) for h in hooks), desc="hook sweeps", unit="setting") as bar:
            for hook in hooks:
                chosen[hook.name], sweeps[hook.name] = sweep(hook, recipe, reference, inputs, refs, context, args.budget, bar)
        for hook in hooks:
            print(f"{hook.name}: {hook.knob} = {chosen[hook.name]}" if chosen[hook.name] is not None
                  else f"{hook.name}: no {hook.knob} tried meets the budget; left out of the held-out rows")

        gens = {"uncached bundle": Generator(paths["uncached bundle"])}
        gens["eager diffusers loop"] = HookedEager(recipe, reference)
        for hook in hooks:
            if chosen[hook.name] is not None:
                gens[hook.name] = HookedEager(recipe, reference, hook, chosen[hook.name], context)
        gens.update({name: Generator(path) for name, path in paths.items() if name != "uncached bundle"})

        print(f"\n== evaluating on {len(eval_prompts)} held prompts (suite seed {EVAL_SEED})")
        base = suite.evaluate(gens["uncached bundle"], len(eval_prompts), EVAL_SEED, batch=len(eval_prompts), label="uncached", progress=False)
        evals = {"uncached bundle": base}
        for name, gen in gens.items():
            if name != "uncached bundle":
                print(f"  {name}", flush=True)
                evals[name] = suite.evaluate(gen, len(eval_prompts), EVAL_SEED, batch=len(eval_prompts), label=name,
                                             reference_videos=base["_videos"], progress=False)
        work = {}
        for name, gen in gens.items():
            if isinstance(gen, HookedEager):
                work[name] = gen.skipped()
            else:
                saved, _ = gen.saved()
                work[name] = {"body_evals_saved": round(saved, 4)}

        print(f"== timing: {args.rounds} interleaved rounds of a full {recipe.sampler.steps}-step clip per row")
        torch.set_num_threads(args.threads)
        times = time_rounds(gens, eval_prompts, eval_seeds, args.rounds, warmup=1)

    uncached_s = statistics.median(times["uncached bundle"])
    eager_s = statistics.median(times["eager diffusers loop"])
    rows = {}
    for name in gens:
        e = evals[name]["all"]
        row = {"work": work[name], "setting": None,
               "seconds_median": round(statistics.median(times[name]), 4), "seconds_worst": round(max(times[name]), 4),
               "seconds": [round(t, 4) for t in times[name]],
               "speedup_vs_uncached_bundle": round(uncached_s / statistics.median(times[name]), 3),
               "speedup_vs_eager": round(eager_s / statistics.median(times[name]), 3),
               "speedup_vs_eager_worst_round": round(min(a / b for a, b in zip(times["eager diffusers loop"], times[name])), 3),
               "accuracy_all": e["accuracy"]["all"], "accuracy": e["accuracy"]}
        hook = next((h for h in hooks if h.name == name), None)
        if hook is not None:
            row["setting"] = {hook.knob: chosen[name]}
        if "vs_reference" in e:
            v = e["vs_reference"]
            row.update(psnr_db=v["psnr_db"], psnr_db_worst=v["psnr_db_worst"], psnr_db_p5=v["psnr_db_p5"], ssim=v["ssim"])
        rows[name] = row
    ours = [n for n in rows if n.startswith("vdopt ")]
    comparison = {}
    for hook in (n for n in rows if n.startswith("diffusers ")):
        h = rows[hook]
        dominating = [n for n in ours if rows[n]["psnr_db"] >= h["psnr_db"] and rows[n]["psnr_db_worst"] >= h["psnr_db_worst"]]
        best = min(dominating, key=lambda n: rows[n]["seconds_median"], default=None)
        comparison[hook] = {"dominating": best, "hook_over_vdopt_seconds": round(h["seconds_median"] / rows[best]["seconds_median"], 3)
                            if best else None}
    beats = all(c["dominating"] and c["hook_over_vdopt_seconds"] > 1 for c in comparison.values())
    results = {
        "rows": rows, "hook_sweeps": sweeps, "comparison": comparison, "beats_every_hook": beats,
        "mag_ratios": context.get("mag_ratios"), "cached_recipe": str(CACHED_RECIPE.relative_to(ROOT)),
        "budget_psnr": args.budget, "calibration_prompts": cal_prompts, "calibration_seed": CALIBRATION_SEED,
        "eval_prompts": len(eval_prompts), "eval_seed": EVAL_SEED, "rounds": args.rounds, "threads": args.threads,
        "eval_threads": args.eval_threads, "steps": recipe.sampler.steps, "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(), "weights": str(WEIGHTS.relative_to(ROOT)),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    head = f"{'row':<48} {'setting':<26} {'work skipped':>22} {'clip s':>7} {'vs eager':>8} {'PSNR':>7} {'worst':>6} {'acc all':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        skipped = ", ".join(f"{k.split('_')[0]} {100 * v:.0f}%" for k, v in r["work"].items())
        print(f"{name:<48} {json.dumps(r['setting'] or '')[:26]:<26} {skipped:>22} {r['seconds_median']:>7.3f} "
              f"{r['speedup_vs_eager']:>7.2f}x {r.get('psnr_db', float('inf')):>7.2f} {r.get('psnr_db_worst', float('inf')):>6.2f} "
              f"{100 * r['accuracy_all']:>7.1f}%")
    for hook, c in comparison.items():
        print(f"{hook}: " + (f"{c['dominating']} is {c['hook_over_vdopt_seconds']:.2f}x faster at equal or better mean and worst PSNR"
                             if c["dominating"] else "no vdopt row matches both its mean and its worst-clip PSNR"))
    print(f"vdopt beats every diffusers hook on wall clock at equal or better mean and worst PSNR: {'YES' if beats else 'NO'}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
