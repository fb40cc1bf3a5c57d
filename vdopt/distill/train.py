"""Stage 2: train the few-step student from the trajectories.

The student starts as a copy of the teacher. One training item is a transition (sample j, key k):
the stored latent x_k at sigma_k, its target x_{k+1} at sigma_{k+1}, and sample j's prompt.

* **Trajectory loss** (AccVideo's trajectory-based few-step guidance): one Euler step of the
  student, with its own velocity and *no guidance* (it only ever sees `cond`),
  `x_hat = x_k + (sigma_{k+1} - sigma_k) * v_student(x_k, t_k, cond)`, must land on the teacher's
  guided key point: `L_traj = mean((x_hat - x_{k+1})^2)`. Guidance is thereby distilled in.
* **Adversarial loss.** The discriminator is the *frozen teacher* used as a noise-aware feature
  extractor -- forward hooks on a few of its transformer blocks (found with the family descriptor's
  block pattern, evenly spaced) -- plus small trainable heads. Both real (x_{k+1}) and fake (x_hat)
  live at the same noise level sigma_{k+1}, so the teacher sees them at timestep t_{k+1} and no
  re-noising is needed. A head reshapes its block's output to [B, tokens, D] (any family whose
  block outputs lead with the batch, possibly folded with frames or positions), normalises it,
  modulates it with a sinusoidal embedding of t_{k+1} (scale and shift from a small MLP: the heads
  are timestep-aware) and maps each token to a logit with a two-layer MLP; the logits are averaged
  over tokens and over heads. Hinge loss: the discriminator minimises
  `mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`; the student minimises `-mean(D(fake))`
  (gradients reach it through the frozen teacher). Total student loss
  `L_traj + adv_weight * L_adv` from iteration `adv_start` on.
* **EMA** of the student's weights, which is what is exported, with diffusers' `EMAModel` warm-up:
  the decay after iteration n is `min(ema_decay, (1 + n) / (10 + n))`. Without it the average
  starts at the teacher and, after the reference run's 2 000 iterations at 0.999, still holds
  0.999^2000 = 13.5 % of the teacher's weights: that student scored 93.4 % shape accuracy against
  96.1 % for its raw weights.

Data order. Iteration n trains on the transitions `randperm(items, Generator(seed, n))[:batch]`
(with replacement when the batch exceeds the data), a pure function of n: a resumed run, or a run on
more processes, sees the same global batches. Under torchrun rank r takes items r, r + world, ... of
each global batch, computes the mean loss over its share, and gradients are averaged with one
all-reduce: the same update as one process, up to float summation order (the all-reduce and the
per-rank batch sizes change the order in which the same numbers are added).

Checkpoints every `checkpoint_every` iterations (and at a stop): student, EMA, heads, both
optimisers, the iteration and the RNG state, written atomically; a rerun resumes from the newest.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vdopt.distill.common import Dist, DistillError, Schedule, Teacher, atomic_save, build_student
from vdopt.distill.config import DistillSection
from vdopt.sampler import flow_euler_update


# ----- the discriminator -----------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Head(nn.Module):
    """Timestep-aware head on one block's features: [B*, L, D] -> one logit per sample."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.time[-1].weight)
        nn.init.zeros_(self.time[-1].bias)

    def forward(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = t.shape[0]
        h = self.norm(features.reshape(batch, -1, features.shape[-1]).float())
        scale, shift = self.time(timestep_embedding(t, self.hidden)).chunk(2, dim=-1)
        h = h * (1 + scale[:, None]) + shift[:, None]
        return self.mlp(h).squeeze(-1).mean(dim=1)


def discriminator_blocks(teacher: Teacher, choice: int | list[int]) -> list[tuple[str, nn.Module]]:
    blocks = [(name, m) for name, m in teacher.model.named_modules() if teacher.descriptor.is_block(name)]
    if not blocks:
        raise DistillError(f"no {teacher.descriptor.family} blocks (pattern '{teacher.descriptor.block_pattern}') in the teacher.")
    if isinstance(choice, list):
        if any(not 0 <= i < len(blocks) for i in choice):
            raise DistillError(f"distill.disc_blocks {choice}: the teacher has {len(blocks)} blocks.")
        return [blocks[i] for i in choice]
    count = max(1, min(choice, len(blocks)))
    picks = sorted({round((k + 1) * len(blocks) / count) - 1 for k in range(count)})
    return [blocks[i] for i in picks]


class FeatureDiscriminator(nn.Module):
    """The frozen teacher's block features (forward hooks) + trainable heads. Only the heads train."""

    def __init__(self, teacher: Teacher, distill: DistillSection):
        super().__init__()
        self.teacher = [teacher]  # not a submodule: its weights are neither trained nor checkpointed here
        self.names = [name for name, _ in discriminator_blocks(teacher, distill.disc_blocks)]
        self._features: dict[str, torch.Tensor] = {}
        self._hooks = []
        for name, module in discriminator_blocks(teacher, distill.disc_blocks):
            self._hooks.append(module.register_forward_hook(self._keep(name)))
        dims = self._probe_dims(teacher)
        self.heads = nn.ModuleDict({re.sub(r"\W", "_", n): Head(dims[n], distill.head_dim) for n in self.names})

    def _keep(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self._features[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _probe_dims(self, teacher: Teacher) -> dict[str, int]:
        shape = teacher.recipe.model.input
        sizes = [getattr(shape, n).trace_size for n in ("frames", "height", "width")]
        x = torch.zeros(1, teacher.descriptor.in_channels(teacher.config), *sizes)
        cond = teacher.descriptor.example_cond(teacher.config, 1, teacher.recipe.model.input.text_len, torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.features(x, torch.zeros(1), list(cond.values()))
        return {n: f.shape[-1] for n, f in self._features.items()}

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> list[torch.Tensor]:
        self._features.clear()
        self.teacher[0].denoiser(x, t, *cond)
        return [self._features[n] for n in self.names]

    def logits(self, features: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.heads[re.sub(r"\W", "_", n)](f, t) for n, f in zip(self.names, features)]).mean(0)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


# ----- training ---------------------------------------------------------------------------------

def ema_decay_at(iteration: int, decay: float) -> float:
    return min(decay, (1 + iteration) / (10 + iteration))


def batch_indices(iteration: int, items: int, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 7_919 + iteration)
    if batch <= items:
        return torch.randperm(items, generator=generator)[:batch]
    return torch.randint(0, items, (batch,), generator=generator)


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("ckpt_*.pt"))


class Trainer:
    def __init__(self, out: Path, teacher: Teacher, distill: DistillSection, data: dict[str, torch.Tensor],
                 schedule: Schedule, dist: Dist = Dist()):
        if distill.batch_size % dist.world:
            raise DistillError(f"distill.batch_size {distill.batch_size} must be divisible by the number of processes ({dist.world}).")
        self.out, self.teacher, self.distill, self.data, self.schedule, self.dist = out, teacher, distill, data, schedule, dist
        self.cond_names = [k for k in data if k.startswith("cond.")]
        self.samples = data["latents"].shape[0]
        self.steps = len(schedule.key_indices) - 1
        torch.manual_seed(distill.seed)
        self.model, self.student, self.bypassed = build_student(teacher, distill)
        self.model.train().requires_grad_(True)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.disc = FeatureDiscriminator(teacher, distill)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=distill.lr, betas=distill.betas, weight_decay=distill.weight_decay)
        self.disc_opt = torch.optim.AdamW(self.disc.heads.parameters(), lr=distill.disc_lr, betas=distill.betas)
        self.iteration = 0
        self.log: list[dict] = []

    # ----- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"iteration": self.iteration, "model": self.model.state_dict(), "ema": self.ema,
                "heads": self.disc.heads.state_dict(), "opt": self.opt.state_dict(), "disc_opt": self.disc_opt.state_dict(),
                "rng": torch.get_rng_state(), "log": self.log}

    def save(self) -> Path | None:
        if not self.dist.main:
            return None
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        path = self.out / "checkpoints" / f"ckpt_{self.iteration:07d}.pt"
        atomic_save(self.state(), path)
        for old in checkpoints(self.out)[: -self.distill.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def resume(self) -> bool:
        found = checkpoints(self.out)
        if not found:
            return False
        state = torch.load(found[-1], map_location="cpu", weights_only=True)
        model_keys, saved_keys = set(self.model.state_dict()), set(state["model"])
        if model_keys != saved_keys:
            differ = sorted(model_keys ^ saved_keys)
            raise DistillError(f"{found[-1]} is a checkpoint of another network ({len(differ)} parameters differ, first "
                               f"{differ[0]}): was {self.out} trained with another prune: spec or model? Use a fresh "
                               f"output directory, or move its checkpoints/ away.")
        self.model.load_state_dict(state["model"])
        self.ema = state["ema"]
        self.disc.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.disc_opt.load_state_dict(state["disc_opt"])
        torch.set_rng_state(state["rng"])
        self.iteration, self.log = state["iteration"], list(state["log"])
        return True

    # ----- one iteration --------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, ...]:
        items = batch_indices(self.iteration, self.samples * self.steps, self.distill.batch_size, self.distill.seed)
        items = items[self.dist.rank:: self.dist.world]
        sample, key = items // self.steps, items % self.steps
        latents = self.data["latents"]
        sigmas = torch.tensor(self.schedule.sigmas, dtype=torch.float32)
        cond = [self.data[n][sample] for n in self.cond_names]
        return latents[sample, key], latents[sample, key + 1], sigmas[key], sigmas[key + 1], cond

    def step(self) -> dict:
        x, target, sigma, sigma_next, cond = self.batch()
        shape = (-1,) + (1,) * (x.dim() - 1)
        velocity = self.student(x, sigma * 1000.0, *cond)
        fake = flow_euler_update(x, velocity, sigma.view(shape), sigma_next.view(shape))
        traj = F.mse_loss(fake, target)
        loss, record = traj, {"iteration": self.iteration, "traj": traj.item()}
        adversarial = self.distill.adv_weight > 0 and self.iteration >= self.distill.adv_start
        t_next = sigma_next * 1000.0
        if adversarial:
            fake_features = self.disc.features(fake, t_next, cond)
            g_adv = -self.disc.logits(fake_features, t_next).mean()
            loss = loss + self.distill.adv_weight * g_adv
            record["g_adv"] = g_adv.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.params)
        if self.distill.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.distill.grad_clip)
        self.opt.step()
        if adversarial:
            with torch.no_grad():
                real_features = self.disc.features(target, t_next, cond)
            d_loss = hinge_d_loss(self.disc.logits(real_features, t_next), self.disc.logits([f.detach() for f in fake_features], t_next))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.dist.average_gradients(list(self.disc.heads.parameters()))
            self.disc_opt.step()
            record["d"] = d_loss.item()
        with torch.no_grad():
            decay = ema_decay_at(self.iteration, self.distill.ema_decay)
            for k, v in self.model.state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)
        self.iteration += 1
        return record

    def run(self, max_iterations: int | None = None, progress: bool = True) -> int:
        """Trains up to `distill.iterations` (or stops at `max_iterations`, a test hook that simulates a kill)."""
        stop = self.distill.iterations if max_iterations is None else min(max_iterations, self.distill.iterations)
        bar = tqdm(total=self.distill.iterations, initial=self.iteration, desc="distill", unit="it",
                   disable=not (progress and self.dist.main), leave=False)
        while self.iteration < stop:
            record = self.step()
            self.log.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "iteration"}, refresh=False)
            if self.iteration % self.distill.checkpoint_every == 0 or self.iteration == stop:
                self.save()
        bar.close()
        self.dist.barrier()
        return self.iteration
