"""`vdopt compile`: recipe + model -> bundle. Capture, passes, lowering, manifest, in that order."""

from __future__ import annotations

import datetime
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Callable

import torch

import vdopt
from vdopt.bundle import staged_bundle, write_manifest
from vdopt.capture import capture
from vdopt.errors import LoweringError
from vdopt.families import family_origin, load_family
from vdopt.lower import get_backend
from vdopt.lower.split_conditional import SplitStep, split_conditional
from vdopt.ops import custom_ops, library_path
from vdopt.pass_manager import PassManager
from vdopt.passes import pipeline
from vdopt.program import StepProgram
from vdopt.ranges import named_range
from vdopt.recipe import Recipe, load_recipe
from vdopt.verify import verify_bundle


def profiles_of(recipe: Recipe) -> list[dict[str, int] | None]:
    if not recipe.lower.profiles:
        return [None]
    return [profile.model_dump() for profile in recipe.lower.profiles]


def profile_of(program: StepProgram, backend) -> dict[str, Any]:
    """For backends whose files feed a TensorRT build: the optimisation profile the engine takes."""
    return {"profile": backend.profile_record(program)} if hasattr(backend, "profile_record") else {}


def segment_entry(program: StepProgram, backend, files: list[str], index: int, stem: str = "step") -> dict[str, Any]:
    """One shape profile's step. Its own input and state shapes: static profiles differ in their sizes
    (a cached residual holds frames*height*width/4 tokens, a different number in each profile)."""
    build = {"build": backend.build_info()} if hasattr(backend, "build_info") else {}  # what an engine is tied to
    return {**profile_of(program, backend), "name": f"{stem}_{index}", "kind": "step", "backend": backend.name, "runtime": backend.runtime,
            "files": [f"segments/{f}" for f in files], "dims": {k: list(v) for k, v in program.dims.items()},
            "passes": list(program.passes), "inputs": [s.to_json() for s in program.inputs],
            "state": [s.to_json() for s in program.state], **build}


def split_segment(program: StepProgram, split: SplitStep, backend, directory: Path, index: int, stem: str = "step") -> dict[str, Any]:
    """A step cut at its conditional: each part lowered on its own, wired by value names."""
    parts = []
    for part in split.parts:
        files = backend.lower(part.program, directory, f"{stem}_{index}.{part.name}")
        parts.append({"name": part.name, "files": [f"segments/{f}" for f in files], **profile_of(part.program, backend),
                      "inputs": [s.to_json() for s in part.program.inputs],
                      "outputs": [s.to_json() for s in part.program.outputs]})
    return {**segment_entry(program, backend, [], index, stem), "kind": "split", "flag": split.flag, "parts": parts}


def lower_segment(program: StepProgram, recipe: Recipe, backend, directory: Path, index: int, stem: str = "step") -> dict[str, Any]:
    """`stem`: the segment's name and file stem (`step`; a later stage's own name in a staged bundle)."""
    mode = recipe.lower.split_conditionals
    split = split_conditional(program) if mode == "always" or (mode == "auto" and backend.splits_conditionals) else None
    if split is not None:
        return split_segment(program, split, backend, directory, index, stem)
    return segment_entry(program, backend, backend.lower(program, directory, f"{stem}_{index}"), index, stem)


OP_LIBRARY = "ops/vdopt_ops.so"


def ship_op_library(program: StepProgram, backend, stage: Path) -> dict[str, Any]:
    """The manifest's `custom_ops` (the vdopt ops the step calls) and, for backends that run them through the
    dispatcher, the op library copied into the bundle (`op_libraries`), loaded by whoever opens it."""
    used = custom_ops(program.ep)
    if not used:
        return {}
    if not backend.needs_op_library:
        return {"custom_ops": used}
    (stage / OP_LIBRARY).parent.mkdir(exist_ok=True)
    shutil.copyfile(library_path(), stage / OP_LIBRARY)
    return {"custom_ops": used, "op_libraries": [{"file": OP_LIBRARY, "ops": used, "platform": sysconfig.get_platform(),
                                                  "torch_version": torch.__version__}]}


def write_extras(program: StepProgram, backend, stage: Path, model_path) -> dict[str, Any]:
    """The family's extra files (a prompt encoder's weights) and, in AOTInductor bundles, its prompt encoder as a
    package a C++ app runs (the manifest's `prompt_encoder`)."""
    program.descriptor.write_extras(stage, model_path)
    encoder = program.descriptor.write_encoder_package(stage) if backend.name == "aoti" else None
    return {"prompt_encoder": encoder} if encoder else {}


def program_manifest(program: StepProgram, recipe: Recipe) -> dict[str, Any]:
    return {
        "vdopt_version": vdopt.__version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "family": recipe.model.family,
        "family_origin": family_origin(recipe.model.family),
        "recipe": recipe.model_dump(mode="json"),
        **stage_manifest(program, recipe),
    }


def stage_manifest(program: StepProgram, recipe: Recipe) -> dict[str, Any]:
    """What the runtime needs to drive one step program (a single-stage bundle's top level, or one loop stage)."""
    return {
        "null_cond": program.descriptor.null_rules(),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in program.model_config.items()},
        "parameters": sum(t.numel() for t in program.ep.state_dict.values()),
        "sampler": program.recipe.sampler.model_dump(mode="json"),
        "guidance": program.guidance,
        "step_table": program.step_table,
        "num_steps": program.num_steps,
        "latent": {"batch": list(program.dims["batch"]), "channels": int(program.example_inputs[0].shape[1]),
                   "dtype": recipe.model.dtype, "multiples": list(program.multiples),
                   "default_sizes": dict(zip(("frames", "height", "width"), program.example_inputs[0].shape[2:]))},
        "inputs": [s.to_json() for s in program.inputs],
        "outputs": [s.to_json() for s in program.outputs],
        "state": [s.to_json() for s in program.state],
        "passes": list(program.passes),
        "cache": program.extras.get("cache"),
        "pruned": program.extras.get("pruned"),
    }


