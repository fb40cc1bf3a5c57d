"""vdopt's custom ops: each form (C++ CPU kernel, ONNX function) against the aten decomposition; one node per op
through export, AOTInductor and ONNX; fused bundles against the aten reference; the op library shipped and checked."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch

from vdopt.bundle import MANIFEST, MANIFEST_CHECKSUM
from vdopt.compiler import compile_bundle
from vdopt.errors import BundleError
from vdopt.safety import UnsafeInputError
from vdopt.ops import custom_ops, decompositions, library_path
from vdopt.ops import onnx as onnx_ops
from vdopt.program import DTYPES, resolve_size
from vdopt.recipe import parse_recipe
from vdopt.runtime import Session
from vdopt.runtime.trace import CacheTrace

library_path()  # builds (once, cached) and loads the op library
ROWS_CASES = {  # name -> (rows, probe shape)
    "rows": (4, (8, 6, 5)), "one_row": (1, (1, 7)), "empty_batch": (0, (0, 6, 5)), "frames_folded": (2, (6, 4, 3)),
}


def decision_inputs(rows, shape, dtype=torch.float32, forced=None, nan=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(shape, generator=generator).to(dtype)
    prev = (probe.float() + 0.3 * torch.randn(shape, generator=generator)).to(dtype)
    if nan and rows:
        probe.view(rows, -1)[0, 0] = float("nan")
    accumulated = torch.rand(rows, generator=generator)
    forced = torch.rand(rows, generator=generator) > 0.5 if forced is None else torch.full((rows,), forced)
    return probe, prev, accumulated, forced


def assert_same(actual, expected, tol=1e-6):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("case", sorted(ROWS_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold, forced", [(0.2, None), (1e9, False), (0.0, None), (1e9, True)],
                         ids=["mixed", "all_reuse", "all_recompute", "all_forced"])
def test_cache_decision_cpu_kernel_equals_its_decomposition(case, dtype, threshold, forced):
    rows, shape = ROWS_CASES[case]
    args = (*decision_inputs(rows, shape, dtype, forced), torch.tensor([0.7, -0.2, 1.0, 0.05]), threshold)
    assert_same(torch.ops.vdopt.cache_decision(*args), decompositions.cache_decision(*args))


def test_cache_decision_all_reuse_and_all_recompute_mean_what_they_say():
    probe, prev, accumulated, _ = decision_inputs(4, (4, 10))
    coefficients = torch.tensor([1.0, 0.0])
    mask, any_due, _, kept, prev_next = torch.ops.vdopt.cache_decision(probe, prev, accumulated, torch.zeros(4, dtype=torch.bool),
                                                                       coefficients, 1e9)
    assert not any_due and not mask.any() and torch.equal(prev_next, prev) and torch.all(kept > 0)
    mask, any_due, _, reset, prev_next = torch.ops.vdopt.cache_decision(probe, prev, accumulated, torch.zeros(4, dtype=torch.bool),
                                                                        coefficients, 0.0)
    assert any_due and mask.all() and torch.equal(prev_next, probe) and not reset.any()


def test_a_nan_probe_row_recomputes_only_when_forced():
    probe, prev, accumulated, _ = decision_inputs(2, (2, 6), nan=True)
    for forced in (False, True):
        args = (probe, prev, accumulated, torch.full((2,), forced), torch.tensor([1.0, 0.0]), 0.0)
        mask, _, value, _, _ = torch.ops.vdopt.cache_decision(*args)
        assert torch.isnan(value[0]) and bool(mask[0]) == forced
        assert_same(torch.ops.vdopt.cache_decision(*args), decompositions.cache_decision(*args))


@pytest.mark.parametrize("case", sorted(ROWS_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_taylor_forecast_cpu_kernel_equals_its_decomposition(case, dtype):
    rows, shape = ROWS_CASES[case]
    cache, previous, weight, _ = decision_inputs(rows, shape, dtype)
    assert_same([torch.ops.vdopt.taylor_forecast(cache, previous, weight)],
                [decompositions.taylor_forecast(cache, previous, weight)], tol=0)


@pytest.mark.parametrize("op, args", [
    ("cache_decision", (torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.ones(2), 0.1)),
    ("cache_decision", (torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.ones(2), 0.1)),
    ("cache_decision", (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(2), torch.zeros(2), torch.ones(2), 0.1)),
    ("taylor_forecast", (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5))),
    ("taylor_forecast", (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(2))),
], ids=["prev_shape", "rows_do_not_divide", "forced_not_bool", "weight_rows", "dtypes_differ"])
def test_the_kernels_refuse_inputs_that_do_not_fit(op, args):
    with pytest.raises(RuntimeError, match="vdopt"):
        getattr(torch.ops.vdopt, op)(*args)


def one_node_model(name, args, kwargs=None) -> onnx.ModelProto:
    op = getattr(torch.ops.vdopt, name)

    class Single(torch.nn.Module):
        def forward(self, *tensors):
            return op(*tensors, **(kwargs or {}))

    program = torch.onnx.export(torch.export.export(Single(), args), (), dynamo=True, opset_version=18,
                                custom_translation_table=onnx_ops.translation_table(), verbose=False)
    model = program.model_proto
    assert onnx_ops.attach_functions(model) == [name]
    onnx.checker.check_model(model, full_check=True)
    onnx_ops.check_plugin_nodes(model)
    return model


def run_onnx(model, args):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})]


@pytest.mark.parametrize("threshold, forced", [(0.2, None), (1e9, False), (0.0, None)], ids=["mixed", "all_reuse", "all_recompute"])
def test_onnx_function_of_cache_decision_equals_the_decomposition(threshold, forced):
    coefficients = torch.tensor([0.7, -0.2, 1.0, 0.05])
    tensors = decision_inputs(3, (6, 4, 5), forced=forced)

    class Single(torch.nn.Module):
        def forward(self, probe, prev, accumulated, forced):
            return torch.ops.vdopt.cache_decision(probe, prev, accumulated, forced, coefficients, threshold)

    program = torch.onnx.export(torch.export.export(Single(), tensors), (), dynamo=True, opset_version=18, verbose=False,
                                custom_translation_table=onnx_ops.translation_table())
    model = program.model_proto
    assert onnx_ops.attach_functions(model) == ["cache_decision"]
    onnx.checker.check_model(model, full_check=True)
    onnx_ops.check_plugin_nodes(model)
    nodes = list(onnx_ops.plugin_nodes(model.graph))
    assert [(n.domain, n.op_type) for n in nodes] == [("trt.plugins", "cache_decision")]
    expected = decompositions.cache_decision(*tensors, coefficients, threshold)
    actual = run_onnx(model, tensors)
    actual[1] = actual[1].reshape(())
    assert_same(actual, expected, tol=1e-6)


def test_onnx_function_of_taylor_forecast_equals_the_decomposition():
    cache, previous, weight, _ = decision_inputs(3, (6, 4, 5))
    model = one_node_model("taylor_forecast", (cache, previous, weight))
    assert_same(run_onnx(model, (cache, previous, weight)), [decompositions.taylor_forecast(cache, previous, weight)], tol=1e-6)


def test_plugin_node_check_names_what_is_wrong():
    cache, previous, weight, _ = decision_inputs(3, (6, 4, 5))
    model = one_node_model("taylor_forecast", (cache, previous, weight))
    node = next(onnx_ops.plugin_nodes(model.graph))
    node.attribute.append(onnx.helper.make_attribute("alpha", 1.0))
    with pytest.raises(ValueError, match="undeclared attribute"):
        onnx_ops.check_plugin_nodes(model)
    del node.attribute[-1]
    for attribute in node.attribute:
        if attribute.name == "plugin_namespace":
            attribute.s = b"other"
    with pytest.raises(ValueError, match="plugin_namespace"):
        onnx_ops.check_plugin_nodes(model)
    model = one_node_model("taylor_forecast", (cache, previous, weight))
    node = next(onnx_ops.plugin_nodes(model.graph))
    node.input[2] = node.input[0]  # the 3-D cache where the 1-D weight goes
    with pytest.raises(ValueError, match="rank 3, declared 1"):
        onnx_ops.check_plugin_nodes(model)


# ----- the cached step with fused ops, lowered --------------------------------------------------------------------
STEPS = 6
INPUT = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7,
         "batch": {"min": 1, "max": 2}}
CACHE = {"policy": "first_blocks", "threshold": 0.1, "forecast": 0.5, "max_reuse": 2}  # rows decide differently


def cached_recipe(backend: str, ops: str, policy: dict | None = None):
    return parse_recipe({"model": {"family": "wan", "input": INPUT}, "sampler": {"steps": STEPS},
                         "passes": [{"name": "insert_cache", "params": {**(policy or CACHE), "ops": ops}}],
                         "lower": {"backend": backend}})


def two_prompts():
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(2, 7, 16, generator=generator) * torch.tensor([1.0, 8.0]).reshape(2, 1, 1)
    return {"encoder_hidden_states": text}


def generate(bundle):
    session = Session(bundle)
    trace = CacheTrace(session.manifest)
    clip = session.run(two_prompts(), seed=1, frames=3, height=8, width=8, progress=False, on_step=trace.on_step)
    return clip, trace.body_evaluations()


@pytest.fixture(scope="module")
def aten_reference(tmp_path_factory):
    """The aten bundle on the torch backend: the reference; its rows decide differently (mixed decisions)."""
    path = tmp_path_factory.mktemp("aten") / "aten.vdopt"
    torch.manual_seed(0)
    compile_bundle(cached_recipe("torch", "aten"), None, path)
    clip, evaluations = generate(path)
    assert len(set(evaluations)) > 1 and 0 < min(evaluations) and max(evaluations) < STEPS, evaluations
    return clip, evaluations


def step_op_counts(ep) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "vdopt":
                    counts[node.target.name()] = counts.get(node.target.name(), 0) + 1
    return counts


@pytest.mark.parametrize("policy", [{"policy": "teacache", "threshold": 1.0, "coefficients": [1.0, 0.5, 0.0], "forecast": 1.0},
                                    {"policy": "adacache", "forecast": 0.5}], ids=["teacache", "adacache"])
def test_every_policy_decides_alike_with_fused_ops(policy):
    """The eager step programs (no lowering): fused and aten decisions and clips agree step by step."""
    from vdopt.compiler import compile_program

    programs = {}
    for ops in ("aten", "fused"):
        torch.manual_seed(0)
        programs[ops] = compile_program(cached_recipe("torch", ops, policy), None)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=generator)
    text = two_prompts()["encoder_hidden_states"]
    results = {}
    for ops, program in programs.items():
        module, latent = program.module(), x
        sizes = {"batch": 2, "frames": 3, "height": 8, "width": 8}
        state = [torch.zeros([resolve_size(d, sizes, list(program.multiples)) for d in spec.shape], dtype=DTYPES[spec.dtype])
                 for spec in program.state]
        computed = []
        for i in range(STEPS):
            latent, *state = module(latent, torch.tensor(i), text, torch.zeros_like(text), *state)
            computed.append(state[[s.name for s in program.state].index("state.computed")].tolist())
        results[ops] = latent, computed
    assert results["fused"][1] == results["aten"][1] and 0 < results["aten"][1][-1][0] < STEPS
    torch.testing.assert_close(results["fused"][0], results["aten"][0], atol=1e-6, rtol=0)


def test_the_fused_step_has_one_node_per_op_after_export():
    from vdopt.compiler import compile_program

    torch.manual_seed(0)
    program = compile_program(cached_recipe("torch", "fused"), None)
    assert step_op_counts(program.ep) == {"vdopt::cache_decision": 1, "vdopt::taylor_forecast": 1}
    assert custom_ops(program.ep) == ["vdopt::cache_decision", "vdopt::taylor_forecast"]
    torch.manual_seed(0)
    assert step_op_counts(compile_program(cached_recipe("torch", "aten"), None).ep) == {}


@pytest.mark.parametrize("backend", ["torch", "onnx", "aoti"])
def test_fused_bundles_match_the_aten_bundle(backend, aten_reference, tmp_path):
    expected, evaluations = aten_reference
    torch.manual_seed(0)
    manifest = compile_bundle(cached_recipe(backend, "fused"), None, tmp_path / "fused.vdopt")
    assert manifest["custom_ops"] == ["vdopt::cache_decision", "vdopt::taylor_forecast"]
    clip, fused_evaluations = generate(tmp_path / "fused.vdopt")
    assert fused_evaluations == evaluations
    torch.testing.assert_close(clip, expected, atol=1e-5, rtol=0)
    files = manifest["segments"][0]["files"]
    if backend == "onnx":
        model = onnx.load(str(tmp_path / "fused.vdopt" / files[0]))
        assert sorted(n.op_type for n in onnx_ops.plugin_nodes(model.graph)) == ["cache_decision", "taylor_forecast"]
        assert sorted(f.name for f in model.functions) == ["cache_decision", "taylor_forecast"]
        assert "op_libraries" not in manifest  # ONNX Runtime runs the functions
    else:
        assert [lib["file"] for lib in manifest["op_libraries"]] == ["ops/vdopt_ops.so"]
    if backend == "aoti":
        with zipfile.ZipFile(tmp_path / "fused.vdopt" / files[0]) as package:
            wrapper = next(n for n in package.namelist() if n.endswith("wrapper.json"))
            targets = [node["node"]["target"] for node in json.loads(package.read(wrapper))["nodes"]]
        assert sorted(targets) == ["vdopt::cache_decision", "vdopt::taylor_forecast"]


@pytest.fixture(scope="module")
def fused_torch_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused") / "fused.vdopt"
    torch.manual_seed(0)
    compile_bundle(cached_recipe("torch", "fused"), None, path)
    return path


def test_a_new_process_runs_the_bundle_with_the_library_it_ships(fused_torch_bundle, aten_reference, tmp_path):
    """No op library is built or found elsewhere: VDOPT_CACHE points at an empty folder."""
    text = two_prompts()["encoder_hidden_states"]
    torch.save(text, tmp_path / "text.pt")
    script = (f"import torch; import vdopt.ops as o; from vdopt.runtime import Session; "
              f"clip = Session({str(fused_torch_bundle)!r}).run({{'encoder_hidden_states': torch.load({str(tmp_path / 'text.pt')!r})}}, "
              f"seed=1, frames=3, height=8, width=8, progress=False); "
              f"assert list(o._loaded.values())[0].startswith({str(fused_torch_bundle)!r}), o._loaded; "
              f"torch.save(clip, {str(tmp_path / 'clip.pt')!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"VDOPT_CACHE": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "empty").exists()
    torch.testing.assert_close(torch.load(tmp_path / "clip.pt"), aten_reference[0], atol=1e-5, rtol=0)


def copy_bundle(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return destination


def test_a_tampered_op_library_is_refused_before_loading(fused_torch_bundle, tmp_path):
    bundle = copy_bundle(fused_torch_bundle, tmp_path / "b.vdopt")
    with open(bundle / "ops" / "vdopt_ops.so", "ab") as library:
        library.write(b"\0")
    with pytest.raises(BundleError, match="vdopt_ops.so"):
        Session(bundle)


def test_a_missing_op_library_is_a_clear_error(fused_torch_bundle, tmp_path):
    bundle = copy_bundle(fused_torch_bundle, tmp_path / "b.vdopt")
    (bundle / "ops" / "vdopt_ops.so").unlink()
    with pytest.raises(BundleError, match="vdopt_ops.so"):
        Session(bundle)


def test_an_op_library_outside_the_bundle_is_refused(fused_torch_bundle, tmp_path):
    """Even with the manifest re-sealed (manifest.sha256 rewritten to match the edit)."""
    import hashlib

    bundle = copy_bundle(fused_torch_bundle, tmp_path / "b.vdopt")
    (tmp_path / "evil.so").write_bytes((bundle / "ops" / "vdopt_ops.so").read_bytes())
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["op_libraries"][0]["file"] = "../evil.so"
    text = json.dumps(manifest).encode()
    (bundle / MANIFEST).write_bytes(text)
    (bundle / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")
    with pytest.raises(UnsafeInputError, match=r"op_libraries\[0\].file.*outside"):
        Session(bundle)


def test_the_io_bound_onnx_runner_equals_the_host_copy_runner(tmp_path):
    """The IOBinding path (what a CUDA step takes, no host copies) run on the CPU: the same outputs as feeding numpy."""
    import onnxruntime as ort

    from vdopt.lower.onnx_backend import bound_runner, session_options

    probe, prev, accumulated, forced = decision_inputs(2, (4, 6, 5))
    model = one_node_model("cache_decision", (probe, prev, accumulated, forced, torch.tensor([1.0, 0.0])), {"threshold": 0.1})
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    inputs = (probe, prev, accumulated, forced, torch.tensor([1.0, 0.0]))
    bound = bound_runner(session, "cpu")(*inputs)
    copied = run_onnx(model, inputs)
    assert len(bound) == 5
    for b, c in zip(bound, copied):
        assert b.dtype == c.dtype
        torch.testing.assert_close(b, c.reshape(b.shape), rtol=0, atol=0)


def test_a_second_different_op_library_is_refused_before_it_is_loaded(tmp_path):
    """The dispatcher keeps one kernel per op: a bundle built with another library must be opened in a new process."""
    from vdopt.ops import load_library

    other = tmp_path / "vdopt_ops.so"
    other.write_bytes(library_path().read_bytes() + b"\0")
    with pytest.raises(BundleError, match="a different vdopt op library .* is already loaded in this process"):
        load_library(other)
    load_library(library_path())  # the one already loaded: nothing to do


def test_inspect_names_the_custom_ops_and_the_shipped_library(fused_torch_bundle):
    from vdopt.inspect import describe

    text = describe(fused_torch_bundle)
    assert "custom ops: vdopt::cache_decision, vdopt::taylor_forecast; op library ops/vdopt_ops.so (linux" in text
