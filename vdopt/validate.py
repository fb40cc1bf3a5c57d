"""Checks at the edge (issue 15): what a model config, latent sizes, weights, conditioning tensors,
seeds and output paths must satisfy before vdopt spends time or memory on them.

Each check raises a one-paragraph `VdoptError` that names the key, tensor or option, so a clumsy
input never ends in a traceback from diffusers or torch, a machine swapping itself to death, or a
clip of NaNs written with exit status 0.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import torch

from vdopt.errors import CaptureError, RecipeError, RunInputError, VdoptError, first_line
from vdopt.program import DTYPES, step_multiples

MAX_CONFIG_INT = 1 << 20  # far above any real width, depth or table length, far below an allocation that hangs
MAX_RUN_BYTES = 1 << 40  # 1 TiB: more than any one accelerator or host a bundle runs on
ACTIVATION_WIDTHS = 8  # live hidden-size tensors per token in a block (residual, q, k, v, attention, MLP): a lower bound
SEED_LIMIT = 1 << 63  # torch.Generator.manual_seed takes an int64
PROMPT_SET_SEED_LIMIT = 1 << 31  # per-clip seeds are derived from it (seed * 100_003 + i); verify.seed's range


# ----- model.config -------------------------------------------------------------------------

def config_parameters(descriptor) -> dict[str, inspect.Parameter]:
    """The keyword arguments the family's model class takes (its diffusers config keys)."""
    signature = inspect.signature(descriptor.model_class().__init__)
    return {name: p for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _kinds(parameter: inspect.Parameter) -> tuple[set, bool]:
    """(the kinds of value a config key takes: int, float, bool, str, tuple; whether None is allowed).
    From the annotation where it is a type, else from the default; no kinds means anything goes."""
    annotation, default = parameter.annotation, parameter.default
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return ({type(default)} if default is not None else set()), default is None
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    kinds = {tuple if k is list else k for k in (typing.get_origin(m) or m for m in members if m is not type(None))}
    if not kinds <= {int, float, bool, str, tuple}:
        return set(), True
    return kinds, type(None) in members or default is None


def _config_value_problem(value: Any, parameter: inspect.Parameter) -> str | None:
    kinds, nullable = _kinds(parameter)
    if value is None:
        return None if nullable or not kinds else "must not be null"
    if not kinds:
        return None
    lowest = 0 if parameter.default == 0 else 1
    if int in kinds and type(value) is int:
        return None if lowest <= value <= MAX_CONFIG_INT else f"must be an integer from {lowest} to {MAX_CONFIG_INT}"
    if float in kinds and type(value) in (int, float):
        return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"
    if bool in kinds and type(value) is bool:
        return None
    if str in kinds and isinstance(value, str):
        return None
    if tuple in kinds and isinstance(value, (list, tuple)):
        if all(type(v) is int and 1 <= v <= MAX_CONFIG_INT for v in value):
            return None
        return f"must be a list of integers from 1 to {MAX_CONFIG_INT}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list of integers"}
    return "must be " + " or ".join(names.get(k, k.__name__) for k in sorted(kinds, key=str))


def check_model_config(config: dict, descriptor, source: str = "model.config") -> None:
    """Every key is one the family's class takes, with a value of its type in a sane range."""
    parameters = config_parameters(descriptor)
    where = f"{source} ({descriptor.diffusers_class}, the {descriptor.family} family)"
    for key, value in config.items():
        if key not in parameters:
            close = difflib.get_close_matches(key, parameters, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise RecipeError(f"{where}: unknown key '{key}'{hint} The keys it takes are {', '.join(parameters)}.")
        problem = _config_value_problem(value, parameters[key])
        if problem:
            raise RecipeError(f"{where}: '{key}' {problem}, not {value!r}.")


def parameter_count(config: dict, descriptor, source: str = "model.config") -> int | None:
    """The model's parameter and buffer elements, from building it on the meta device (no memory).
    None when the class cannot be built there at all (then the real build reports its own errors)."""
    try:
        with torch.device("meta"):
            model = descriptor.build(config)
    except Exception as exc:  # noqa: BLE001 - any constructor failure is this config's fault, reported in one line
        if "meta" in str(exc).lower():
            return None
        detail = f"{type(exc).__name__}: {first_line(exc)[:200]}" if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{source}: the {descriptor.family} model ({descriptor.diffusers_class}) cannot be built from "
                          f"this config ({detail}). Check the values against the model's published config.json.") from None
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


# ----- latent sizes and memory --------------------------------------------------------------