def lower_stages(program: StepProgram, recipe: Recipe, backend, directory: Path, segments: list[dict[str, Any]]) -> dict[str, Any]:
    """A staged program's manifest `stages` (schema 3), in running order: the first stage is the top level's program
    and segments (the content loop), the others are lowered here under their own names."""
    stages = program.extras.get("stages")
    if not stages:
        return {}
    if len(segments) != 1:
        raise LoweringError(f"a staged program (rewrite_content_motion) compiles one shape profile; the recipe gives "
                            f"{len(segments)} lower.profiles. Remove lower.profiles.")
    first = {"name": "content", "kind": "loop", "output": "content", "feeds": {}, "noise_offset": 0,
             **stage_manifest(program, recipe), "segments": segments}
    entries = [first]
    for stage in stages:
        entry = {"name": stage.name, "kind": stage.kind, "output": stage.output, "feeds": dict(stage.feeds),
                 "noise_offset": stage.noise_offset}
        if stage.kind == "loop":
            entry |= stage_manifest(stage.program, recipe)
        else:
            entry |= {"inputs": [s.to_json() for s in stage.program.inputs], "outputs": [s.to_json() for s in stage.program.outputs],
                      "state": [], "step_table": {}, "parameters": sum(t.numel() for t in stage.program.ep.state_dict.values())}
        with named_range(f"vdopt/compile/lower {stage.name}"):
            entries.append({**entry, "segments": [lower_segment(stage.program, recipe, backend, directory, 0, stem=stage.name)]})
    return {"stages": entries}


def run_passes(program: StepProgram, recipe: Recipe, *, dump_ir: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> StepProgram:
    """The recipe's passes, then the lowering-prep passes, over a captured program (which stays as it was)."""
    passes = pipeline([(p.name, p.params) for p in recipe.passes])
    return PassManager(passes, dump_ir=dump_ir, log=log).run(program)


def compile_program(recipe: Recipe, model_path: str | Path | None, *, trust_pickle: bool = False,
                    dump_ir: str | Path | None = None, log: Callable[[str], None] | None = None,
                    profile: dict[str, int] | None = None) -> StepProgram:
    """Capture and run the pass pipeline for one shape profile."""
    return run_passes(capture(recipe, model_path, trust_pickle=trust_pickle, profile=profile), recipe, dump_ir=dump_ir, log=log)


def write_bundle(program: StepProgram, recipe: Recipe, output: str | Path, model_path: str | Path | None) -> Path:
    """A one-profile bundle of an already transformed program, lowered with the recipe's backend."""
    with staged_bundle(output, overwrite=True) as stage:
        (stage / "segments").mkdir()
        backend = get_backend(recipe.lower.backend)
        segments = [lower_segment(program, recipe, backend, stage / "segments", 0)]
        write_manifest(stage, {**program_manifest(program, recipe), **ship_op_library(program, backend, stage),
                               **write_extras(program, backend, stage, model_path), "segments": segments,
                               **lower_stages(program, recipe, backend, stage / "segments", segments)})
    return Path(output)


def compile_bundle(recipe: Recipe | str | Path, model_path: str | Path | None, output: str | Path, *,
                   trust_pickle: bool = False, trust_code: bool = False, dump_ir: str | Path | None = None,
                   force: bool = True, verify: bool | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compiles `recipe` into a bundle at `output`.

    `trust_code`: a `model.family` given as a module.path:ATTRIBUTE reference may be imported (vdopt.families).

    `verify`: measure the bundle against the unoptimised program (contract 8) and refuse to write it when
    it misses the recipe's `verify:` budget. None (default): verify when the recipe states a budget.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    load_family(recipe.model.family, trust_code=trust_code)
    log = log or (lambda message: None)
    backend = get_backend(recipe.lower.backend)
    profiles = profiles_of(recipe)
    verify = bool(recipe.verify.budget()) if verify is None else verify
    with staged_bundle(output, overwrite=force) as stage:
        segments_dir = stage / "segments"
        segments_dir.mkdir()
        segments, first, captured = [], None, None
        for index, profile in enumerate(profiles):
            log(f"capturing profile {index + 1}/{len(profiles)}: {profile or 'dynamic'}")
            ir_dir = Path(dump_ir) / f"profile_{index}" if dump_ir and len(profiles) > 1 else dump_ir
            with named_range("vdopt/compile/capture"):
                program = capture(recipe, model_path, trust_pickle=trust_pickle, profile=profile)
            captured = captured or program
            program = run_passes(program, recipe, dump_ir=ir_dir, log=log)
            if verify and program.extras.get("stages"):
                raise LoweringError("compile --verify measures a bundle against the captured program, and a staged (CMD) "
                                    "bundle is another model: remove the recipe's verify section (or --verify) and compare "
                                    "it with `vdopt eval` against the teacher (bench/cmd.py).")
            log(f"lowering with {backend.name}")
            with named_range(f"vdopt/compile/lower {backend.name}"):
                segments.append(lower_segment(program, recipe, backend, segments_dir, index))
            first = first or program
        manifest = write_manifest(stage, {**program_manifest(first, recipe), **ship_op_library(first, backend, stage),
                                          **write_extras(first, backend, stage, model_path), "segments": segments,
                                          **lower_stages(first, recipe, backend, segments_dir, segments)})
        if verify:
            with named_range("vdopt/compile/verify"):
                report = verify_bundle(stage, captured, recipe, model_path, log=log)
            manifest = write_manifest(stage, {**manifest, "verify": report})
    return manifest
