"""The `vdopt distill` command (also `python -m vdopt.distill.cli`, which torchrun can launch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


STAGES = ("trajectories", "train", "export")
CMD_STAGES = ("trajectories", "autoencoder", "content", "motion", "decoder", "export")


def distill(recipe_path: str | Path, teacher_path: str | Path, output: str | Path, *, stages: tuple[str, ...] | None = None,
            max_iterations: int | None = None, threads: int | None = None, progress: bool = True,
            log=lambda message: None) -> dict[str, Any]:
    """Runs the stages in order (default: all of the section's method); returns a summary (paths, iterations, last losses)."""
    import torch

    from vdopt.distill.common import DistillError, init_dist, load_teacher, prompt_list, schedule_for
    from vdopt.distill.common import threads as thread_count
    from vdopt.distill.config import load_distill_recipe
    from vdopt.distill.export import export_student
    from vdopt.distill.trajectories import make_trajectories
    from vdopt.distill.train import Trainer

    recipe, section, compile_recipe = load_distill_recipe(recipe_path)
    known = CMD_STAGES if section.method == "cmd" else STAGES
    stages = known if stages is None else stages
    if set(stages) - set(known):
        raise DistillError(f"--stage {', '.join(sorted(set(stages) - set(known)))}: distill.method {section.method} has the stages "
                           f"{', '.join(known)}.")
    out = Path(output)
    if threads is not None and threads < 1:
        raise DistillError(f"--threads {threads}: give a positive number of CPU threads.")
    try:
        if out.exists() and not out.is_dir():
            raise DistillError(f"{out}: is an existing file; -o names the student's directory (new, or one to resume in).")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistillError(f"{out}: cannot create the student's directory ({exc.strerror or exc}).") from None
    dist = init_dist()
    summary: dict[str, Any] = {"output": str(out), "world": dist.world}
    with thread_count(threads), torch.inference_mode(False):
        teacher = load_teacher(recipe, teacher_path)
        prompts = prompt_list(section)
        schedule = schedule_for(recipe, section)
        summary["schedule"] = {"key_indices": schedule.key_indices, "timesteps": schedule.timesteps}
        settings = out / "distill.json"
        current = {"recipe": compile_recipe, "distill": section.model_dump(mode="json"), "teacher": str(Path(teacher_path).resolve())}
        if dist.main:
            if settings.is_file():
                previous = with_defaults(read_settings(settings))
                changed = [k for k in ("recipe", "distill") if previous.get(k) != current[k]]
                # iteration counts, checkpoint cadence and export-only settings may change on resume; nothing else
                if changed and not _only_resumable_changes(previous, current):
                    raise DistillError(f"{out}: holds a distillation with different settings ({', '.join(changed)}); "
                                       f"use a new output directory or delete {settings}.")
            settings.write_text(json.dumps(current, indent=2, default=str))
        if section.method == "cmd":
            summary.update(distill_cmd(out, teacher, section, prompts, schedule, compile_recipe, stages, dist, max_iterations, progress, log))
            dist.barrier()
            return summary
        shards = make_trajectories(out, teacher, section, prompts, schedule, dist, progress) if "trajectories" in stages or "train" in stages else []
        summary["shards"] = len(shards)
        log(f"trajectories: {len(shards)} shard(s) in {out / 'trajectories'}")
        trainer = None
        if "train" in stages or "export" in stages:
            from vdopt.distill.trajectories import load_trajectories

            if not shards:
                shards = sorted((out / "trajectories").glob("shard_*.safetensors"))
            if not shards:
                raise DistillError(f"{out}: no trajectories; run the trajectories stage first.")
            trainer = Trainer(out, teacher, section, load_trajectories(shards), schedule, dist)
            resumed = trainer.resume()
            log(f"training: {'resumed at' if resumed else 'starting at'} iteration {trainer.iteration}")
            if "train" in stages:
                trainer.run(max_iterations=max_iterations, progress=progress)
            summary["iterations"] = trainer.iteration
            summary["last"] = trainer.log[-1] if trainer.log else None
        if "export" in stages and trainer is not None and dist.main:
            if trainer.iteration < section.iterations:
                log(f"export skipped: training stopped at {trainer.iteration}/{section.iterations} iterations")
            else:
                weights, recipe_file = export_student(out, teacher, section, schedule, trainer.ema, compile_recipe, trainer.iteration,
                                                      trainer.bypassed)
                summary.update(weights=str(weights), recipe=str(recipe_file))
                log(f"export: {weights} and {recipe_file}")
    dist.barrier()
    return summary


def distill_cmd(out: Path, teacher, section, prompts: list[str], schedule, compile_recipe: dict, stages: tuple[str, ...], dist,
                max_iterations: int | None, progress: bool, log) -> dict[str, Any]:
    """The CMD method's stages (vdopt.cmd.train); stops at the first training stage that does not finish."""
    from vdopt.cmd.export import export_cmd
    from vdopt.cmd.train import STAGES as TRAINING, run_stage, stage_weights
    from vdopt.distill.trajectories import load_trajectories, make_trajectories

    summary: dict[str, Any] = {"method": "cmd"}
    shards: list[Path] = []
    if ("trajectories" in stages or "motion" in stages
            or ({"autoencoder", "decoder"} & set(stages) and section.cmd.autoencoder_teacher_fraction)):
        shards = make_trajectories(out, teacher, section, prompts, schedule, dist, progress)
        log(f"trajectories: {len(shards)} shard(s) in {out / 'trajectories'}")
    for name in (s for s in TRAINING if s in stages):
        if not run_stage(name, out, teacher, section, lambda: load_trajectories(shards), prompts, dist, max_iterations, progress, log):
            summary["stopped"] = name
            return summary
    if "export" in stages and dist.main:
        missing = [s for s in TRAINING if not stage_weights(out, s).is_file()]
        if missing:
            log(f"export skipped: stages {', '.join(missing)} have not finished")
        else:
            weights, recipe_file = export_cmd(out, teacher, section, compile_recipe)
            summary.update(weights=str(weights), recipe=str(recipe_file))
            log(f"export: {weights} and {recipe_file}")
    return summary


def read_settings(path: Path) -> dict:
    """The settings an output directory's distill.json records."""
    from vdopt.distill.common import DistillError

    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistillError(f"{path}: unreadable ({exc}); use a new output directory or delete it.") from None
    if not isinstance(settings, dict):
        raise DistillError(f"{path}: holds {type(settings).__name__}, not a distillation's settings; use a new output "
                           f"directory or delete it.")
    return settings


def with_defaults(settings: dict) -> dict:
    """A distill.json as this version reads it: settings added since it was written take their defaults (so a run made
    before a new option, which would have used the default, still resumes)."""
    from pydantic import ValidationError

    from vdopt.distill.config import DistillSection

    try:
        return {**settings, "distill": DistillSection.model_validate(settings.get("distill", {})).model_dump(mode="json")}
    except (ValidationError, TypeError):
        return settings  # compared as written: a setting since removed or renamed is a difference


def _only_resumable_changes(previous: dict, current: dict) -> bool:
    loose = ("iterations", "checkpoint_every", "keep_checkpoints")
    loose_cmd = ("autoencoder_iterations", "content_iterations", "motion_iterations", "decoder_iterations", "checkpoint_every",
                 "motion_guidance")

    def strip(section: dict) -> dict:
        kept = {k: v for k, v in section.items() if k not in loose}
        if isinstance(kept.get("cmd"), dict):
            kept["cmd"] = {k: v for k, v in kept["cmd"].items() if k not in loose_cmd}
        return kept

    return previous.get("recipe") == current["recipe"] and strip(previous.get("distill", {})) == strip(current["distill"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a compile recipe with a `distill:` section (recipes/distill_reference.yaml)")
    p.add_argument("teacher", help="the teacher's weights (.safetensors / .pt state dict)")
    p.add_argument("-o", "--output", required=True, help="student directory: trajectories/, checkpoints/, student.safetensors, recipe.yaml")
    p.add_argument("--stage", choices=("all", *dict.fromkeys(STAGES + CMD_STAGES)), default="all",
                   help="run one stage only (default: all of the recipe's distill.method, resuming)")
    p.add_argument("--max-iterations", type=int, help="stop training at this iteration (checkpointed); rerun to continue")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")


def cmd_distill(args: argparse.Namespace) -> int:
    stages = None if args.stage == "all" else (args.stage,)
    summary = distill(args.recipe, args.teacher, args.output, stages=stages, max_iterations=args.max_iterations,
                      threads=args.threads, progress=not args.quiet, log=lambda m: print(f"[vdopt distill] {m}", file=sys.stderr))
    if summary.get("world", 1) == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a few-step, guidance-free student from a guided teacher")
    add_arguments(p)
    p.set_defaults(func=cmd_distill)


def main(argv: list[str] | None = None) -> int:
    from vdopt.cli import standalone

    return standalone("distill", __doc__, add_arguments, cmd_distill, argv)


if __name__ == "__main__":
    sys.exit(main())
