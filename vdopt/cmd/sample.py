"""The CMD form sampled eagerly, stage by stage, the way a staged bundle runs it: the reference for the bundle's
numerics tests and the eager row of `bench/cmd.py`.

content loop (the content generator at one frame, guided flow-match Euler, noise of seed `seed + k` for sample k)
-> motion loop (the motion DiT, the same schedule, the guidance the weights record for it (`motion_guidance`), noise
of seed `seed + MOTION_NOISE_OFFSET + k`, the content frame seen by both guidance branches) -> decode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vdopt.cmd.model import MOTION_NOISE_OFFSET, Decoder, MotionDenoiser, load_cmd, motion_guidance
from vdopt.families.base import bypass
from vdopt.reference.model import DEFAULT_GUIDANCE, DEFAULT_SHIFT, DEFAULT_STEPS, PromptConditioner, ReferenceDenoiser, build_teacher
from vdopt.recipe import SamplerSection
from vdopt.sampler import flow_euler_update, initial_noise, step_table


class CMDGenerator:
    def __init__(self, weights: str | Path, teacher_config: dict | None = None, steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, shift: float = DEFAULT_SHIFT):
        autoencoder, motion, content_state, conditioner_state, meta = load_cmd(weights)
        model = bypass(build_teacher(teacher_config), meta.get("content_removed_blocks", []))
        model.load_state_dict(content_state)
        self.content_denoiser = ReferenceDenoiser(model.eval().requires_grad_(False))
        self.motion_denoiser = MotionDenoiser(motion)
        self.decoder = Decoder(autoencoder)
        self.conditioner = PromptConditioner(dim=conditioner_state["pos"].shape[1], tokens=conditioner_state["pos"].shape[0])
        self.conditioner.load_state_dict(conditioner_state)
        self.conditioner.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.motion_guidance = motion_guidance(meta, guidance_scale)
        self.table = step_table(SamplerSection(kind="flow_euler", steps=steps, shift=shift, guidance_scale=guidance_scale))
        self.motion_shape = (motion.config["motion_channels"], motion.config["frames"], 1, motion.config["motion_width"])
        self.frame_shape = (motion.config["content_channels"], 1, motion.config["content_size"], motion.config["content_size"])

    @torch.no_grad()
    def loop(self, denoiser, x: torch.Tensor, cond: list[torch.Tensor], uncond: list[torch.Tensor], guidance: float) -> torch.Tensor:
        sigmas = self.table["sigmas"]
        for i, t in enumerate(self.table["timesteps"]):
            both = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
            out = denoiser(torch.cat([x, x]), t.expand(2 * x.shape[0]), *both)
            c, u = out.split([x.shape[0], x.shape[0]])
            x = flow_euler_update(x, u + guidance * (c - u), sigmas[i], sigmas[i + 1])
        return x

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioner.encode(prompts), self.conditioner.null(len(prompts)).contiguous()

    def content(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int) -> torch.Tensor:
        return self.loop(self.content_denoiser, initial_noise(seed, (cond.shape[0], *self.frame_shape)), [cond], [uncond],
                         self.guidance_scale)

    def motion(self, cond: torch.Tensor, uncond: torch.Tensor, content: torch.Tensor, seed: int) -> torch.Tensor:
        noise = initial_noise(seed + MOTION_NOISE_OFFSET, (cond.shape[0], *self.motion_shape))
        return self.loop(self.motion_denoiser, noise, [cond, content], [uncond, content], self.motion_guidance)

    @torch.no_grad()
    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        return self.decoder(content, motion)[0]

    def __call__(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Clips for `prompts`, sample k from seed `seed + k` (as `Session.run` with that seed)."""
        cond, uncond = self.encode(prompts)
        content = self.content(cond, uncond, seed)
        return self.decode(content, self.motion(cond, uncond, content, seed))
