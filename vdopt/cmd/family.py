"""The motion generator as a family descriptor, so its step program is an ordinary step program to the passes and
the manifest: blocks `blocks.N`, time embedding `time_mlp`, conditioning the prompt tokens and the content frame
(which the unconditional branch sees too, as an image-to-video first frame)."""

from __future__ import annotations

import torch

from vdopt.cmd.model import MotionDenoiser, MotionDiT
from vdopt.families.base import ArchitectureDescriptor, CondInput


class MotionDescriptor(ArchitectureDescriptor):
    def build(self, config: dict) -> torch.nn.Module:
        return MotionDiT(**config)

    def in_channels(self, config: dict) -> int:
        return int(config["motion_channels"])

    def adapter(self, model: torch.nn.Module) -> torch.nn.Module:
        return MotionDenoiser(model)


MOTION = MotionDescriptor(
    family="cmd_motion",
    diffusers_class="MotionDiT",
    block_pattern=r"blocks\.\d+",
    time_embedding_pattern="time_mlp",
    cond_inputs=(
        CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg["text_dim"])),
        CondInput("content", lambda cfg, b, n: (b, cfg["content_channels"], 1, cfg["content_size"], cfg["content_size"]), null="same"),
    ),
    dynamic_frames=False,
)
