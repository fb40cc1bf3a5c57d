"""`vdopt profile`: per-step, per-decision and per-module attribution on every backend's way of naming work.

Tests check what the profile says (which modules, which decisions, that nothing is counted twice),
never how long anything took.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from vdopt.cli import main
from vdopt.compiler import compile_bundle
from vdopt.errors import BundleError
from vdopt.lower import get_backend
from vdopt.lower.aoti import kernel_call_sites
from vdopt.lower.onnx_backend import module_of_node, name_nodes_by_module
from vdopt.lower.torch_backend import MODULE_RANGE, RANGE_ENTER, RANGE_EXIT, profiled
from vdopt.module_stack import module_path
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.runtime import Session
from vdopt.runtime.profile import KernelCursor, parse_module_map, profile_bundle

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt/reference/weights/teacher.safetensors"
PROMPTS = ["red circle moving up", "blue square moving left"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.GELU("tanh")

    def forward(self, x):
        return self.act(self.lin(x)) + x


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x * 2


def range_names(graph) -> list[str]:
    return [n.args[0] for n in graph.nodes if n.target is RANGE_ENTER]


def test_module_ranges_wrap_each_run_of_one_modules_ops():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(3, 4)
    module = torch.export.export(model, (x,)).module()
    expected = model(x)
    paths = [module_path(n) for n in module.graph.nodes if n.op == "call_function"]
    runs = [p for k, p in enumerate(paths) if k == 0 or p != paths[k - 1]]

    profiled(module)

    assert range_names(module.graph) == [MODULE_RANGE + p for p in runs]
    assert set(runs) >= {"blocks.0.lin", "blocks.0.act", "blocks.1.lin", ""}
    exits = [n for n in module.graph.nodes if n.target is RANGE_EXIT]
    assert len(exits) == len(runs)  # every range closed, the last one before the output
    assert list(module.graph.nodes)[-2] is exits[-1]
    torch.testing.assert_close(module(x), expected)


def test_onnx_nodes_are_named_after_their_modules():
    model = Tiny().eval()
    program = torch.onnx.export(torch.export.export(model, (torch.randn(3, 4),)), (), dynamo=True, verbose=False)
    graph = program.model_proto.graph
    name_nodes_by_module(graph)
    modules = Counter(module_of_node(n.name) for n in graph.node)
    assert {"blocks.0.lin", "blocks.0.act", "blocks.1.lin", "blocks.1.act"} <= set(modules)
    assert modules[""] >= 1  # `x * 2` is the model's own op: no module prefix
    assert len({n.name for n in graph.node}) == len(graph.node)


WRAPPER = """
    // Topologically Sorted Source Nodes: [flatten, linear], Original ATen: [aten.view, aten.addmm]
    {
    KernelContextGuard _ctx("aoti_torch_cpu_addmm_out", R"(
File "model.py", line 9, in forward
    return self.lin(x)
)");
    }
    // Topologically Sorted Source Nodes: [gelu], Original ATen: [aten.gelu]
    {
    KernelContextGuard _ctx("cpp_fused_gelu_1", R"()");
    }
    if (buf27_scalar) {
        // subgraph: true_graph_0
        // Unsorted Source Nodes: [cond, add_17], Original ATen: [aten.addmm]
        {
        KernelContextGuard _ctx("aoti_torch_cpu_addmm_out", R"(
    File "block.py", line 3, in forward
        return F.linear(input, self.weight, self.bias)
)");
        }
    } else {
        // subgraph: false_graph_0
        // Unsorted Source Nodes: [cond, add_17], Original ATen: [aten.index_put]
        {
        KernelContextGuard _ctx("cpp_fused_index_put_2", R"()");
        }
    }
    // Topologically Sorted Source Nodes: [gelu_3], Original ATen: [aten.gelu]
    {
    KernelContextGuard _ctx("cpp_fused_gelu_1", R"()");
    }
