"""Samplers as step tables plus an update rule that lives inside the step program.

The table (timesteps and the per-step coefficients) is computed once from diffusers' own
scheduler so that a compiled bundle follows exactly the schedule users know; the update itself
is a few tensor ops written here, so it becomes part of the exported graph (contract 1).
"""

from __future__ import annotations

import torch

from vdopt.recipe import SamplerSection


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A loop's starting latent, float32 on the CPU: sample k from its own generator seeded `seed + k`, so a prompt
    gives the same clip alone or in a batch (the C++ runtime draws the same: cuda/runtime/src/session.cpp)."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + k), dtype=torch.float32)
                        for k in range(shape[0])])


def diffusers_scheduler(sampler: SamplerSection):
    """The diffusers scheduler whose schedule a bundle with this sampler section follows."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if sampler.kind == "flow_euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sampler.shift)
    else:
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            prediction_type=sampler.prediction,
        )
    scheduler.set_timesteps(sampler.steps)
    return scheduler


def step_table(sampler: SamplerSection) -> dict[str, torch.Tensor]:
    """Per-step buffers of the step program. `timesteps[i]` is what the denoiser is given."""
    scheduler = diffusers_scheduler(sampler)
    if sampler.kind == "flow_euler":
        sigmas = scheduler.sigmas.to(torch.float32)
        return {"timesteps": scheduler.timesteps.to(torch.float32), "sigmas": sigmas}
    timesteps = scheduler.timesteps.to(torch.int64)
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    prev = timesteps - scheduler.config.num_train_timesteps // sampler.steps
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.to(torch.float32))
    return {"timesteps": timesteps.to(torch.float32), "alpha": alphas[timesteps], "alpha_prev": alpha_prev}


def gather_step(table: torch.Tensor, i: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`table[i + offset]` as a 1-element tensor, without `.item()` (which exports as an unbacked int)."""
    return table.index_select(0, i.reshape(1) + offset)


def flow_euler_update(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


def ddim_update(x: torch.Tensor, prediction: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "v_prediction":
        x0 = alpha.sqrt() * x - (1 - alpha).sqrt() * prediction
        eps = alpha.sqrt() * prediction + (1 - alpha).sqrt() * x
    else:
        eps = prediction
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
