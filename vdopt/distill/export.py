"""Stage 3: the student as a weights file, its schedule, and a recipe that compiles it.

`student.safetensors` holds the EMA student weights under the teacher file's own layout (the
reference family: `transformer.` + the teacher's `conditioner.` tensors, so the file is also a
complete model for `vdopt compile`), with the schedule as JSON metadata (`vdopt_schedule`:
timesteps, sigmas, shift, steps, the teacher's steps and the key indices). `recipe.yaml` is the
teacher's compile recipe with `passes: [reduce_steps]` pointing at it:

    vdopt compile student/recipe.yaml teacher.safetensors -o student.vdopt
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from vdopt.distill.common import Schedule, Teacher
from vdopt.distill.config import DistillSection

WEIGHTS = "student.safetensors"
RECIPE = "recipe.yaml"


def schedule_metadata(teacher: Teacher, distill: DistillSection, schedule: Schedule) -> dict[str, Any]:
    return {"timesteps": schedule.timesteps, "sigmas": schedule.sigmas, "steps": distill.student_steps,
            "shift": teacher.recipe.sampler.shift, "teacher_steps": teacher.recipe.sampler.steps,
            "key_indices": schedule.key_indices, "distilled_guidance_scale": teacher.recipe.sampler.guidance_scale}


def export_student(out: Path, teacher: Teacher, distill: DistillSection, schedule: Schedule, ema: dict[str, torch.Tensor],
                   compile_recipe: dict[str, Any], iterations: int, bypassed: dict[str, torch.Tensor] | None = None) -> tuple[Path, Path]:
    """`bypassed`: the weights of blocks the student was trained without (distill.prune), kept so the file is a whole
    model; the recipe's prune_temporal removes them after reduce_steps loads it."""
    prefixed = any(k.startswith("transformer.") for k in teacher.state)
    tensors = {("transformer." if prefixed else "") + k: v.detach().contiguous() for k, v in {**(bypassed or {}), **ema}.items()}
    tensors.update({k: v.contiguous() for k, v in teacher.state.items() if k.startswith("conditioner.")})
    meta = schedule_metadata(teacher, distill, schedule)
    weights = out / WEIGHTS
    tmp = weights.with_name(WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "vdopt_schedule": json.dumps(meta), "iterations": str(iterations)})
    os.replace(tmp, weights)
    recipe = dict(compile_recipe)
    recipe["sampler"] = {**recipe.get("sampler", {}), "kind": "flow_euler", "steps": distill.student_steps, "guidance_scale": 1.0}
    prune = [{"name": "prune_temporal", "params": spec.model_dump(mode="json")} for spec in distill.prune]
    recipe["passes"] = [{"name": "reduce_steps", "params": {"weights": str(weights.resolve()), "timesteps": schedule.timesteps}},
                        *prune] + [p for p in recipe.get("passes", []) if (p if isinstance(p, str) else p.get("name")) not in
                                   ("reduce_steps", "prune_temporal")]
    header = (f"# Few-step student distilled by `vdopt distill` ({iterations} iterations) from {teacher.path}.\n"
              f"# {distill.student_steps} steps at timesteps {schedule.timesteps}, no guidance (distilled in)"
              f"{''.join(f', trained without {spec.what} blocks {spec.blocks}' for spec in distill.prune)}.\n"
              f"#   vdopt compile {out / RECIPE} {teacher.path} -o student.vdopt\n")
    recipe_path = out / RECIPE
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return weights, recipe_path
