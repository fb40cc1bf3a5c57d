"""Recipes: the YAML file that says what to compile and how.

A recipe is validated with pydantic so that every mistake is reported with the file, the key
path and what was expected, before any model is loaded. `vdopt schema` exports the JSON schema
so editors can complete and check recipes as they are typed.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vdopt.errors import RecipeError, first_line
from vdopt.measure import Budget



def _takes_numbers(annotation: Any) -> bool:
    """Whether a field (or its list items) holds ints or floats and never a bool."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _takes_numbers(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool not in args and any(_takes_numbers(a) for a in args)
    return annotation in (int, float)


def _item_type(annotation: Any) -> Any:
    """The item type of a list or tuple annotation (inside an Optional or union), or None."""
    for option in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,):
        if typing.get_origin(option) in (list, tuple) and typing.get_args(option):
            return typing.get_args(option)[0]
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any) -> Any:
        """pydantic reads `true` as 1 where an int or float goes (`steps: true` would be one step); YAML
        turns yes/no/on/off/true/false into booleans, so a boolean where a number goes is refused."""
        if isinstance(value, dict):
            for name, field in cls.model_fields.items():
                given = value.get(name)
                items = given if isinstance(given, (list, tuple)) and _takes_numbers(_item_type(field.annotation)) else ()
                if isinstance(given, bool) and _takes_numbers(field.annotation):
                    raise ValueError(f"'{name}' is a number, not {str(given).lower()} (YAML reads true/false/yes/no/on/off "
                                     f"as booleans)")
                if any(isinstance(v, bool) for v in items):
                    raise ValueError(f"'{name}' holds numbers, not booleans (got {given}; YAML reads true/false/yes/no/on/off "
                                     f"as booleans)")
        return value


