"""`tensorrt`: a TensorRT engine (`.plan`) built from the ONNX step program, vdopt's ops as plugins.

The ONNX file is the one the `onnx` backend writes (and checks with ONNX Runtime on the CPU); vdopt's ops
are `trt.plugins` nodes that the parser maps to the QDP plugins in cuda/plugins. The network is strongly
typed: every tensor's precision is the graph's, which `model.dtype` decides (there is no separate engine
precision to drift from what was verified). The engine gets one optimisation profile whose min/opt/max
shapes come from the recipe's dynamic ranges, and a timing cache kept across builds. Inputs and outputs are
bound by name, with count, dtype and shape checked on every call. The manifest records the TensorRT
version and GPU compute capability an engine was built for, and loading refuses another.

Building needs a GPU and the TensorRT libraries; everything that feeds the build (the ONNX graph, the
profile shapes, the builder settings) is computed without them and tested on the CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vdopt.errors import BundleError, LoweringError, RunInputError
from vdopt.lower.onnx_backend import export_onnx
from vdopt.program import StepProgram, resolve_size, step_multiples

WORKSPACE_BYTES = 8 << 30


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is told. Precision lives in the graph (strongly typed network)."""

    profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    workspace_bytes: int = WORKSPACE_BYTES
    detailed_profiling: bool = True  # layer names in Nsight map back to module paths
    strongly_typed: bool = True
    timing_cache: Path | None = None


def profile_shapes(program: StepProgram) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max shape per input: every manifest shape evaluated at the recipe's smallest and largest
    batch and latent sizes (rounded inwards to the patch multiples); opt is the example the program was traced at."""
    multiples = list(program.multiples)
    of = step_multiples(multiples)
    low = {name: -(-lo // of[name]) * of[name] for name, (lo, _) in program.dims.items()}
    high = {name: hi - hi % of[name] for name, (_, hi) in program.dims.items()}

    def at(spec, sizes):
        return tuple(resolve_size(d, sizes, multiples) for d in spec.shape)

    return {spec.name: (at(spec, low), tuple(example.shape), at(spec, high))
            for spec, example in zip(program.inputs, program.example_inputs)}


def profile_record(program: StepProgram) -> dict[str, list[list[int]]]:
    """The manifest's `profile` of an ONNX segment or part: per input, the [min, opt, max] shapes an engine built from
    its file must cover (what `polygraphy_command` and the TensorRT build use)."""
    return {name: [list(shape) for shape in shapes] for name, shapes in profile_shapes(program).items()}


def shape_arg(name: str, shape) -> str:
    return f"{name}:[{','.join(str(d) for d in shape)}]"


POLYGRAPHY = ("import sys\nif '--trt' in sys.argv:\n    import vdopt.cuda.plugins.vdopt_plugins\n"
              "from polygraphy.tools._main import main\nsys.exit(main())")


def polygraphy_command(onnx_path: Path, profile: dict[str, list[list[int]]], runners=("--trt", "--onnxrt"),
                       at: int = 1, tolerance: float = 1e-3) -> list[str]:
    """`polygraphy run FILE --trt --onnxrt` with the engine's optimisation profile from the manifest and inputs of the
    profile's shape `at` (0 min, 1 opt, 2 max); vdopt's plugins are registered first (QDP registers on import).
    Random inputs lie in [0, 1]: step indices 0 or 1, counters and flags in range."""
    command = [sys.executable, "-c", POLYGRAPHY, "run", str(onnx_path), *runners,
               "--input-shapes", *(shape_arg(n, shapes[at]) for n, shapes in profile.items()),
               "--val-range", "[0,1]", "--atol", str(tolerance), "--rtol", str(tolerance)]
    if "--trt" in runners:
        for flag, k in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            command += [flag, *(shape_arg(n, shapes[k]) for n, shapes in profile.items())]
    return command


def onnx_files_with_profiles(bundle_dir: Path, manifest: dict) -> list[tuple[Path, dict]]:
    """Every ONNX file of a bundle (each step segment and each part of a split one) with its recorded profile."""
    found = []
    for segment in manifest["segments"]:
        for unit in segment.get("parts") or [segment]:
            onnx_file = next(f for f in unit["files"] if f.endswith(".onnx"))
            found.append((Path(bundle_dir) / onnx_file, unit["profile"]))
    return found


def timing_cache_path() -> Path:
    return Path(os.environ.get("VDOPT_CACHE", Path.home() / ".cache" / "vdopt")) / "tensorrt" / "timing.cache"


def build_settings(program: StepProgram) -> BuildSettings:
    return BuildSettings(profiles=profile_shapes(program), timing_cache=timing_cache_path())


def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise LoweringError(
            f"lower.backend tensorrt needs the TensorRT libraries, which cannot be loaded here ({type(exc).__name__}: "
            f"{exc}). Build on a machine with an NVIDIA GPU and `pip install vdopt[tensorrt]`, or use the onnx backend, "
            f"whose .onnx file is the engine's input."
        ) from None
    return trt


def register_plugins() -> None:
    """vdopt's ops as TensorRT plugins (QDP registers on import)."""
    import vdopt.cuda.plugins.vdopt_plugins  # noqa: F401


