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
    """One conditioning tensor of the step program.

    Text-shaped (embeddings, masks, pooled vectors): `shape` is a function of (config, batch, text_len).
    Latent-shaped (an image-to-video first-frame latent, a control video, a mask): `latent_channels` is a function
    of the config, and the tensor is [batch, channels, frames, height, width] with the latent's own sizes, dynamic
    where the latent's are. `null` is what the unconditional branch gets when no uncond is given (NULL_FILLS).
    """

    name: str
    shape: Callable[[dict, int, int], tuple[int, ...]] | None = None
    dtype: torch.dtype = torch.float32
    null: str = "zeros"
    latent_channels: Callable[[dict], int] | None = None

    def shape_at(self, config: dict, batch: int, text_len: int, latent: tuple[int, int, int] | None) -> tuple[int, ...]:
        """The shape for `batch` samples; `latent` (frames, height, width) sizes a latent-shaped input."""
        if self.latent_channels is None:
            return self.shape(config, batch, text_len)
        if latent is None:
            raise ValueError(f"conditioning input '{self.name}' is latent-shaped: its shape needs the latent sizes")
        return (batch, self.latent_channels(config), *latent)


class KeywordDenoiser(nn.Module):
    """A diffusers video transformer that takes [B, C, F, H, W] latents, `timestep` and its conditioning by keyword."""

    def __init__(self, model: nn.Module, cond_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.cond_names = cond_names

    def forward(self, x, t, *cond):
        return self.model(hidden_states=x, timestep=t, **dict(zip(self.cond_names, cond)), return_dict=False)[0]


class Bypassed(nn.Module):
    """A removed block: hands its hidden states on unchanged, as prune_temporal's rerouted graph does."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def bypass(model: nn.Module, paths: list[str]) -> nn.Module:
    """`model` with the blocks at `paths` (module paths) replaced by `Bypassed`, in place."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).add_module(name, Bypassed())
    return model


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

    def name_blocks(self, paths: list[str], blocks: list, what: str) -> list[str]:
        """The paths among `paths` (the model's blocks of kind `what`, in order) that `blocks` names, each by index or
        by module path (either may be a dotted suffix of the other: `temporal_transformer_blocks.2` names
        `denoiser.model.temporal_transformer_blocks.2`, and the other way round); ValueError names a bad one."""
        chosen = []
        for block in blocks:
            if isinstance(block, bool) or not isinstance(block, (int, str)):
                raise ValueError(f"blocks holds {block!r}; give block indices or module paths")
            if isinstance(block, int):
                if not 0 <= block < len(paths):
                    raise ValueError(f"block index {block} is out of range: the model has {len(paths)} {what} blocks "
                                     f"({', '.join(paths)})")
                chosen.append(paths[block])
                continue
            named = [p for p in paths if p == block or p.endswith(f".{block}") or block.endswith(f".{p}")]
            if len(named) != 1:
                raise ValueError(f"'{block}' names {'no' if not named else 'more than one'} {what} block of the "
                                 f"{self.family} model; its {what} blocks are {', '.join(paths)}")
            chosen.append(named[0])
        return list(dict.fromkeys(chosen))

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
        """Wrap `model` as `forward(x[B,C,F,H,W], t[B], *cond) -> prediction[B,C,F,H,W]`. The default calls it
        the diffusers way, `model(hidden_states=x, timestep=t, <cond name>=..., return_dict=False)[0]`."""
        return KeywordDenoiser(model, tuple(c.name for c in self.cond_inputs))

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's own tensors out of a checkpoint file that may hold more (e.g. an encoder)."""
        return state

    def write_extras(self, bundle_dir, model_path) -> None:
        """Files a bundle of this family carries besides the step program (e.g. a prompt encoder)."""

    def write_encoder_package(self, bundle_dir) -> dict | None:
        """The family's prompt encoder as an AOTInductor package for C++ apps, and how to call it (the manifest's
        `prompt_encoder`); None for families without one."""
        return None

    def prompt_encoder(self, bundle_dir, manifest):
        """`encode(prompt or prompts) -> (cond, uncond)`, batch = number of prompts, from the bundle's extras;
        None for families without one."""
        return None

    def example_cond(self, config: dict, batch: int, text_len: int, generator: torch.Generator,
                     latent: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for c in self.cond_inputs:
            shape = c.shape_at(config, batch, text_len, latent)
            if c.dtype.is_floating_point:
                out[c.name] = torch.randn(shape, generator=generator, dtype=c.dtype)
            else:
                out[c.name] = torch.ones(shape, dtype=c.dtype)
        return out

    def null_rules(self) -> dict[str, str]:
        """What the unconditional branch gets per conditioning input; written into the manifest, so a bundle runs
        without its descriptor."""
        return {c.name: c.null for c in self.cond_inputs}

    def null_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return null_cond(self.null_rules(), cond)


NULL_FILLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zeros": torch.zeros_like, "ones": torch.ones_like, "same": torch.clone}


def null_cond(rules: dict[str, str], cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unconditional inputs from the conditional ones: zeros (empty text), ones (an all-valid mask), or the same
    tensor (an image-to-video first frame, which both branches see)."""
    return {name: NULL_FILLS[rule](cond[name]) for name, rule in rules.items()}


_REGISTRY: dict[str, ArchitectureDescriptor] = {}


def register(descriptor: ArchitectureDescriptor, name: str | None = None) -> ArchitectureDescriptor:
    """Makes `descriptor` the family `name` (default: its own `family`) for recipes and bundles in this process."""
    _REGISTRY[name or descriptor.family] = descriptor
    return descriptor


def registry() -> dict[str, ArchitectureDescriptor]:
    return _REGISTRY
