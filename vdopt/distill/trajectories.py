"""Stage 1: the synthetic trajectory data set (AccVideo's SynVid, in miniature).

The teacher solves the probability-flow ODE with guidance (flow-match Euler, its recipe's N steps
and guidance scale) for every (prompt, seed) pair and keeps the latents at the K + 1 key points the
student will use (uniform indices over the N-step schedule, [0, 12, 25, 37, 50] for K = 4 of
N = 50): x at index 0 is the initial noise, x at index N the teacher's sample.

Samples are numbered; sample j has prompt `j // seeds_per_prompt` and initial noise
`randn(shape, generator=Generator().manual_seed(seed * 1_000_003 + j))`, so every sample is the same
whichever process, shard size or resumption makes it. Shard s holds samples
[s * shard_size, (s + 1) * shard_size) in `trajectories/shard_{s:05d}.safetensors` (tensors
`latents` [S, K+1, C, F, H, W], `cond.<name>` [S, ...], `sample_ids`; metadata: prompts, key
indices, sigmas, the stage fingerprint). A shard is written to a temporary name and renamed, so an
interrupted run leaves complete shards only; a rerun skips shards that exist with the same
fingerprint. Under torchrun, shard s is made by rank s % world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vdopt.distill.common import Dist, PromptEncoder, Schedule, Teacher, latent_shape
from vdopt.distill.config import DistillSection, fingerprint
from vdopt.sampler import flow_euler_update, initial_noise


def shard_path(out: Path, index: int) -> Path:
    return out / "trajectories" / f"shard_{index:05d}.safetensors"


def num_samples(prompts: list[str], distill: DistillSection) -> int:
    return len(prompts) * distill.seeds_per_prompt


def stage_fingerprint(teacher: Teacher, distill: DistillSection, prompts: list[str], schedule: Schedule) -> str:
    sampler = teacher.recipe.sampler.model_dump(mode="json")
    return fingerprint("trajectories", str(teacher.path), os.path.getsize(teacher.path), sampler, prompts,
                       distill.seeds_per_prompt, distill.shard_size, distill.seed, schedule.key_indices,
                       teacher.recipe.model.input.model_dump(mode="json"))


def shard_is_complete(path: Path, digest: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == digest
    except Exception:  # noqa: BLE001 - a torn or foreign file is made again
        return False


@torch.no_grad()
def solve(teacher: Teacher, noise: torch.Tensor, cond: dict, uncond: dict, schedule: Schedule, on_step=None) -> list[torch.Tensor]:
    """Guided flow-match Euler from `noise`; the latents at the key indices."""
    g = teacher.recipe.sampler.guidance_scale
    sigmas, timesteps = schedule.teacher_sigmas, schedule.teacher_timesteps
    names = list(cond)
    both = [torch.cat([cond[n], uncond[n]]) for n in names]
    x, keep = noise, {0: noise}
    for i, t in enumerate(timesteps):
        out = teacher.denoiser(torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t)), *both)
        c, u = out.chunk(2)
        x = flow_euler_update(x, u + g * (c - u), sigmas[i], sigmas[i + 1])
        if i + 1 in schedule.key_indices:
            keep[i + 1] = x
        if on_step is not None:
            on_step()
    return [keep[k] for k in schedule.key_indices]


def make_trajectories(out: Path, teacher: Teacher, distill: DistillSection, prompts: list[str], schedule: Schedule,
                      dist: Dist = Dist(), progress: bool = True) -> list[Path]:
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    encode = PromptEncoder(teacher, distill, prompts)
    digest = stage_fingerprint(teacher, distill, prompts, schedule)
    total = num_samples(prompts, distill)
    shards = list(range((total + distill.shard_size - 1) // distill.shard_size))
    mine = [s for s in shards if s % dist.world == dist.rank and not shard_is_complete(shard_path(out, s), digest)]
    steps = len(schedule.teacher_timesteps)
    bar = tqdm(total=len(mine) * steps, desc=f"trajectories (rank {dist.rank})" if dist.world > 1 else "trajectories",
               unit="step", disable=not progress, leave=False)
    for s in mine:
        ids = list(range(s * distill.shard_size, min((s + 1) * distill.shard_size, total)))
        prompt_ids = [j // distill.seeds_per_prompt for j in ids]
        cond, uncond = encode(prompt_ids)
        noise = initial_noise(distill.seed * 1_000_003 + ids[0], latent_shape(teacher.recipe, teacher, len(ids)))
        latents = solve(teacher, noise, cond, uncond, schedule, on_step=lambda: bar.update(1))
        tensors = {"latents": torch.stack(latents, dim=1).contiguous(), "sample_ids": torch.tensor(ids),
                   "prompt_ids": torch.tensor(prompt_ids), **{f"cond.{k}": v.contiguous() for k, v in cond.items()}}
        meta = {"fingerprint": digest, "prompts": json.dumps([prompts[p] for p in prompt_ids]),
                "key_indices": json.dumps(schedule.key_indices), "sigmas": json.dumps(schedule.sigmas)}
        path = shard_path(out, s)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    bar.close()
    dist.barrier()
    missing = [s for s in shards if not shard_is_complete(shard_path(out, s), digest)]
    if missing:
        from vdopt.distill.common import DistillError

        raise DistillError(f"{out}/trajectories: shards {missing[:5]} are missing after the trajectory stage.")
    return [shard_path(out, s) for s in shards]


def load_trajectories(paths: list[Path]) -> dict[str, torch.Tensor]:
    """All shards, concatenated in sample order."""
    from safetensors.torch import load_file

    parts = [load_file(str(p)) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
