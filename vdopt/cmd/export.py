"""The CMD stage's export: `cmd.safetensors` (every part's EMA weights) and a recipe that compiles the CMD form.

The recipe is the teacher's compile recipe with `rewrite_content_motion` first in its passes:

    vdopt compile out/cmd/recipe.yaml teacher.safetensors -o cmd.vdopt
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from vdopt.cmd.model import CMD_FILE, ContentMotionAutoencoder, MotionDiT, save_cmd
from vdopt.cmd.train import content_model, stage_weights
from vdopt.distill.common import Teacher
from vdopt.distill.config import DistillSection

RECIPE = "recipe.yaml"


def export_cmd(out: Path, teacher: Teacher, distill: DistillSection, compile_recipe: dict[str, Any]) -> tuple[Path, Path]:
    section = distill.cmd
    autoencoder = ContentMotionAutoencoder(**section.autoencoder)
    autoencoder.load_state_dict(load_file(str(stage_weights(out, "decoder"))))  # the autoencoder, its decoder fine-tuned
    with safe_open(str(stage_weights(out, "motion")), "pt") as f:
        motion = MotionDiT(**json.loads(f.metadata()["config"]))
    motion.load_state_dict(load_file(str(stage_weights(out, "motion"))))
    content = load_file(str(stage_weights(out, "content")))
    _, _, removed = content_model(teacher)
    conditioner = {k.removeprefix("conditioner."): v for k, v in teacher.state.items() if k.startswith("conditioner.")}
    guidance = {} if section.motion_guidance is None else {"motion_guidance": section.motion_guidance}
    weights = save_cmd(out / CMD_FILE, autoencoder, motion, content, conditioner,
                       {"content_removed_blocks": removed, "teacher": str(teacher.path), **guidance})
    recipe = dict(compile_recipe)
    recipe["passes"] = [{"name": "rewrite_content_motion", "params": {"weights": str(weights.resolve())}},
                        *[p for p in recipe.get("passes", []) if (p if isinstance(p, str) else p.get("name")) != "rewrite_content_motion"]]
    header = (f"# The CMD form of {teacher.path} (`vdopt distill --method cmd`): a content frame from the teacher at one\n"
              f"# frame, a motion latent from a small DiT, one decode. Stages: content loop -> motion loop -> decode.\n"
              f"#   vdopt compile {out / RECIPE} {teacher.path} -o cmd.vdopt\n")
    recipe_path = out / RECIPE
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return weights, recipe_path