class DimRange(Strict):
    """A dynamic dimension of the latent, in latent units. `opt` is the size used for tracing."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)
    opt: int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "DimRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if self.opt is not None and not self.min <= self.opt <= self.max:
            raise ValueError(f"opt ({self.opt}) must lie within [{self.min}, {self.max}]")
        return self

    @property
    def trace_size(self) -> int:
        return self.opt if self.opt is not None else (self.min + self.max + 1) // 2


def _as_range(value: Any) -> Any:
    return {"min": value, "max": value} if isinstance(value, int) else value


class InputSpec(Strict):
    """Latent input sizes. An int fixes a dimension; {min, max, opt} makes it dynamic.

    A dynamic `batch` lets one bundle generate 1..max prompts per call, and lets a per-row cache run its
    body on the rows that recompute only (a static batch is baked into many models' reshapes)."""

    batch: DimRange = Field(default_factory=lambda: DimRange(min=1, max=1))
    frames: DimRange
    height: DimRange
    width: DimRange
    text_len: int = Field(16, ge=1, description="Length of the conditioning token sequence.")

    _coerce = field_validator("batch", "frames", "height", "width", mode="before")(classmethod(lambda cls, v: _as_range(v)))


class ModelSection(Strict):
    family: str = Field(description="A built-in family (wan, latte, cogvideox, hunyuan_video, ltx_video, reference), an "
                                    "installed 'vdopt.families' entry point, or a module.path:ATTRIBUTE reference to an "
                                    "ArchitectureDescriptor (loaded only with --trust-code; docs/adding_a_family.md).")
    config: dict[str, Any] | str | None = Field(
        None, description="diffusers config kwargs, or a path to a config.json; omitted: the family's tiny test config."
    )
    layout: Literal["diffusers", "state_dict", "exported_program", "pickled_module"] = Field(
        "state_dict",
        description="How the model file is stored: a state dict / safetensors file, a diffusers folder, a torch.export .pt2, or a pickled nn.Module (needs --trust-pickle).",
    )
    input: InputSpec
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from vdopt.families import is_code_reference, known_families

        if value not in known_families() and not is_code_reference(value):
            close = difflib.get_close_matches(value, known_families(), n=1)
            raise ValueError(f"'{value}' is not a known family{f' (did you mean {close[0]!r}?)' if close else ''}; known: "
                             f"{', '.join(known_families())}, or a module.path:ATTRIBUTE reference to a descriptor of "
                             f"your own")
        return value


class SamplerSection(Strict):
    kind: Literal["flow_euler", "ddim"] = "flow_euler"
    steps: int = Field(50, ge=1, le=1000)
    shift: float = Field(1.0, gt=0, allow_inf_nan=False)
    guidance_scale: float = Field(5.0, ge=0, allow_inf_nan=False)
    prediction: Literal["flow", "epsilon", "v_prediction"] = "flow"

    @model_validator(mode="after")
    def _prediction_fits_kind(self) -> "SamplerSection":
        if self.kind == "flow_euler" and self.prediction != "flow":
            raise ValueError("flow_euler needs prediction: flow")
        if self.kind == "ddim" and self.prediction == "flow":
            raise ValueError("ddim needs prediction: epsilon or v_prediction")
        return self

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0


class PassSpec(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Profile(Strict):
    frames: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)


class LowerSection(Strict):
    backend: Literal["torch", "aoti", "onnx", "tensorrt"] = "torch"
    profiles: list[Profile] | None = Field(
        None, description="Static shape profiles, for families or backends that cannot export dynamic sizes."
    )
    split_conditionals: Literal["auto", "always", "never"] = Field(
        "auto", description="Cut the step at insert_cache's conditional into head / compute | reuse / tail parts; the "
                            "runtime reads the one-byte flag and runs one branch. auto: only for backends whose "
                            "conditionals may run both branches (tensorrt).",
    )
    kernel_profile: bool = Field(
        False, description="aoti: compile every kernel with a profiler record (`cpp.enable_kernel_profile`), so `vdopt "
                           "profile` can attribute time to modules. Off by default: the records cost each kernel call even "
                           "when no profiler listens (bench/results/kernel_profile.json).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_precision(cls, value: Any) -> Any:
        if isinstance(value, dict) and "precision" in value:
            raise ValueError("lower.precision was removed: nothing lowered in another precision than the graph's, so it "
                             "promised what no backend did. The precision is model.dtype (float32, bfloat16 or float16), "
                             "which every backend, TensorRT's strongly typed networks included, keeps")
        return value


class VerifySection(Strict):
    """The quality budget (contract 8): `vdopt compile` measures the bundle against the unoptimised program
    (the same recipe without its passes, torch backend) on `prompts` prompts and refuses to write a bundle
    that misses a bound. Without bounds, `compile --verify` measures and records without refusing."""

    psnr_mean: float | None = Field(None, gt=0, lt=1000, description="Lower bound on the mean PSNR (dB) over the prompts.")
    psnr_worst: float | None = Field(None, gt=0, lt=1000, description="Lower bound on the worst clip's PSNR (dB).")
    psnr_p5: float | None = Field(None, gt=0, lt=1000, description="Lower bound on the 5th-percentile clip PSNR (dB).")
    accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="Upper bound on the attribute accuracy lost (points of all-three-right accuracy by "
                                        "the evaluation classifier; families it knows: reference).")
    prompts: int = Field(4, ge=1, le=256, description="Prompts (with fixed seeds) the bundle is measured on.")
    seed: int = Field(2000, ge=0, lt=2**31, description="Seed of the verification prompt set.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "psnr_min" in value:
            raise ValueError("psnr_min was renamed: psnr_mean bounds the mean PSNR, psnr_worst the worst clip")
        return value

    def budget(self) -> Budget:
        return Budget(self.psnr_mean, self.psnr_worst, self.psnr_p5, self.accuracy_drop)


class Recipe(Strict):
    model: ModelSection
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    passes: list[PassSpec] = Field(default_factory=list)
    lower: LowerSection = Field(default_factory=LowerSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    measured: dict[str, Any] = Field(
        default_factory=dict, description="What a vdopt tool measured to write this recipe (`vdopt prune`: the latency and "
        "sensitivity tables behind prune_temporal's blocks, under `prune`). Compile does not act on it; it travels into "
        "the bundle's manifest with the recipe.")

    @field_validator("passes", mode="before")
    @classmethod
    def _bare_pass_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _backend_takes_dtype(self) -> "Recipe":
        if self.lower.backend == "onnx" and self.model.dtype == "bfloat16":
            raise ValueError("lower.backend onnx cannot run model.dtype bfloat16: ONNX Runtime has no bfloat16 kernels for "
                             "ops every model has (its Conv refuses tensor(bfloat16)). Use aoti or torch for bfloat16, "
                             "or model.dtype float32 with onnx.")
        return self


def shown_value(value: Any) -> str:
    """A short repr for a message (an int of thousands of digits has none: Python refuses to print it)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


def key_path(loc: tuple) -> str:
    return ".".join(part if isinstance(part, str) else shown_value(part) for part in loc)


def _describe(error: dict[str, Any]) -> str:
    path = key_path(error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{path}' (check its spelling; `vdopt schema` lists the allowed keys)"
    if error["type"] == "missing":
        return f"missing key '{path}'"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {shown_value(got)})"
    return f"'{path}': {error['msg']}{shown}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe.") from None
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors()[:5])
        raise RecipeError(f"{source}: invalid recipe: {problems}.") from None


MAX_RECIPE_BYTES = 1 << 20


class NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses aliases (`*name`): nested aliases expand exponentially (a few lines
    of "billion laughs" hang a validator at gigabytes), and a recipe is short enough to spell out."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in "
                                 f"recipes; write the value out")
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system, a loop of symlinks
        raise RecipeError(f"{path}: cannot be a recipe file ({exc.strerror or exc}).") from None
    if not found:
        raise RecipeError(f"{path}: recipe file not found.")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes; a recipe is a short YAML file (at most {MAX_RECIPE_BYTES} bytes).")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the recipe as UTF-8.") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe.") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}.") from None
    except (ValueError, TypeError, LookupError, AttributeError, OverflowError) as exc:  # a value the safe constructors cannot build
        raise RecipeError(f"{path}: a value in the recipe cannot be read ({first_line(exc)}); check dates, numbers of "
                          f"thousands of digits and explicit !!tags.") from None


def load_recipe(path: str | Path) -> Recipe:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with sections model, sampler, passes, lower, verify.")
    return parse_recipe(data, str(path))


def recipe_with(recipe: Recipe, passes: list[tuple[str, dict]] | None = None, backend: str = "torch") -> Recipe:
    """The same recipe with other passes (None: its own) and backend (the unoptimised program, a calibration
    candidate, the same recipe on another backend)."""
    data = recipe.model_dump(mode="json")
    if passes is not None:
        data["passes"] = [{"name": n, "params": p} for n, p in passes]
    data["lower"] = {**data["lower"], "backend": backend}
    return parse_recipe(data, "<derived recipe>")


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
