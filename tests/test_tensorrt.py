"""TensorRT: what feeds the engine build is checked on the CPU; the build itself in the `tensorrt` tier."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

from vdopt.capture import capture
from vdopt.errors import LoweringError
from vdopt.lower import get_backend
from vdopt.lower.onnx_backend import export_onnx
from vdopt.lower.tensorrt_backend import build_settings, import_tensorrt
from vdopt.recipe import parse_recipe


def tensorrt_loads() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import_tensorrt()
    except LoweringError:
        return False
    return True


HAS_TENSORRT = tensorrt_loads()
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT libraries are not loadable on this machine (no GPU build)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(scope="module")
def wan_program():
    recipe = parse_recipe({"model": {"family": "wan", "input": {"frames": {"min": 1, "max": 8, "opt": 4}, "height": {"min": 3, "max": 16},
                                                                "width": 8, "text_len": 7}},
                           "sampler": {"steps": 2}, "lower": {"backend": "tensorrt"}})
    return capture(recipe, None)


def test_profiles_cover_the_recipe_ranges(wan_program):
    settings = build_settings(wan_program)
    low, opt, high = settings.profiles["x"]
    assert low == (1, 4, 1, 4, 8) and high == (1, 4, 8, 16, 8)  # height min 3 rounds up to the patch multiple, 2
    assert opt == tuple(wan_program.example_inputs[0].shape)
    assert settings.profiles["i"] == ((), (), ())
    assert settings.profiles["cond.encoder_hidden_states"] == ((1, 7, 16),) * 3
    assert settings.strongly_typed and settings.detailed_profiling and settings.timing_cache.name == "timing.cache"


def test_onnx_inputs_are_the_profile_names(wan_program, tmp_path):
    export_onnx(wan_program, tmp_path / "step.onnx")
    model = onnx.load(str(tmp_path / "step.onnx"))
    assert [i.name for i in model.graph.input] == list(build_settings(wan_program).profiles)
    assert model.opset_import[0].version >= 18


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message given where TensorRT is missing")
def test_clear_error_without_tensorrt(wan_program, tmp_path):
    with pytest.raises(LoweringError, match="TensorRT libraries"):
        get_backend("tensorrt").lower(wan_program, tmp_path, "step_0")


@pytest.mark.tensorrt
@needs_tensorrt
@needs_cuda
def test_engine_matches_onnx_runtime(wan_program, tmp_path):
    files = get_backend("tensorrt").lower(wan_program, tmp_path, "step_0")
    run = get_backend("tensorrt").load(tmp_path, files, "cuda")
    reference = get_backend("onnx").load(tmp_path, [f for f in files if f.endswith(".onnx")], "cpu")
    inputs = [t.clone() for t in wan_program.example_inputs]
    got = run(*[t.cuda() for t in inputs])[0].cpu()
    torch.testing.assert_close(got, reference(*inputs)[0], atol=1e-3, rtol=1e-3)


def test_lower_precision_is_refused_with_the_reason():
    from vdopt.errors import RecipeError

    with pytest.raises(RecipeError, match="model.dtype"):
        parse_recipe({"model": {"family": "wan"}, "lower": {"backend": "tensorrt", "precision": "fp16"}})


def test_an_engine_built_elsewhere_is_refused_by_name(monkeypatch):
    from vdopt.errors import BundleError
    from vdopt.lower import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "build_target",
                        lambda: {"tensorrt_version": "10.9.0", "compute_capability": "9.0", "device_name": "NVIDIA H200"})
    tensorrt_backend.check_build_target({"tensorrt_version": "10.9.0", "compute_capability": "9.0"}, "step_0.plan")
    with pytest.raises(BundleError, match=r"built for GPU compute capability 8.0, this machine has 9.0 \(NVIDIA H200\)"):
        tensorrt_backend.check_build_target({"tensorrt_version": "10.9.0", "compute_capability": "8.0"}, "step_0.plan")
    with pytest.raises(BundleError, match="built for TensorRT 10.8.0"):
        tensorrt_backend.check_build_target({"tensorrt_version": "10.8.0", "compute_capability": "9.0"}, "step_0.plan")
    with pytest.raises(BundleError, match="does not record"):
        tensorrt_backend.check_build_target(None, "step_0.plan")


def test_network_is_strongly_typed_where_tensorrt_has_the_flag():
    from types import SimpleNamespace

    from vdopt.lower.tensorrt_backend import BuildSettings, network_flags

    trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert network_flags(trt, BuildSettings(profiles={})) == 1 << 1
    assert network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace()), BuildSettings(profiles={})) == 0


CACHED = {"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.1, "forecast": 0.5, "ops": "fused"}}


def cached_fused_recipe(backend: str, split: str):
    return parse_recipe({"model": {"family": "wan", "input": {"frames": {"min": 1, "max": 8, "opt": 3}, "height": {"min": 4, "max": 16, "opt": 8},
                                                              "width": 8, "text_len": 7, "batch": {"min": 1, "max": 2}}},
                         "sampler": {"steps": 4}, "passes": [CACHED],
                         "lower": {"backend": backend, "split_conditionals": split}})


def test_polygraphy_runs_every_part_of_a_split_bundle_at_its_profile_shapes(tmp_path):
    """The Polygraphy check of the `tensorrt` tier, ONNX Runtime half: every part file with plugin nodes, at the
    opt and max shapes the manifest records for its engine."""
    import subprocess

    from vdopt.compiler import compile_bundle
    from vdopt.lower.tensorrt_backend import onnx_files_with_profiles, onnx_io_names, polygraphy_command

    torch.manual_seed(0)
    manifest = compile_bundle(cached_fused_recipe("onnx", "always"), None, tmp_path / "b.vdopt")
    checks = onnx_files_with_profiles(tmp_path / "b.vdopt", manifest)
    assert [path.name for path, _ in checks] == ["step_0.head.onnx", "step_0.compute.onnx", "step_0.reuse.onnx", "step_0.tail.onnx"]
    for part in manifest["segments"][0]["parts"]:  # the names the C++ runtime binds an engine by (engine_binding)
        inputs = [s["name"] for s in part["inputs"]]
        outputs = [f"{s['name']}.next" if s["name"] in inputs else s["name"] for s in part["outputs"]]
        onnx_file = next(f for f in part["files"] if f.endswith(".onnx"))
        assert onnx_io_names(tmp_path / "b.vdopt" / onnx_file) == (inputs, outputs)
    head_profile = checks[0][1]
    assert head_profile["x"] == [[1, 4, 1, 4, 8], [2, 4, 3, 8, 8], [2, 4, 8, 16, 8]]  # opt: the traced example
    for path, profile in checks:
        for at in (1, 2):
            result = subprocess.run(polygraphy_command(path, profile, runners=("--onnxrt",), at=at), capture_output=True, text=True)
            assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr, (path, result.stdout[-1500:], result.stderr[-1500:])


def test_polygraphy_command_carries_the_engine_profile(tmp_path):
    from vdopt.lower.tensorrt_backend import polygraphy_command

    command = polygraphy_command(tmp_path / "p.onnx", {"x": [[1, 4], [2, 4], [3, 4]], "i": [[], [], []]})
    assert command[command.index("--trt-min-shapes") + 1: command.index("--trt-min-shapes") + 3] == ["x:[1,4]", "i:[]"]
    assert command[command.index("--trt-max-shapes") + 1] == "x:[3,4]" and "--trt" in command and "--onnxrt" in command
    assert command[command.index("--input-shapes") + 1] == "x:[2,4]"


@pytest.mark.tensorrt
@needs_tensorrt
@needs_cuda
@pytest.mark.parametrize("split", ["never", "always"])
def test_every_engine_matches_onnx_runtime_under_polygraphy(split, tmp_path):
    """Each segment and each part of a split step, built with vdopt's plugins, against ONNX Runtime on the same file."""
    import subprocess

    from vdopt.compiler import compile_bundle
    from vdopt.lower.tensorrt_backend import onnx_files_with_profiles, polygraphy_command

    torch.manual_seed(0)
    manifest = compile_bundle(cached_fused_recipe("tensorrt", split), None, tmp_path / "b.vdopt")
    assert all(segment["build"]["compute_capability"] for segment in manifest["segments"])
    for path, profile in onnx_files_with_profiles(tmp_path / "b.vdopt", manifest):
        for at in (0, 1, 2):
            result = subprocess.run(polygraphy_command(path, profile, at=at), capture_output=True, text=True)
            assert result.returncode == 0, (path, result.stdout[-2000:], result.stderr[-2000:])


@pytest.mark.tensorrt
@needs_tensorrt
@needs_cuda
def test_fused_tensorrt_bundle_matches_the_torch_bundle(tmp_path):
    from vdopt.compiler import compile_bundle
    from vdopt.runtime import Session

    clips = {}
    for backend in ("torch", "tensorrt"):
        torch.manual_seed(0)
        compile_bundle(cached_fused_recipe(backend, "auto"), None, tmp_path / f"{backend}.vdopt")
        text = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
        device = "cuda" if backend == "tensorrt" else "cpu"
        clips[backend] = Session(tmp_path / f"{backend}.vdopt", device=device).run(
            {"encoder_hidden_states": text.to(device)}, seed=1, frames=3, height=8, width=8, progress=False).cpu()
    torch.testing.assert_close(clips["tensorrt"], clips["torch"], atol=1e-3, rtol=1e-3)
