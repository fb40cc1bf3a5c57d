"""A CMD weights file with random (untrained) parts for the reference teacher's configuration: enough for graph and
numerics tests of the rewrite and the staged runtime, which compare programs with the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from vdopt.cmd.model import ContentMotionAutoencoder, MotionDiT, save_cmd
from vdopt.families.base import bypass
from vdopt.families.reference import REFERENCE
from vdopt.reference.model import TEACHER_CONFIG, build_teacher, load_reference


def random_cmd_file(path: Path, seed: int = 0, teacher_config: dict | None = None, info: dict | None = None) -> Path:
    config = dict(TEACHER_CONFIG if teacher_config is None else teacher_config)
    torch.manual_seed(seed)
    model = build_teacher(config)
    removed = [name for name, _ in model.named_modules() if name and REFERENCE.is_temporal_block(name)]
    bypass(model, removed)
    size = config["sample_size"]
    autoencoder = ContentMotionAutoencoder(width=16, motion_channels=2)
    motion = MotionDiT(motion_channels=2, width=32, depth=1, heads=2, frames=config["video_length"],
                       motion_width=2 * size // autoencoder.patch, content_size=size)
    with torch.no_grad():
        for p in motion.parameters():  # the zero-initialised modulations too, so every input reaches the output
            p.add_(0.05 * torch.randn_like(p))
    conditioner = load_reference()[1].state_dict()  # the teacher's, as `vdopt distill --method cmd` keeps it
    return save_cmd(path, autoencoder, motion, model.state_dict(), conditioner, {"content_removed_blocks": removed, **(info or {})})
