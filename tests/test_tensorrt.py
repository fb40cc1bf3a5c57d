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
