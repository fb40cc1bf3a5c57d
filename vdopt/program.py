"""The step program: one exported denoising step plus what the runtime needs to drive it.

`step(x, i, *cond, *uncond, *state) -> (x_next, *state)` (ARCHITECTURE contracts 1 and 2). The
graph is a `torch.export.ExportedProgram`; the rest is plain data that goes into the manifest.
Passes take a `StepProgram` and return a new one.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from vdopt.families.base import ArchitectureDescriptor
from vdopt.recipe import Recipe
from vdopt.safety import evaluate_shape

LATENT_DIMS = ("frames", "height", "width")
STEP_DIMS = ("batch", *LATENT_DIMS)  # the sizes a step program may take dynamically

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}


def step_multiples(patch_size: tuple[int, ...] | list[int]) -> dict[str, int]:
    """What each step dim must be a multiple of: the latent dims the patch size, the batch nothing."""
    return {"batch": 1, **dict(zip(LATENT_DIMS, patch_size))}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_size(size: int | str, sizes: dict[str, int], multiples: list[int]) -> int:
    """Evaluates a manifest size: an int, or an expression in the step dims (`batch`, `frames`, `2*height_units`,
    `32*batch*frames*height_units*width_units`), where `NAME_units` is NAME divided by its patch multiple.

    Expressions are parsed by a small grammar (ints, those names, `+ - * //`, parentheses) and never
    evaluated as code (`vdopt.safety`); anything else is a ValueError naming the offending part."""
    if type(size) is int:
        return size
    values = {**sizes, **{f"{name}_units": sizes[name] // m for name, m in zip(LATENT_DIMS, multiples)}}
    try:
        return evaluate_shape(size, values)
    except ValueError as exc:
        raise ValueError(f"size {str(size)[:80]!r}: {exc}") from None


@dataclass(frozen=True)
class TensorSpec:
    """A named step input or output. Symbolic sizes are strings (`frames`, `2*height`)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class StateSpec(TensorSpec):
    """A tensor carried from one step to the next (contract 2); every run starts at `init`."""

    init: str = "zeros"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "init": self.init}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StateSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"], data.get("init", "zeros"))


@dataclass(frozen=True)
class StepProgram:
    ep: torch.export.ExportedProgram
    recipe: Recipe
    descriptor: ArchitectureDescriptor
    model_config: dict
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[StateSpec, ...]
    step_table: dict[str, list[float]]
    dims: dict[str, tuple[int, int]]  # step dims (batch, latent dims): name -> (min, max); min == max when static
    example_inputs: tuple[torch.Tensor, ...]
    passes: tuple[dict[str, Any], ...] = ()
    guidance: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "StepProgram":
        return dataclasses.replace(self, **changes)

    def tracing(self):
        """The context a pass traces in: the capture's `FakeTensorMode` for full-size checks, else nothing."""
        return self.extras.get("fake_mode") or nullcontext()

    @property
    def multiples(self) -> tuple[int, int, int]:
        """What frames, height and width must be multiples of (the config's patch sizes)."""
        return self.descriptor.multiples(self.model_config)

    @property
    def num_steps(self) -> int:
        return len(self.step_table["timesteps"])

    def module(self) -> torch.nn.Module:
        return self.ep.module()


@dataclass(frozen=True)
class Stage:
    """One stage of a staged program (ARCHITECTURE contract 7: content loop -> motion loop -> decode).

    `kind`: `loop` runs `program` as a step loop from noise (its own steps, guidance and state); `call` runs it once.
    `feeds`: the program's inputs that take an earlier stage's output, `input name -> output name`; a loop stage's
    other inputs are the bundle's conditioning. `output`: the name this stage's result goes by. `noise_offset`: a loop
    stage's sample k starts from the noise of seed `seed + noise_offset + k`, so stages draw independent noise."""

    name: str
    kind: str
    program: StepProgram
    output: str
    feeds: dict[str, str] = field(default_factory=dict)
    noise_offset: int = 0