def network_flags(trt, settings: BuildSettings) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 10; the only mode in 11
    return 1 << int(flag) if settings.strongly_typed and flag is not None else 0


def build_engine(onnx_path: Path, settings: BuildSettings) -> bytes:
    trt = import_tensorrt()
    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, settings))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LoweringError(f"TensorRT could not parse {onnx_path.name}: {errors}.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache = None
    if settings.timing_cache is not None:
        known = settings.timing_cache.read_bytes() if settings.timing_cache.exists() else b""
        cache = config.create_timing_cache(known)
        config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in settings.profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LoweringError(f"TensorRT failed to build an engine from {onnx_path.name}; see the builder log above.")
    if cache is not None:
        settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        staging = settings.timing_cache.with_suffix(f".{os.getpid()}")
        staging.write_bytes(bytes(cache.serialize()))
        staging.replace(settings.timing_cache)
    return bytes(engine)


def build_target() -> dict:
    """What an engine is tied to: the TensorRT version that built it and the GPU's compute capability."""
    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "compute_capability": f"{major}.{minor}",
            "device_name": torch.cuda.get_device_name()}


def check_build_target(recorded: dict | None, engine_name: str) -> None:
    """Refuses an engine built for another TensorRT or GPU generation, with both named."""
    if not recorded:
        raise BundleError(f"{engine_name}: the manifest does not record which TensorRT and GPU the engine was built for "
                          f"(segment 'build'); recompile the bundle with this vdopt.")
    here = build_target()
    for key, what in (("tensorrt_version", "TensorRT"), ("compute_capability", "GPU compute capability")):
        if recorded.get(key) != here[key]:
            raise BundleError(f"{engine_name}: the engine was built for {what} {recorded.get(key)}, this machine has "
                              f"{here[key]} ({here['device_name']}); a TensorRT engine runs only where it was built. "
                              f"Recompile the bundle here (its .onnx file is in the bundle).")


TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8}


def onnx_io_names(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [v.name for v in graph.input], [v.name for v in graph.output]


class TensorRTBackend:
    name = "tensorrt"
    splits_conditionals = True  # an `if` layer may run both branches; see vdopt.lower.split_conditional
    needs_op_library = False  # vdopt's ops are TensorRT plugins (cuda/plugins), registered where the engine is built and run
    runtime = {"profiling_verbosity": "DETAILED", "strongly_typed": True}

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        onnx_name, plan_name = f"{stem}.onnx", f"{stem}.plan"
        export_onnx(program, directory / onnx_name)
        (directory / plan_name).write_bytes(build_engine(directory / onnx_name, build_settings(program)))
        return [plan_name, onnx_name]

    def build_info(self) -> dict:
        return build_target()

    def profile_record(self, program: StepProgram) -> dict:
        return profile_record(program)

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False, build: dict | None = None):
        trt = import_tensorrt()
        if not device.startswith("cuda"):
            raise LoweringError("a TensorRT segment runs on a CUDA device: pass --device cuda.")
        check_build_target(build, files[0])
        register_plugins()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((directory / files[0]).read_bytes())
        if engine is None:
            raise BundleError(f"{files[0]}: TensorRT could not deserialise the engine (see its log above): it is damaged, "
                              f"or was built by another TensorRT or for another GPU. Recompile the bundle.")
        context = engine.create_execution_context()
        input_names, output_names = onnx_io_names(directory / files[1])
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        engine_outputs = set(names) - engine_inputs
        if engine_inputs != set(input_names) or engine_outputs != set(output_names):
            raise BundleError(f"{files[0]}: the engine's inputs {sorted(engine_inputs)} and outputs {sorted(engine_outputs)} "
                              f"are not its ONNX file's {input_names} and {output_names}; the bundle was edited. Recompile.")
        dtypes = {n: TORCH_DTYPES[engine.get_tensor_dtype(n).name] for n in names}

        def run(*tensors):
            if len(tensors) != len(input_names):
                raise RunInputError(f"{files[0]}: {len(tensors)} inputs given, the engine takes {len(input_names)} "
                                    f"({', '.join(input_names)}).")
            stream = torch.cuda.current_stream()
            tensors = [t.contiguous() for t in tensors]  # kept alive until the enqueued work is done
            for name, tensor in zip(input_names, tensors):
                if tensor.dtype != dtypes[name] or tensor.device.type != "cuda":
                    raise RunInputError(f"{files[0]}: input '{name}' is {tensor.dtype} on {tensor.device}, the engine "
                                        f"takes {dtypes[name]} on cuda.")
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise RunInputError(f"{files[0]}: input '{name}' has shape {list(tensor.shape)}, outside the engine's "
                                        f"optimisation profile; the bundle's dims say which sizes it takes.")
                context.set_tensor_address(name, tensor.data_ptr())
            results = []
            for name in output_names:
                result = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[name], device=device)
                context.set_tensor_address(name, result.data_ptr())
                results.append(result)
            if not context.execute_async_v3(stream.cuda_stream):
                raise LoweringError("TensorRT execution failed; see the runtime log above.")
            return tuple(results)

        return run

