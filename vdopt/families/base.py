"""Architecture descriptors: where a family keeps its blocks, in terms of graph metadata.

Passes never look at a model's Python code (ARCHITECTURE contract 3). They look at the exported
graph, whose nodes carry `nn_module_stack` (module path and class per node). A descriptor says
which module paths are the transformer blocks, the temporal blocks, the time embedding and the
residual stream, and how to call the family's module as a plain `(x, t, *cond) -> out` denoiser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class CondInput:
    """One conditioning tensor of the step program (text embeddings, masks, pooled vectors).

    `shape` is a function of (config, batch, text_len); `null` builds the unconditional value.
    """

    name: str
    shape: Callable[[dict, int, int], tuple[int, ...]]
    dtype: torch.dtype = torch.float32
    null: str = "zeros"  # "zeros" | "ones": what the unconditional branch gets when no uncond is given


@dataclass(frozen=True)
class ArchitectureDescriptor:
    family: str
    diffusers_class: str
    block_pattern: str
    time_embedding_pattern: str
    temporal_block_pattern: str | None = None
    residual_stream: str = "hidden_states flowing from one block to the next (the block output)"
    cond_inputs: tuple[CondInput, ...] = ()
    patch_size: tuple[int, int, int] = (1, 1, 1)  # frames, height, width divisibility where the config sets none
    dynamic_frames: bool = True
    tiny_config: dict = field(default_factory=dict)
    full_configs: dict[str, dict] = field(default_factory=dict)

    # ----- structure in the graph -------------------------------------------------------------
    def is_block(self, fqn: str) -> bool:
        return re.search(rf"(^|\.){self.block_pattern}$", fqn) is not None

    def is_temporal_block(self, fqn: str) -> bool:
        return self.temporal_block_pattern is not None and re.search(rf"(^|\.){self.temporal_block_pattern}$", fqn) is not None

    def is_time_embedding(self, fqn: str) -> bool:
        return re.search(rf"(^|\.){self.time_embedding_pattern}$", fqn) is not None

    def matches_class(self, class_names: set[str]) -> bool:
        return any(name.rsplit(".", 1)[-1] == self.diffusers_class for name in class_names)

    # ----- building ---------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.diffusers_class)

    def build(self, config: dict) -> nn.Module:
        return self.model_class()(**config)

    def multiples(self, config: dict) -> tuple[int, int, int]:
        """What the latent's frames, height and width must be multiples of under `config`: its `patch_size`
        (an int for height and width, or three ints) and `patch_size_t` where it sets them (CogVideoX 1.5 and
        LTX configs patchify frames in twos), else the family's default `patch_size`."""
        frames, height, width = self.patch_size
        size = config.get("patch_size")
        if isinstance(size, (list, tuple)) and len(size) == 3:
            frames, height, width = (int(s) for s in size)
        elif type(size) is int:
            height = width = size
        if type(config.get("patch_size_t")) is int:
            frames = config["patch_size_t"]
        return frames, height, width

    def in_channels(self, config: dict) -> int:
        return int(config.get("in_channels", 4))

    def adapter(self, model: nn.Module) -> nn.Module:
        """Wrap `model` as `forward(x[B,C,F,H,W], t[B], *cond) -> prediction[B,C,F,H,W]`."""
        raise NotImplementedError

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's own tensors out of a checkpoint file that may hold more (e.g. an encoder)."""
        return state

    def write_extras(self, bundle_dir, model_path) -> None:
        """Files a bundle of this family carries besides the step program (e.g. a prompt encoder)."""

    def prompt_encoder(self, bundle_dir, manifest):
        """`encode(prompt or prompts) -> (cond, uncond)`, batch = number of prompts, from the bundle's extras;
        None for families without one."""
        return None

    def example_cond(self, config: dict, batch: int, text_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for c in self.cond_inputs:
            shape = c.shape(config, batch, text_len)
            if c.dtype.is_floating_point:
                out[c.name] = torch.randn(shape, generator=generator, dtype=c.dtype)
            else:
                out[c.name] = torch.ones(shape, dtype=c.dtype)
        return out

    def null_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {c.name: (torch.ones_like if c.null == "ones" else torch.zeros_like)(cond[c.name]) for c in self.cond_inputs}


_REGISTRY: dict[str, ArchitectureDescriptor] = {}


def register(descriptor: ArchitectureDescriptor) -> ArchitectureDescriptor:
    _REGISTRY[descriptor.family] = descriptor
    return descriptor


def registry() -> dict[str, ArchitectureDescriptor]:
    return _REGISTRY