def check_patch_multiples(dims: dict[str, tuple[int, int]], descriptor, config: dict, profile: dict | None) -> None:
    """A static size must be a multiple of the config's patch size, or no input could ever run the bundle."""
    for name, multiple in step_multiples(descriptor.multiples(config)).items():
        lo, hi = dims[name]
        if lo == hi and lo % multiple:
            where = f"lower.profiles entry {profile}" if profile else f"model.input.{name}"
            below = lo - lo % multiple
            choices = f"{below} or {below + multiple}" if below else f"{multiple}"
            raise RecipeError(f"{where}: {name} {lo} is not a multiple of the {descriptor.family} family's patch size "
                              f"{multiple}, so the bundle could never run; use {choices}.")


def gib(n: float) -> str:
    """A byte count for a message: GiB below a TiB, else TiB or PiB."""
    if n < 1 << 40:
        return f"{n / (1 << 30):,.1f} GiB"
    return f"{n / (1 << 40):.3g} TiB" if n < 1 << 50 else f"{n / (1 << 50):,.3g} PiB"


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def step_memory(recipe, descriptor, config: dict, sizes: dict[str, int]) -> tuple[int, int]:
    """(latent and conditioning bytes, activation bytes) of one step at `sizes`: a rough lower bound
    (the latent in, the prediction and the update; `ACTIVATION_WIDTHS` hidden-size tensors per token)."""
    spec, itemsize = recipe.model.input, DTYPES[recipe.model.dtype].itemsize
    branches = 2 if recipe.sampler.uses_guidance else 1
    volume = sizes["frames"] * sizes["height"] * sizes["width"]
    try:
        channels = descriptor.in_channels(config)
        latent = (sizes["frames"], sizes["height"], sizes["width"])
        cond = sum(math.prod(c.shape_at(config, sizes["batch"], spec.text_len, latent)) for c in descriptor.cond_inputs)
    except (KeyError, TypeError) as exc:
        raise RecipeError(f"model.config: the {descriptor.family} family needs {exc} to size its inputs; give it in "
                          f"model.config.") from None
    data = (3 * sizes["batch"] * channels * volume + branches * cond) * itemsize
    defaults = {k: p.default for k, p in config_parameters(descriptor).items()}
    full = {**defaults, **config}
    hidden = (full.get("num_attention_heads") or 0) * (full.get("attention_head_dim") or 0) or channels
    tokens = branches * sizes["batch"] * volume // math.prod(descriptor.multiples(full))
    return data, ACTIVATION_WIDTHS * tokens * hidden * itemsize


def check_capture(recipe, descriptor, config: dict, dims: dict[str, tuple[int, int]], profile: dict | None,
                  host: bool = True) -> None:
    """Before a capture allocates anything: static sizes fit the patch, the config is one the family's
    class takes, and the memory a step needs at the largest sizes (and the compile, in this machine's
    memory, at the traced ones) is not absurd. `host=False` (a fake-tensor capture) skips the last."""
    from vdopt.capture import trace_sizes

    source = f"{recipe.model.config}" if isinstance(recipe.model.config, str) else "model.config"
    count = None  # a .pt2 or a pickle holds its own weights
    if recipe.model.layout in ("state_dict", "diffusers"):
        check_model_config(config, descriptor, source)
    check_patch_multiples(dims, descriptor, config, profile)
    if recipe.model.layout in ("state_dict", "diffusers"):
        count = parameter_count(config, descriptor, source)
    weights = (count or 0) * DTYPES[recipe.model.dtype].itemsize
    largest = {name: hi for name, (lo, hi) in dims.items()}
    data, activations = step_memory(recipe, descriptor, config, largest)
    total = weights + data + activations
    if total > MAX_RUN_BYTES:
        where = "model.config" if weights > data + activations else "model.input"
        raise RecipeError(
            f"{where}: one step at the largest sizes this recipe allows ({', '.join(f'{k} {v}' for k, v in largest.items())}, "
            f"text_len {recipe.model.input.text_len}) needs at least {gib(total)} "
            f"(weights {gib(weights)}, latents and conditioning {gib(data)}, activations {gib(activations)}; a rough lower "
            f"bound), more than the {gib(MAX_RUN_BYTES)} vdopt compiles for. Narrow model.input or lower.profiles, or "
            f"check model.config.")
    available = physical_memory()
    if host and available:
        traced_data, traced_activations = step_memory(recipe, descriptor, config, trace_sizes(recipe, dims, descriptor.multiples(config)))
        needed = (count or 0) * 4 + traced_data + traced_activations
        if needed > available:
            raise RecipeError(
                f"compiling this recipe needs at least {gib(needed)} of host memory (the weights built in float32 "
                f"{gib((count or 0) * 4)}, one traced step {gib(traced_data + traced_activations)}); this machine has "
                f"{gib(available)}. Compile on a larger machine, or narrow model.input.")


