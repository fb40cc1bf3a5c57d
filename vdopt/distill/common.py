"""What every distillation stage shares: the teacher, the prompts, the schedule, the process group."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vdopt.capture import check_state_dict, model_config, read_state_dict
from vdopt.distill.config import DistillSection, PruneSpec
from vdopt.errors import VdoptError
from vdopt.families import descriptor_for
from vdopt.families.base import ArchitectureDescriptor, bypass
from vdopt.recipe import Recipe
from vdopt.sampler import step_table


class DistillError(VdoptError):
    pass


# ----- processes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Mean of the ranks' gradients (each rank's loss is the mean over its equal share of the batch)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()


def init_dist() -> Dist:
    """One process, or a torchrun worker (gloo, so CPUs work): the process group from the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----- the teacher ----------------------------------------------------------------------------

@dataclass
class Teacher:
    recipe: Recipe
    descriptor: ArchitectureDescriptor
    config: dict
    model: nn.Module  # the diffusers module
    denoiser: nn.Module  # descriptor.adapter(model): (x, t, *cond) -> prediction
    state: dict[str, torch.Tensor]  # the raw file (kept for the conditioner and the export)
    path: Path

    def build_copy(self) -> tuple[nn.Module, nn.Module]:
        """A fresh (model, denoiser) with the teacher's weights: the student's starting point."""
        model = self.descriptor.build(self.config)
        model.load_state_dict(self.model.state_dict())
        return model, self.descriptor.adapter(model)


def bypass_blocks(model: nn.Module, descriptor: ArchitectureDescriptor, spec: PruneSpec) -> dict[str, torch.Tensor]:
    """Replaces the blocks `spec` names with `Bypassed`; returns their weights (the export keeps them, so the weights
    file stays a whole model that reduce_steps loads before prune_temporal removes them)."""
    if spec.what == "temporal" and descriptor.temporal_block_pattern is None:
        raise DistillError(f"distill.prune: the {descriptor.family} family has no separate temporal blocks; use what: blocks.")
    matches = descriptor.is_temporal_block if spec.what == "temporal" else descriptor.is_block
    paths = [name for name, _ in model.named_modules() if name and matches(name)]
    try:
        chosen = descriptor.name_blocks(paths, spec.blocks, spec.what)
    except ValueError as exc:
        raise DistillError(f"distill.prune: {exc}.") from None
    removed = {f"{path}.{k}": v.detach().clone() for path in chosen for k, v in model.get_submodule(path).state_dict().items()}
    bypass(model, chosen)
    return removed


def build_student(teacher: "Teacher", distill: DistillSection) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """The student's starting point: the teacher's weights or `init_weights`, with `prune`'s blocks bypassed;
    (model, denoiser, the bypassed blocks' weights)."""
    model, denoiser = teacher.build_copy()
    if distill.init_weights is not None:
        path = Path(distill.init_weights)
        if not path.is_file():
            raise DistillError(f"distill.init_weights: {path} not found.")
        state = teacher.descriptor.checkpoint_state(read_state_dict(path))
        check_state_dict(model, state, path, teacher.descriptor.family)
        model.load_state_dict(state)
    removed = {}
    for spec in distill.prune:
        removed.update(bypass_blocks(model, teacher.descriptor, spec))
    return model, denoiser, removed


def load_teacher(recipe: Recipe, path: str | Path) -> Teacher:
    descriptor = descriptor_for(recipe.model.family)
    config = model_config(recipe, descriptor)
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: teacher weights not found.")
    raw = read_state_dict(path)
    state = descriptor.checkpoint_state(raw)
    model = descriptor.build(config)
    check_state_dict(model, state, path, descriptor.family)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return Teacher(recipe, descriptor, config, model, descriptor.adapter(model), raw, path)


# ----- prompts --------------------------------------------------------------------------------

def prompt_list(distill: DistillSection) -> list[str]:
    if isinstance(distill.prompts, list):
        return list(distill.prompts)
    from vdopt.data.moving_shapes import prompt_of, sample_attrs

    return [prompt_of(a) for a in sample_attrs(distill.prompts, distill.seed, "train")]


class PromptEncoder:
    """`(cond, uncond)` dicts for prompt indices: the reference conditioner, or a cond file."""

    def __init__(self, teacher: Teacher, distill: DistillSection, prompts: list[str]):
        self.teacher, self.prompts = teacher, prompts
        self.names = [c.name for c in teacher.descriptor.cond_inputs]
        self.conditioner = None
        self.table = None
        if distill.cond_file is not None:
            from safetensors.torch import load_file

            self.table = load_file(distill.cond_file)
            rows = {k: v.shape[0] for k, v in self.table.items() if k.startswith("cond.")}
            if set(rows) != {f"cond.{n}" for n in self.names} or any(r < len(prompts) for r in rows.values()):
                raise DistillError(f"{distill.cond_file}: needs cond.{{{', '.join(self.names)}}} with at least {len(prompts)} rows.")
        elif teacher.descriptor.family == "reference":
            from vdopt.reference.model import PromptConditioner

            conditioner_state = {k.removeprefix("conditioner."): v for k, v in teacher.state.items() if k.startswith("conditioner.")}
            if not conditioner_state:
                raise DistillError(f"{teacher.path}: the reference teacher file holds no `conditioner.` tensors.")
            self.conditioner = PromptConditioner(dim=conditioner_state["pos"].shape[1], tokens=conditioner_state["pos"].shape[0])
            self.conditioner.load_state_dict(conditioner_state)
            self.conditioner.eval().requires_grad_(False)
        else:
            raise DistillError(f"the {teacher.descriptor.family} family has no prompt encoder in vdopt: give distill.cond_file "
                               f"(safetensors with cond.<name> [N, ...] rows, one per prompt index).")

    @torch.no_grad()
    def __call__(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.conditioner is not None:
            cond = {"encoder_hidden_states": self.conditioner.encode([self.prompts[i] for i in indices])}
            uncond = {"encoder_hidden_states": self.conditioner.null(len(indices)).contiguous()}
            return cond, uncond
        cond = {n: self.table[f"cond.{n}"][indices] for n in self.names}
        uncond = {n: self.table[f"uncond.{n}"][indices] for n in self.names} if f"uncond.{self.names[0]}" in self.table \
            else self.teacher.descriptor.null_cond(cond)
        return cond, uncond


# ----- the schedule ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    teacher_timesteps: list[float]
    teacher_sigmas: list[float]  # N + 1 values, the last 0
    key_indices: list[int]  # K + 1 indices into teacher_sigmas, the first 0, the last N

    @property
    def sigmas(self) -> list[float]:
        return [self.teacher_sigmas[k] for k in self.key_indices]

    @property
    def timesteps(self) -> list[float]:
        """The student's model timesteps (sigma * 1000, the flow-match convention)."""
        return [s * 1000.0 for s in self.sigmas[:-1]]


def schedule_for(recipe: Recipe, distill: DistillSection) -> Schedule:
    table = step_table(recipe.sampler)
    steps = recipe.sampler.steps
    keys = [int(steps * k / distill.student_steps) for k in range(distill.student_steps + 1)]  # [0, 12, 25, 37, 50]
    return Schedule(table["timesteps"].tolist(), table["sigmas"].tolist(), keys)


def latent_shape(recipe: Recipe, teacher: Teacher, batch: int) -> tuple[int, ...]:
    spec = recipe.model.input
    sizes = [getattr(spec, n).trace_size for n in ("frames", "height", "width")]
    return (batch, teacher.descriptor.in_channels(teacher.config), *sizes)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