"""


def test_wrapper_call_sites_in_source_order():
    sites = kernel_call_sites(WRAPPER)
    assert [(s.kernel, s.graph, s.sources) for s in sites] == [
        ("aoti_torch_cpu_addmm_out", "", ("flatten", "linear")), ("cpp_fused_gelu_1", "", ("gelu",)),
        ("aoti_torch_cpu_addmm_out", "true_graph_0", ("cond", "add_17")),
        ("cpp_fused_index_put_2", "false_graph_0", ("cond", "add_17")), ("cpp_fused_gelu_1", "", ("gelu_3",))]
    assert sites[0].stack == 'File "model.py", line 9, in forward\nreturn self.lin(x)'
    assert sites[2].stack == 'File "block.py", line 3, in forward\nreturn F.linear(input, self.weight, self.bias)'
    assert sites[1].stack == sites[3].stack == ""


@pytest.mark.parametrize("text", ["{", "{}", '[{"kernel": "k"}]', '[{"kernel": 1, "module": "m"}]', '["k"]'])
def test_damaged_call_site_maps_are_a_bundle_error(text):
    with pytest.raises(BundleError, match="not a kernel call-site map"):
        parse_module_map(text, "segments/step.aoti.modules.json")
    assert parse_module_map('[{"kernel": "k", "module": "m"}]', "x") == [{"kernel": "k", "module": "m"}]


def test_kernel_events_take_the_next_call_site_of_their_name():
    sites = [{"kernel": k, "module": m} for k, m in [("aoti_torch_cpu_addmm_out", "a.lin"), ("cpp_fused_gelu_1", "a.act"),
                                                     ("aoti_torch_cpu_addmm_out", "body.lin"), ("cpp_fused_index_put_2", "reuse"),
                                                     ("cpp_fused_gelu_1", "b.act")]]
    cursor = KernelCursor(sites)
    event = lambda name: SimpleNamespace(name=name)  # noqa: E731
    # the cond's true branch ran: its addmm is the second addmm, the false branch is skipped
    named = [cursor(event(n)) for n in ("aoti_torch_cpu_addmm_out", "graph_0_cpp_fused_gelu_1", "aten::copy_",
                                         "aoti_torch_cpu_addmm_out", "graph_0_cpp_fused_gelu_1")]
    assert named == ["a.lin", "a.act", None, "body.lin", "b.act"]
    cursor.reset()
    assert cursor(event("graph_0_cpp_fused_gelu_11")) is None  # another kernel, not a suffix match of gelu_1


def cached_reference_recipe(backend: str, steps: int = 8, kernel_profile: bool = False):
    data = load_recipe(ROOT / "recipes/reference.yaml").model_dump(mode="json")
    data["model"]["input"]["batch"] = {"min": 1, "max": 2}
    data["sampler"]["steps"] = steps
    data["lower"] = {"backend": backend, "kernel_profile": kernel_profile}
    data["passes"] = [{"name": "insert_cache", "params": {"policy": "first_blocks", "first": 1, "threshold": 1e6,
                                                          "max_reuse": 2, "warmup": 1, "final": 0}}]
    return parse_recipe(data)


def program_module_paths(bundle: Path) -> set[str]:
    ep = torch.export.load(str(next((bundle / "segments").glob("*.pt2"))))
    return {module_path(n) for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes}


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "cached_torch.vdopt"
    compile_bundle(cached_reference_recipe("torch"), TEACHER, path, verify=False)
    return path


def check_profile(profile, known_paths: set[str] | None = None):
    assert len(profile.steps) == 8
    for step in profile.steps:
        assert step.module_ms and 0 < step.attributed_ms <= step.ms
    paths = set(profile.module_ms_per_step(per_block=True))
    assert any(".transformer_blocks.0." in p for p in paths)
    if known_paths is not None:
        assert paths <= known_paths
    by_decision = profile.by_decision()
    assert sum(d["steps"] for d in by_decision.values()) == 8
    return by_decision


def test_cached_torch_bundle_profile(torch_bundle):
    session = Session(torch_bundle, profile=True)
    cond, uncond = session.prompt_encoder()(PROMPTS)
    profile = profile_bundle(session, cond, uncond)
    by_decision = check_profile(profile, program_module_paths(torch_bundle))
    assert set(by_decision) == {"recompute", "reuse"}  # every third step recomputes (max_reuse 2)
    # the cache's body modules run only on recomputing steps
    body = "denoiser.model.transformer_blocks.1.attn1"
    computed = [s.module_ms.get(body, 0.0) > 0 for s in profile.steps]
    assert computed == [s.decision != "reuse" for s in profile.steps]


def test_profile_command_writes_its_files(torch_bundle, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", str(torch_bundle), "--prompt", PROMPTS[0], "-o", str(out), "--top", "5"]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["backend"] == "torch" and len(report["steps"]) == 8
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    assert (out / "profile.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "sum over modules" in text and "transformer_blocks.*" in text


def test_nsys_missing_is_one_clear_error(torch_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nsys here
    assert main(["profile", str(torch_bundle), "--prompt", PROMPTS[0], "-o", str(tmp_path / "p"), "--nsys"]) == 2
    assert "nsys" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_compiled_backends_attribute_time_to_modules(backend, torch_bundle, tmp_path):
    path = tmp_path / f"cached_{backend}.vdopt"
    compile_bundle(cached_reference_recipe(backend, kernel_profile=True), TEACHER, path, verify=False)
    if backend == "aoti":
        assert kernel_records(path) > 0
    session = Session(path, profile=True)
    cond, uncond = session.prompt_encoder()(PROMPTS)
    profile = profile_bundle(session, cond, uncond)
    check_profile(profile, program_module_paths(torch_bundle))
    assert "matched" in profile.attribution or "ONNX Runtime" in profile.attribution
    assert session.manifest["segments"][0]["runtime"] == get_backend(backend).runtime
    if backend == "onnx":
        check_onnx_options(session.runner(session.manifest["segments"][0]).options, torch.get_num_threads())


def kernel_records(bundle: Path) -> int:
    """Profiler records in the AOTInductor packages' generated wrappers (one per recorded kernel call)."""
    count = 0
    for package in (bundle / "segments").glob("*.pt2"):
        with zipfile.ZipFile(package) as archive:
            count += sum(archive.read(name).decode().count("RAIIAtenRecordFunctionHandle")
                         for name in archive.namelist() if name.endswith("wrapper.cpp"))
    return count


