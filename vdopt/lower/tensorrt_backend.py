"""`tensorrt`: a TensorRT engine (`.plan`) built from the ONNX step program.

The ONNX file is the one the `onnx` backend writes (and checks with ONNX Runtime on the CPU); the
engine gets one optimisation profile per segment whose min/opt/max shapes come from the recipe's
dynamic ranges. Building needs a GPU and the TensorRT libraries; everything that feeds the build
(the ONNX graph, the profile shapes, the builder settings) is computed without them and tested on
the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vdopt.errors import LoweringError
from vdopt.lower.onnx_backend import export_onnx
from vdopt.program import StepProgram, resolve_size, step_multiples

WORKSPACE_BYTES = 8 << 30


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is told. TensorRT >= 11 networks are strongly typed: precision lives in the graph."""

    profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    precision: str
    workspace_bytes: int = WORKSPACE_BYTES
    detailed_profiling: bool = True  # layer names in Nsight map back to module paths


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


def build_settings(program: StepProgram) -> BuildSettings:
    return BuildSettings(profiles=profile_shapes(program), precision=program.recipe.lower.precision)


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


def build_engine(onnx_path: Path, settings: BuildSettings) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LoweringError(f"TensorRT could not parse {onnx_path.name}: {errors}.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in settings.profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LoweringError(f"TensorRT failed to build an engine from {onnx_path.name}; see the builder log above.")
    return bytes(engine)


TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8}


class TensorRTBackend:
    name = "tensorrt"
    splits_conditionals = True  # an `if` layer may run both branches; see vdopt.lower.split_conditional
    runtime = {"profiling_verbosity": "DETAILED"}  # layer names (ONNX node names: module paths) reach Nsight

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        onnx_name, plan_name = f"{stem}.onnx", f"{stem}.plan"
        export_onnx(program, directory / onnx_name)
        (directory / plan_name).write_bytes(build_engine(directory / onnx_name, build_settings(program)))
        return [plan_name, onnx_name]

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False):
        trt = import_tensorrt()
        if not device.startswith("cuda"):
            raise LoweringError("a TensorRT segment runs on a CUDA device: pass --device cuda.")
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((directory / files[0]).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

        def run(*tensors):
            stream = torch.cuda.current_stream()
            tensors = [t.contiguous() for t in tensors]  # kept alive until the enqueued work is done
            for name, tensor in zip(inputs, tensors):
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            results = []
            for name in outputs:
                dtype = TORCH_DTYPES[engine.get_tensor_dtype(name).name]
                result = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
                context.set_tensor_address(name, result.data_ptr())
                results.append(result)
            if not context.execute_async_v3(stream.cuda_stream):
                raise LoweringError("TensorRT execution failed; see the runtime log above.")
            stream.synchronize()
            return tuple(results)

        return run
