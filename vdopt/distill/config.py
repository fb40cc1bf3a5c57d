"""The `distill:` section of a distillation recipe, and how it is read.

A distillation recipe is an ordinary compile recipe (model, sampler: the *teacher's* guided
schedule) plus a `distill:` section. `load_distill_recipe` splits the two, so the compile part is
validated exactly as `vdopt compile` validates it and the exported student recipe reuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from vdopt.cmd.model import AUTOENCODER_CONFIG, MOTION_CONFIG
from vdopt.errors import RecipeError

MOTION_KEYS = ("width", "depth", "heads", "motion_patch", "content_patch")
from vdopt.recipe import Recipe, Strict, key_path, parse_recipe, read_yaml


class PruneSpec(Strict):
    blocks: list[int | str] = Field(min_length=1, description="Block indices (among the model's blocks of kind `what`) or module paths, as prune_temporal takes them.")
    what: Literal["temporal", "blocks"] = "temporal"


class CMDSection(Strict):
    """`distill.cmd`: the CMD form's four training stages (vdopt.cmd.train)."""

    autoencoder: dict[str, int] = Field(default_factory=lambda: dict(AUTOENCODER_CONFIG), description="ContentMotionAutoencoder arguments.")
    autoencoder_iterations: int = Field(2000, ge=1)
    autoencoder_batch: int = Field(16, ge=1)
    autoencoder_lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    autoencoder_teacher_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of each autoencoder batch taken from the teacher's samples (flipped, "
        "transposed, time-reversed at random), the rest fresh real clips: every CMD clip is decoded from generated "
        "latents, so the decoder must be faithful on the teacher's outputs, not only on real clips.")
    content_iterations: int = Field(1500, ge=1)
    content_batch: int = Field(32, ge=1)
    content_lr: float = Field(3e-4, gt=0, allow_inf_nan=False)
    motion: dict[str, int] = Field(default_factory=lambda: {k: v for k, v in MOTION_CONFIG.items() if k in MOTION_KEYS},
                                   description="MotionDiT arguments (width, depth, heads, patches; sizes come from the data).")
    motion_iterations: int = Field(3000, ge=1)
    motion_batch: int = Field(32, ge=1)
    motion_lr: float = Field(5e-4, gt=0, allow_inf_nan=False)
    motion_guidance: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="The motion loop's guidance scale, recorded in cmd.safetensors (the "
        "motion DiT learns the teacher's guided samples, which carry the teacher's guidance already); None: the "
        "recipe's guidance_scale. Read at export only.")
    decoder_iterations: int = Field(1500, ge=1)
    decoder_lr: float = Field(3e-4, gt=0, allow_inf_nan=False)
    content_corruption: float = Field(
        0.4, ge=0, le=1, description="The decoder stage's content frames: for half of each batch, the content "
        "generator's guided estimate of the frame from it noised to a level drawn in [0, this] (0: clean frames only), "
        "so the decoder learns to draw a clip from a content frame with the generator's errors in it.")
    ema_decay: float = Field(0.999, ge=0, le=1)
    checkpoint_every: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "CMDSection":
        unknown = sorted(set(self.autoencoder) - set(AUTOENCODER_CONFIG)) + sorted(set(self.motion) - set(MOTION_KEYS))
        if unknown:
            raise ValueError(f"unknown model arguments {unknown}; the autoencoder takes {sorted(AUTOENCODER_CONFIG)}, "
                             f"the motion DiT {sorted(MOTION_KEYS)}")
        return self


class DistillSection(Strict):
    method: Literal["steps", "cmd"] = Field("steps", description="steps: a few-step student (AccVideo); cmd: the CMD form "
                                            "(content frame + motion latent, vdopt.cmd).")
    cmd: CMDSection = Field(default_factory=CMDSection)
    student_steps: int = Field(4, ge=1, le=64, description="Steps of the student; key points are uniform over the teacher's schedule.")
    # --- stage 1: trajectories (AccVideo's synthetic data set) ---
    prompts: int | list[str] = Field(64, description="A number of moving-shapes prompts (train split, drawn with `seed`), or the prompts.")
    seeds_per_prompt: int = Field(4, ge=1)
    shard_size: int = Field(16, ge=1, description="Samples per trajectory shard (also the teacher's batch).")
    cond_file: str | None = Field(None, description="Families without a prompt encoder: safetensors with `cond.<name>` [N, ...] per prompt index.")
    # --- stage 2: training ---
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1, description="Global batch of (sample, key point) transitions per iteration.")
    lr: float = Field(2e-5, gt=0, allow_inf_nan=False)
    disc_lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.0, 0.999), description="Adam's betas, each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    adv_weight: float = Field(0.1, ge=0, allow_inf_nan=False, description="Weight of the adversarial (hinge) generator loss; 0 disables the discriminator.")
    adv_start: int = Field(0, ge=0, description="Iteration at which the adversarial loss starts (trajectory loss only before).")
    disc_blocks: int | list[int] = Field(3, description="How many teacher blocks (evenly spaced) feed discriminator heads, or their indices.")
    head_dim: int = Field(64, ge=4)
    ema_decay: float = Field(0.999, ge=0, le=1, description="EMA decay, reached after a warm-up: min(ema_decay, (1 + n) / (10 + n)) after iteration n.")
    # --- recovery of a pruned network (SnapGen-V) ---
    prune: list[PruneSpec] = Field(default_factory=list, description="Train the student with these blocks removed "
                                   "(identity), as prune_temporal removes them from the compiled program; the exported recipe "
                                   "prunes them. One spec, or a list with one spec per kind (temporal blocks and main blocks).")
    init_weights: str | None = Field(None, description="Start the student from this weights file (a distilled student) "
                                     "instead of the teacher's weights.")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0, lt=2**31, description="Seed of the prompts, the noise and the data order.")

    @field_validator("prune", mode="before")
    @classmethod
    def _one_spec_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else [] if value is None else value

    @model_validator(mode="after")
    def _check(self) -> "DistillSection":
        if isinstance(self.prompts, int) and self.prompts < 1:
            raise ValueError("prompts must be a positive count or a list")
        kinds = [spec.what for spec in self.prune]
        if len(set(kinds)) != len(kinds):
            raise ValueError("prune: give one spec per kind of block (what: temporal, what: blocks), each with all its blocks")
        return self


def load_distill_recipe(path: str | Path) -> tuple[Recipe, DistillSection, dict[str, Any]]:
    """(compile recipe, distill section, the raw compile-recipe mapping) of a distillation recipe file."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or "distill" not in data:
        raise RecipeError(f"{path}: a distillation recipe is a compile recipe with a `distill:` section (see recipes/distill_reference.yaml).")
    section = data.pop("distill") or {}
    recipe = parse_recipe(data, str(path))
    if recipe.sampler.kind != "flow_euler":
        raise RecipeError(f"{path}: 'sampler.kind': distillation needs the flow_euler teacher sampler (got {recipe.sampler.kind}).")
    try:
        distill = DistillSection.model_validate(section)
    except ValidationError as exc:
        problems = "; ".join(f"'distill.{key_path(e['loc'])}': {e['msg']}" for e in exc.errors()[:5])
        raise RecipeError(f"{path}: invalid distill section: {problems}.") from None
    if distill.student_steps > recipe.sampler.steps:
        raise RecipeError(f"{path}: 'distill.student_steps' ({distill.student_steps}) exceeds the teacher's sampler.steps ({recipe.sampler.steps}).")
    return recipe, distill, data


def fingerprint(*parts: Any) -> str:
    """A short digest of what a stage's output depends on (refuses to resume into different settings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