@pytest.mark.parametrize("manifest, recorded", [
    ({"recipe": {"lower": {"kernel_profile": False}}}, False), ({"recipe": {"lower": {"kernel_profile": True}}}, True),
    ({"recipe": {"lower": {}}}, True), ({}, True), ({"recipe": "not a dict"}, True), ({"recipe": {"lower": 3}}, True)])
def test_kernel_records_are_read_from_the_manifest_without_trusting_its_shape(manifest, recorded):
    from vdopt.runtime.profile import has_kernel_records

    assert has_kernel_records(SimpleNamespace(manifest=manifest)) is recorded


def test_aoti_kernels_are_compiled_without_profiler_records_unless_asked(tmp_path, capsys):
    path = tmp_path / "plain_aoti.vdopt"
    compile_bundle(cached_reference_recipe("aoti", steps=2), TEACHER, path, verify=False)
    assert kernel_records(path) == 0
    session = Session(path, profile=True)
    profile = profile_bundle(session, *session.prompt_encoder()(PROMPTS))
    assert "without kernel records" in profile.attribution and "--kernel-profile" in profile.attribution
    assert all(not step.module_ms for step in profile.steps) and len(profile.steps) == 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cached_reference_recipe("aoti", steps=2).model_dump(mode="json")))
    assert main(["compile", str(recipe), str(TEACHER), "-o", str(tmp_path / "recorded.vdopt"), "--kernel-profile"]) == 0
    assert kernel_records(tmp_path / "recorded.vdopt") > 0
    assert Session(tmp_path / "recorded.vdopt").manifest["recipe"]["lower"]["kernel_profile"] is True


def check_onnx_options(options, threads: int):
    import onnxruntime as ort

    from vdopt.lower.onnx_backend import OnnxBackend

    recorded = OnnxBackend.runtime
    assert options.graph_optimization_level == getattr(ort.GraphOptimizationLevel, recorded["graph_optimization_level"])
    assert options.execution_mode == getattr(ort.ExecutionMode, recorded["execution_mode"])
    assert options.intra_op_num_threads == threads and options.inter_op_num_threads == recorded["inter_op_threads"]
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(recorded["allow_spinning"]))


def test_onnx_session_options_are_what_the_manifest_records():
    from vdopt.lower.onnx_backend import session_options

    check_onnx_options(session_options(3), 3)