# ----- weights and conditioning -------------------------------------------------------------

def nonfinite(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path) -> None:
    """No NaN or infinite weight, and no integer tensor where the model has a float one (an int8
    checkpoint would be cast value by value, without its quantisation scales)."""
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and want.is_floating_point() and not tensor.is_floating_point():
            raise CaptureError(f"{path}: tensor '{key}' is {tensor.dtype} where the model has {want.dtype} weights; vdopt "
                               f"compiles float checkpoints (float32, bfloat16, float16) and would cast the integers as "
                               f"if they were weights. Dequantise the checkpoint first.")
    bad = {key: n for key, tensor in state.items() if (n := nonfinite(tensor))}
    if bad:
        first = ", ".join(f"'{k}' ({n} of {state[k].numel()})" for k, n in list(bad.items())[:3])
        raise CaptureError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values, first {first}; every clip would "
                           f"come out NaN. The checkpoint is damaged or was saved after training diverged.")


def check_cond_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A conditioning tensor: float where the bundle takes float, and every value finite."""
    if not isinstance(tensor, torch.Tensor):
        raise RunInputError(f"conditioning input '{name}' is a {type(tensor).__name__}, not a tensor.")
    if dtype.is_floating_point and not tensor.is_floating_point():
        raise RunInputError(f"conditioning input '{name}' is {tensor.dtype}; this bundle takes {dtype} embeddings. "
                            f"Give the encoder's float output (integer token ids or quantised values would be cast "
                            f"as if they were embeddings).")
    if n := nonfinite(tensor):
        raise RunInputError(f"conditioning input '{name}' has {n} NaN or infinite value(s) of {tensor.numel()}; the clip "
                            f"would be all NaN. Check the encoder that produced it.")


def check_finite_output(video: torch.Tensor) -> None:
    if n := nonfinite(video):
        raise VdoptError(f"the generated video has {n} NaN or infinite value(s) of {video.numel()}, so it was not written. "
                         f"The bundle's numerics overflowed (try float32: model.dtype, lower.precision) or its weights "
                         f"are damaged.")


# ----- command-line values ------------------------------------------------------------------

def check_seed(seed: int, option: str = "--seed", limit: int = SEED_LIMIT) -> None:
    if not 0 <= seed < limit:
        raise VdoptError(f"{option} {seed}: a seed is an integer from 0 to {limit - 1} (2**{limit.bit_length() - 1} - 1).")


def check_outputs(*options: tuple[str, str | Path | None]) -> None:
    """`check_output_path` for each (option, path) given on the command line."""
    for option, path in options:
        if path is not None:
            check_output_path(path, option)


def check_output_path(path: str | Path, option: str, suffixes: tuple[str, ...] = ()) -> None:
    """Before any work: `path` can be written (its nearest existing ancestor is a writable directory,
    it is not itself a directory) and, given `suffixes`, has one of them."""
    path = Path(path)
    try:
        checkable_output_path(path, option, suffixes)
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise VdoptError(f"{option} {str(path)[:120]}: cannot be written ({exc.strerror or type(exc).__name__}).") from None


def checkable_output_path(path: Path, option: str, suffixes: tuple[str, ...]) -> None:
    if path.is_dir():
        raise VdoptError(f"{option} {path}: is a directory; give a file name inside it.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise VdoptError(f"{option} {path}: unknown output type '{path.suffix}'; use {', '.join(suffixes)}.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise VdoptError(f"{option} {path}: {parent} is a file, not a directory, so nothing can be written there.")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise VdoptError(f"{option} {path}: not writable ({path if path.exists() else parent} denies writing).")


def check_run_args(args) -> None:
    """`vdopt run`'s seed and output paths, before the bundle is opened or a step runs."""
    from vdopt.video import OUTPUT_TYPES

    check_seed(args.seed)
    check_output_path(args.output, "-o", OUTPUT_TYPES)
    if Path(args.output).suffix.lower() == ".mp4" and not any(importlib.util.find_spec(m) for m in ("imageio_ffmpeg", "av")):
        raise VdoptError(f"-o {args.output}: writing .mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or write .gif or .pt.")
    if args.trace:
        check_output_path(args.trace, "--trace", (".json",))
