"""`onnx`: the step program as ONNX (opset >= 18), cleaned with onnx-graphsurgeon, run by ONNX Runtime.

The same ONNX file is what a TensorRT build consumes, so this backend is also how the TensorRT
path is checked on a machine without a GPU.
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from vdopt.errors import BundleError, LoweringError, first_line
from vdopt.lower.base import unsupported_op_error
from vdopt.ops.onnx import attach_functions, check_plugin_nodes, translation_table
from vdopt.program import StepProgram

OPSET = 18


def export_onnx(program: StepProgram, path: Path) -> None:
    import onnx
    import onnx_graphsurgeon as gs

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(
            program.ep, (), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[s.name for s in program.inputs], output_names=onnx_output_names(program),
            custom_translation_table=translation_table(),
        )
    except Exception as exc:  # noqa: BLE001 - the exporter wraps the real failure; name the op and module
        raise unsupported_op_error("onnx", program.ep, str(exc), unsupported_line(exc)) from exc
    proto = onnx_program.model_proto  # a property that serialises anew on each read
    name_nodes_by_module(proto.graph)
    graph = gs.import_onnx(proto)
    _bool_where_as_uint8(graph)
    graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    model.opset_import[0].version = max(model.opset_import[0].version, OPSET)
    attach_functions(model)
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
    check_onnx(path)


def check_onnx(path: Path) -> None:
    """What every ONNX file vdopt writes must pass: `onnx.checker`'s full check (types and shapes inferred through
    every node) and each vdopt plugin node against its declaration."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        check_plugin_nodes(onnx.load(str(path), load_external_data=False))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise LoweringError(f"{path.name}: the ONNX file vdopt wrote does not check ({first_line(exc)}); this is a vdopt "
                            f"bug, please report it with the recipe.") from exc


NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's ['', 'module', 'module.child', 'fx_node'] per node


def name_nodes_by_module(graph) -> None:
    """Prefixes each node's name with the module path it was traced in and a slash (`a.b/node_linear_7`;
    `/node_mul` for the step's own ops), so ONNX Runtime profiles and TensorRT layer names (what Nsight
    shows) say where an op came from. Fused nodes keep the prefix (`a.b/node_gelu/QuickGeluFusion`)."""
    for node in graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES), None)
        node.name = f"{scopes[-2] if scopes and len(scopes) > 2 else ''}/{node.name}"
        for attribute in node.attribute:  # `If` branches (a cache's torch.cond)
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                name_nodes_by_module(subgraph)


def module_of_node(name: str) -> str:
    """The module path `name_nodes_by_module` put in front of an ONNX node name ('' for the step's own ops)."""
    return name.split("/", 1)[0] if "/" in name else ""


def _bool_where_as_uint8(graph) -> None:
    """ONNX Runtime's CPU `Where` has no tensor(bool) kernel ("NOT_IMPLEMENTED: Could not find an
    implementation for Where(16)"), and torch's `masked_fill`/`where` on boolean tensors (attention
    masks, e.g. HunyuanVideo's) export to exactly that. Compute such a Where in uint8 and cast back."""
    import onnx
    import onnx_graphsurgeon as gs

    for node in [n for n in graph.nodes if n.op == "Where"]:
        out = node.outputs[0]
        if out.dtype is None or np.dtype(out.dtype) != np.bool_:
            continue
        for k in (1, 2):
            as_u8 = gs.Variable(f"{node.name}_in{k}_u8", dtype=np.uint8)
            graph.nodes.append(gs.Node("Cast", name=f"{node.name}_cast_in{k}", inputs=[node.inputs[k]], outputs=[as_u8],
                                       attrs={"to": onnx.TensorProto.UINT8}))
            node.inputs[k] = as_u8
        result = gs.Variable(f"{node.name}_out_u8", dtype=np.uint8, shape=out.shape)
        node.outputs[0] = result
        graph.nodes.append(gs.Node("Cast", name=f"{node.name}_cast_out", inputs=[result], outputs=[out],
                                   attrs={"to": onnx.TensorProto.BOOL}))


def onnx_output_names(program: StepProgram) -> list[str]:
    """Output names; a state output gets `.next`, since an ONNX value named like an input *is* that input."""
    inputs = {s.name for s in program.inputs}
    return [f"{s.name}.next" if s.name in inputs else s.name for s in program.outputs]


def unsupported_line(exc: Exception) -> str:
    """The line that names the unsupported op, if the exporter wrote one; else the first line."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "Unsupported" in line or "not supported" in line or "No decomposition" in line:
            return line.strip()
    return first_line(exc)


def session_options(threads: int):
    """How vdopt runs ONNX Runtime: all graph optimisations, one op at a time on `threads` threads (torch's
    count, so `--threads` governs every backend alike), and workers that sleep when idle: ORT's default
    spin-waiting held a shared 2-core CPU and made the teacher's step 2.2x slower (45 against 21 ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def bound_runner(session, device_type: str, device_id: int = 0):
    """`run(*tensors)` through an IOBinding: inputs are handed to ONNX Runtime where they lie (DLPack, no copy) and
    outputs stay on the device ORT computed them on (DLPack back to torch), so a CUDA step never copies through the
    host. The inputs must already be on `device_type`."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def run(*inputs):
        binding = session.io_binding()
        kept = [t.detach().contiguous() for t in inputs]  # alive until the run returns
        for name, tensor in zip(input_names, kept):
            binding.bind_ortvalue_input(name, ort.OrtValue(_pybind_state.OrtValue.from_dlpack(tensor.__dlpack__())))
        for name in output_names:
            binding.bind_output(name, device_type, device_id)
        session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(value) for value in binding.get_outputs())

    return run


class OnnxBackend:
    name = "onnx"
    splits_conditionals = False  # runs `torch.cond` lazily
    needs_op_library = False  # each vdopt op is a trt.plugins node that carries its decomposition as an ONNX function
    runtime = {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
               "intra_op_threads": "torch.get_num_threads()", "inter_op_threads": 1, "allow_spinning": False}

    def profile_record(self, program: StepProgram) -> dict:
        """The shapes a TensorRT engine built from this file must cover (its input is this backend's output)."""
        from vdopt.lower.tensorrt_backend import profile_record

        return profile_record(program)

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.onnx"
        export_onnx(program, directory / name)
        return sorted(p.name for p in directory.iterdir() if p.name in (name, f"{name}.data"))

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        options = session_options(torch.get_num_threads())
        if profile:  # ONNX Runtime's own per-node profile, read back by `vdopt profile` (runner.end_profiling)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="vdopt-ort-profile-")) / "ort")
        try:
            session = ort.InferenceSession(str(directory / files[0]), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable models
            raise BundleError(f"{directory / files[0]}: onnxruntime cannot load it as an ONNX model ({first_line(exc)}); "
                              f"the file or the manifest's backend was edited. Recompile the bundle.") from None
        names = [i.name for i in session.get_inputs()]
        if device.startswith("cuda") and "CUDAExecutionProvider" in session.get_providers():
            run = bound_runner(session, "cuda", torch.device(device).index or 0)
        else:
            def run(*inputs):
                feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(names, inputs)}
                return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

        run.options = session.get_session_options()
        if profile:
            run.end_profiling = lambda: json.loads(Path(session.end_profiling()).read_text())
        return run
