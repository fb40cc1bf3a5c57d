"""`Session`: runs a bundle. A dumb loop over the step program (contract 1).

    x = noise(seed); state = initial state
    for i in range(num_steps): x, *state = step(x, i, *cond, *uncond, *state)

Inputs are checked against the manifest before the first step, so a wrong shape is a one-line
error rather than a failure deep inside a backend. Each step, and each part of a split step, is a named
range (`vdopt/step i`, `vdopt/part compute`) for `torch.profiler` and Nsight (NVTX, domain `vdopt`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from vdopt.bundle import bundle_file, check_onnx_external_data, read_manifest
from vdopt.errors import BundleError, RunInputError
from vdopt.families import load_family
from vdopt.families.base import null_cond
from vdopt.lower import get_backend
from vdopt.ops import load_library
from vdopt.program import DTYPES, STEP_DIMS, StateSpec, TensorSpec, resolve_size
from vdopt.ranges import named_range
from vdopt.sampler import initial_noise
from vdopt.validate import check_cond_tensor


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunInputError(f"device '{name}' is not one torch knows; vdopt runs bundles on cpu or cuda (cuda:N).") from None
    if device.type not in ("cpu", "cuda"):
        raise RunInputError(f"device '{name}': vdopt runs bundles on cpu or cuda (cuda:N), not {device.type}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunInputError(f"device '{name}': this torch ({torch.__version__}) sees no CUDA GPU; run with --device cpu.")


class Session:
    def __init__(self, bundle: str | Path, device: str = "cpu", verify: bool = True, profile: bool = False,
                 trust_code: bool = False):
        # Verified before anything is loaded: manifest checksum, confined paths, file checksums, shapes
        # (ARCHITECTURE contract 7, trust model). verify=False skips only hashing the files' contents.
        # profile: load runners whose work `vdopt profile` can attribute to modules (Backend.load).
        # trust_code: the family may be a module.path:ATTRIBUTE reference, imported for its prompt encoder only.
        self.path = Path(bundle)
        check_device(device)
        self.manifest = read_manifest(self.path, verify=verify)
        missing = [key for key in ("latent", "num_steps", "guidance") if key not in self.manifest]
        if missing:
            raise BundleError(f"{self.path}: the manifest lacks {', '.join(missing)}, which running needs; it was written "
                              f"by another tool or version. Recompile the bundle.")
        self.device = device
        self.profile = profile
        self.trust_code = trust_code
        self.inputs = [TensorSpec.from_json(s) for s in self.manifest["inputs"]]
        self.state_specs = [StateSpec.from_json(s) for s in self.manifest["state"]]
        self.dtype = DTYPES[self.manifest["latent"]["dtype"]]
        self._runners: dict[str, Callable] = {}

    # ----- properties ----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.manifest["num_steps"]

    @property
    def cond_names(self) -> list[str]:
        return [s.name.removeprefix("cond.") for s in self.inputs if s.name.startswith("cond.")]

    @property
    def guidance(self) -> bool:
        return self.manifest["guidance"]

    def prompt_encoder(self) -> Callable[[str | list[str]], tuple[dict, dict | None]] | None:
        """The bundle's own prompt encoder, if its family ships one (the reference model does)."""
        return load_family(self.manifest["family"], trust_code=self.trust_code).prompt_encoder(self.path, self.manifest)

    # ----- inputs --------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int | None, height: int | None, width: int | None) -> tuple[int, ...]:
        latent = self.manifest["latent"]
        lo, hi = latent["batch"]
        if not lo <= batch <= hi:
            raise RunInputError(f"{batch} sample(s) per call; this bundle was compiled for {lo}..{hi} (model.input.batch). "
                                f"Split the prompts into calls of at most {hi}, or recompile with a wider batch range.")
        sizes = {"frames": frames, "height": height, "width": width}
        sizes = {k: latent["default_sizes"][k] if v is None else v for k, v in sizes.items()}
        for (name, size), multiple in zip(sizes.items(), latent["multiples"]):
            if size % multiple:
                raise RunInputError(f"{name}={size} is not a multiple of {multiple}, which this {self.manifest['family']} model needs.")
        return (batch, latent["channels"], sizes["frames"], sizes["height"], sizes["width"])

    @staticmethod
    def sizes_of(shape: tuple[int, ...]) -> dict[str, int]:
        return dict(zip(STEP_DIMS, (shape[0], *shape[2:])))

    def segment_for(self, shape: tuple[int, ...]) -> dict[str, Any]:
        sizes = self.sizes_of(shape)
        for segment in self.manifest["segments"]:
            if all(lo <= sizes[name] <= hi for name, (lo, hi) in segment["dims"].items()):
                return segment
        ranges = "; ".join(", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in s["dims"].items()) for s in self.manifest["segments"])
        raise RunInputError(f"sizes {sizes} are outside what this bundle was compiled for ({ranges}). "
                            f"Recompile with wider model.input ranges or another lower.profiles entry.")

    def batch_of(self, cond: dict[str, torch.Tensor]) -> int:
        """The number of samples: dim 0 of the conditioning tensors, which must agree."""
        sizes = {name: tensor.shape[0] if tensor.dim() else None for name, tensor in cond.items()}
        if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
            raise RunInputError(f"conditioning tensors must share their first (batch) dimension; got {sizes}.")
        return next(iter(sizes.values()))

    def resolved(self, spec: TensorSpec, sizes: dict[str, int]) -> list[int]:
        return [resolve_size(d, sizes, self.manifest["latent"]["multiples"]) for d in spec.shape]

    def null_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional inputs by the manifest's rules (older bundles: by the family's descriptor)."""
        if "null_cond" in self.manifest:
            return null_cond(self.manifest["null_cond"], cond)
        return load_family(self.manifest["family"], trust_code=self.trust_code).null_cond(cond)

    def segment_inputs(self, segment: dict[str, Any]) -> list[TensorSpec]:
        """The segment's own input shapes (one per shape profile); older bundles list only the manifest's."""
        return [TensorSpec.from_json(s) for s in segment["inputs"]] if "inputs" in segment else self.inputs

    def segment_state(self, segment: dict[str, Any]) -> list[StateSpec]:
        return [StateSpec.from_json(s) for s in segment["state"]] if "state" in segment else self.state_specs

    def check_cond(self, prefix: str, tensors: dict[str, torch.Tensor], sizes: dict[str, int],
                   inputs: list[TensorSpec]) -> list[torch.Tensor]:
        ordered = []
        for spec in (s for s in inputs if s.name.startswith(prefix + ".")):
            key = spec.name.removeprefix(prefix + ".")
            expected = self.resolved(spec, sizes)
            if key not in tensors:
                raise RunInputError(f"missing conditioning input '{spec.name}' (expected shape {expected}, {spec.dtype}).")
            tensor = tensors[key]
            check_cond_tensor(spec.name, tensor, DTYPES[spec.dtype])
            if list(tensor.shape) != expected:
                raise RunInputError(f"conditioning input '{spec.name}' has shape {list(tensor.shape)}; this bundle expects "
                                    f"{expected} for {sizes['batch']} sample(s).")
            ordered.append(tensor.to(self.device, DTYPES[spec.dtype]))
        return ordered

    def initial_noise(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        return initial_noise(seed, shape).to(self.device, self.dtype)

    def initial_state(self, shape: tuple[int, ...], specs: list[StateSpec]) -> list[torch.Tensor]:
        sizes = self.sizes_of(shape)
        states = []
        for spec in specs:
            fill = torch.ones if spec.init == "ones" else torch.zeros
            states.append(fill(self.resolved(spec, sizes), dtype=DTYPES[spec.dtype], device=self.device))
        return states

    # ----- running -------------------------------------------------------------------------------
    def load_op_libraries(self) -> None:
        """The custom-op libraries the bundle ships (native code: loaded only after the checksums were verified)."""
        for library in self.manifest.get("op_libraries") or []:
            load_library(bundle_file(self.path, library["file"], self.manifest))

    def load(self, backend_name: str, files: list[str], build: dict | None = None) -> Callable:
        """A segment's runner; its files are the manifest's names, each confined to the bundle and checksummed.
        `build`: what the segment's engine was built for (TensorRT version, GPU), which its backend checks."""
        self.load_op_libraries()
        paths = [bundle_file(self.path, f, self.manifest) for f in files]
        for name in (f for f in files if f.endswith(".onnx")):
            check_onnx_external_data(self.path, name, self.manifest)
        return get_backend(backend_name).load(self.path, [p.relative_to(self.path).as_posix() for p in paths], self.device,
                                              profile=self.profile, **({"build": build} if build is not None else {}))

    def runner(self, segment: dict[str, Any]) -> Callable:
        if segment["name"] not in self._runners:
            if segment.get("kind") == "split":
                self._runners[segment["name"]] = self.split_runner(segment)
            else:
                self._runners[segment["name"]] = self.load(segment["backend"], segment["files"], segment.get("build"))
        return self._runners[segment["name"]]

    def backend_profiles(self) -> list:
        """What backends profiled themselves (ONNX Runtime's per-node report) since their runners were loaded
        with profile=True; ends their profiling."""
        return [run.end_profiling() for run in self._runners.values() if hasattr(run, "end_profiling")]

    def split_runner(self, segment: dict[str, Any]) -> Callable:
        """head, then compute or reuse as the head's one-byte device flag says, then tail; values by name."""
        parts = {part["name"]: (self.load(segment["backend"], part["files"], segment.get("build")), [s["name"] for s in part["inputs"]],
                                [s["name"] for s in part["outputs"]]) for part in segment["parts"]}
        step_inputs = [s.name for s in self.inputs]
        step_outputs = [s["name"] for s in self.manifest["outputs"]]

        def run(*inputs):
            values = dict(zip(step_inputs, inputs))

            def call(name: str) -> None:
                run_part, reads, writes = parts[name]
                with named_range(f"vdopt/part {name}"):
                    values.update(zip(writes, run_part(*(values[n] for n in reads))))

            call("head")
            call("compute" if bool(values[segment["flag"]]) else "reuse")
            call("tail")
            return [values[n] for n in step_outputs]

        return run

    # ----- staged bundles ------------------------------------------------------------------------
    @property
    def stages(self) -> list[dict[str, Any]]:
        """The manifest's stages in running order; empty for a one-stage bundle."""
        return self.manifest.get("stages") or []

    def stage(self, entry: dict[str, Any]) -> "Session":
        """One stage of this (verified) bundle as a one-stage session; it shares this session's loaded runners."""
        view = copy.copy(self)
        view.manifest = {**{k: v for k, v in self.manifest.items() if k != "stages"}, **entry}
        view.inputs = [TensorSpec.from_json(s) for s in entry["inputs"]]
        view.state_specs = [StateSpec.from_json(s) for s in entry["state"]]
        if "latent" in entry:
            view.dtype = DTYPES[entry["latent"]["dtype"]]
        return view

    def run_stages(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None, seed: int,
                   progress: bool, on_step: Callable[[int, list[torch.Tensor]], None] | None = None,
                   on_stage: Callable[[str, float], None] | None = None) -> torch.Tensor:
        """Each stage in turn: a loop from its own noise with the bundle's conditioning plus what it is fed, or one call
        on what it is fed; the last stage's output is the result. `on_step` sees the first stage's steps, the stage
        the manifest's top level describes; `on_stage(name, seconds)` each stage's wall clock (device synchronised)."""
        values: dict[str, torch.Tensor] = {}
        for entry in self.stages:
            stage = self.stage(entry)
            fed = {name: values[source] for name, source in entry["feeds"].items()}
            start = time.perf_counter()
            with named_range(f"vdopt/stage {entry['name']}"):
                if entry["kind"] == "call":
                    segment = entry["segments"][0]
                    values[entry["output"]] = stage.runner(segment)(*(fed[s["name"]] for s in segment["inputs"]))[0]
                else:
                    extra = {name.removeprefix("cond."): value for name, value in fed.items()}
                    stage_uncond = None if uncond is None else {**uncond, **null_cond(
                        {k: v for k, v in entry["null_cond"].items() if k in extra}, extra)}
                    values[entry["output"]] = stage.run({**cond, **extra}, stage_uncond, seed=seed + entry.get("noise_offset", 0),
                                                        progress=progress, on_step=on_step if entry is self.stages[0] else None)
            if on_stage is not None:
                if values[entry["output"]].is_cuda:
                    torch.cuda.synchronize()
                on_stage(entry["name"], time.perf_counter() - start)
        return values[self.stages[-1]["output"]]

    def run(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None = None, *, seed: int = 0,
            frames: int | None = None, height: int | None = None, width: int | None = None,
            progress: bool = True, on_step: Callable[[int, list[torch.Tensor]], None] | None = None,
            on_stage: Callable[[str, float], None] | None = None) -> torch.Tensor:
        """The clip (a latent) for `cond`; `on_step(i, state)` after each step, `on_stage(name, seconds)` after each stage
        of a staged bundle."""
        if self.stages:
            if (frames, height, width) != (None, None, None):
                raise RunInputError("this bundle runs in stages (content -> motion -> decode) at the sizes it was compiled "
                                    "for; it takes no frames, height or width.")
            return self.run_stages(cond, uncond, seed, progress, on_step, on_stage)
        shape = self.latent_shape(self.batch_of(cond), frames, height, width)
        segment = self.segment_for(shape)
        run_step = self.runner(segment)
        sizes = self.sizes_of(shape)
        inputs = self.segment_inputs(segment)
        conds = self.check_cond("cond", cond, sizes, inputs)
        if self.guidance:
            null = uncond if uncond is not None else self.null_cond(cond)
            conds += self.check_cond("uncond", null, sizes, inputs)
        x = self.initial_noise(seed, shape)
        state = self.initial_state(shape, self.segment_state(segment))
        for i in tqdm(range(self.num_steps), desc="denoising", unit="step", disable=not progress, leave=False):
            with named_range(f"vdopt/step {i}", payload=i):
                x, *state = run_step(x, torch.tensor(i, dtype=torch.int64, device=self.device), *conds, *state)
            if on_step is not None:
                on_step(i, state)
        return x
