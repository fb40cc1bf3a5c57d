"""fuse_norm_modulate: before/expected graphs, idempotence, the negative case, purity, and numerics against the
unfused program on every CPU backend; the op's CPU kernel and ONNX function against its decomposition."""

from __future__ import annotations

import json
import zipfile

import onnx
import pytest
import torch

from test_custom_ops import assert_same, one_node_model, run_onnx
from test_prune_temporal import TEACHER, teacher, teacher_recipe  # noqa: F401 - teacher is a fixture
from vdopt.capture import capture
from vdopt.compiler import compile_bundle
from vdopt.pass_manager import PassManager
from vdopt.passes import check_order, load_pass
from vdopt.ops import decompositions, onnx as onnx_ops
from vdopt.recipe import parse_recipe, recipe_with
from vdopt.reference.model import load_reference
from vdopt.runtime.session import Session

FUSE = load_pass("fuse_norm_modulate")
BACKENDS = ["torch", "onnx", pytest.param("aoti", marks=pytest.mark.slow)]
aten = torch.ops.aten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, modulation", [((4, 9, 64), (4, 1, 64)), ((4, 9, 64), (1, 1, 64)), ((4, 9, 64), (4, 9, 64)),
                                               ((1, 1, 8), (1, 1, 8)), ((0, 3, 8), (0, 1, 8)), ((2, 5, 1), (2, 1, 1))],
                         ids=["per_row", "shared", "per_token", "one_line", "empty_batch", "width_one"])
def test_layer_norm_modulate_cpu_kernel_equals_its_decomposition(dtype, shape, modulation):
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=generator) + 1).to(dtype)
    scale, shift = (torch.randn(modulation, generator=generator).to(dtype) for _ in range(2))
    assert_same([torch.ops.vdopt.layer_norm_modulate(x, scale, shift, 1e-6)],
                [decompositions.layer_norm_modulate(x, scale, shift, 1e-6)])


def test_layer_norm_modulate_refuses_modulation_that_does_not_broadcast():
    x = torch.zeros(4, 9, 8)
    with pytest.raises(RuntimeError, match="vdopt::layer_norm_modulate"):
        torch.ops.vdopt.layer_norm_modulate(x, torch.zeros(2, 1, 8), torch.zeros(4, 1, 8), 1e-6)
    with pytest.raises(RuntimeError, match="vdopt::layer_norm_modulate"):
        torch.ops.vdopt.layer_norm_modulate(x, torch.zeros(4, 1, 8, dtype=torch.float64), torch.zeros(4, 1, 8), 1e-6)


def test_onnx_function_of_layer_norm_modulate_equals_the_decomposition():
    generator = torch.Generator().manual_seed(0)
    tensors = (torch.randn(4, 9, 16, generator=generator), torch.randn(4, 1, 16, generator=generator),
               torch.randn(4, 1, 16, generator=generator))
    model = one_node_model("layer_norm_modulate", tensors, {"eps": 1e-6})
    assert_same(run_onnx(model, tensors), [decompositions.layer_norm_modulate(*tensors, 1e-6)], tol=1e-5)



def count(program, target) -> int:
    return sum(1 for node in program.ep.graph.nodes if node.target is target)


def test_every_modulated_norm_becomes_one_node(teacher):
    """The teacher's 8 blocks have a modulated norm1 and norm2 each, and its output norm is modulated: 17."""
    fused = PassManager([(FUSE, {})]).run(teacher)
    assert count(teacher, aten.layer_norm.default) == 17 and count(teacher, torch.ops.vdopt.layer_norm_modulate.default) == 0
    assert count(fused, aten.layer_norm.default) == 0 and count(fused, torch.ops.vdopt.layer_norm_modulate.default) == 17
    assert fused.extras["fused_norm_modulate"] == 17
    ops = sum(1 for n in teacher.ep.graph.nodes if n.op == "call_function")
    assert sum(1 for n in fused.ep.graph.nodes if n.op == "call_function") == ops - 17 * 3  # norm, mul, add -> one op
    stacks = [list(n.meta["nn_module_stack"].values())[-1][0] for n in fused.ep.graph.nodes
              if n.target is torch.ops.vdopt.layer_norm_modulate.default]
    assert stacks[:2] == ["denoiser.model.transformer_blocks.0.norm1", "denoiser.model.transformer_blocks.0.norm2"]
    assert stacks[-1] == "denoiser.model.norm_out"


def test_fusing_again_changes_nothing(teacher):
    once = FUSE.run(teacher)
    assert FUSE.run(once) is once


def test_the_input_program_is_untouched(teacher):
    graph = teacher.ep.graph_module.print_readable(print_output=False)
    FUSE.run(teacher)
    assert teacher.ep.graph_module.print_readable(print_output=False) == graph and "fused_norm_modulate" not in teacher.extras


def test_a_model_without_the_chain_is_unchanged():
    """Wan normalises in float32 and casts back between the norm and the modulate: not this chain."""
    wan = capture(parse_recipe({"model": {"family": "wan", "input": {"frames": 3, "height": 8, "width": 8, "text_len": 7}},
                                "sampler": {"steps": 2}}), None)
    assert FUSE.run(wan) is wan


def test_the_pass_runs_before_the_cache():
    check_order(["fuse_norm_modulate", "insert_cache"])
    with pytest.raises(Exception, match="fuse_norm_modulate must come before insert_cache"):
        check_order(["insert_cache", "fuse_norm_modulate"])


def test_the_fused_step_equals_the_unfused_step(teacher):
    fused = FUSE.run(teacher)
    for a, b in zip(teacher.module()(*teacher.example_inputs), fused.module()(*teacher.example_inputs)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


TOLERANCE = {"torch": 1e-5, "aoti": 1e-5, "onnx": 1e-5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_cached_teacher_bundle_matches_the_unfused_one(backend, tmp_path):
    """The same recipe without the pass on the same backend is the reference. With a static cache, so the fused
    norms of the cached body run inside the conditional's branch."""
    passes = [("insert_cache", {"policy": "static", "interval": 2})]
    manifest = compile_bundle(recipe_with(teacher_recipe(4), [("fuse_norm_modulate", {}), *passes], backend=backend), TEACHER,
                              tmp_path / "fused", verify=False)
    compile_bundle(recipe_with(teacher_recipe(4), passes, backend=backend), TEACHER, tmp_path / "unfused", verify=False)
    assert manifest["custom_ops"] == ["vdopt::layer_norm_modulate"] and manifest["cache"]["policy"] == "static"
    if backend == "onnx":
        model = onnx.load(str(tmp_path / "fused" / manifest["segments"][0]["files"][0]))
        assert sum(n.op_type == "layer_norm_modulate" for n in onnx_ops.plugin_nodes(model.graph)) == 17
    if backend == "aoti":
        with zipfile.ZipFile(tmp_path / "fused" / manifest["segments"][0]["files"][0]) as package:
            wrapper = next(n for n in package.namelist() if n.endswith("wrapper.json"))
            targets = [node["node"]["target"] for node in json.loads(package.read(wrapper))["nodes"]]
        assert targets.count("vdopt::layer_norm_modulate") == 17
    _, conditioner = load_reference()
    with torch.no_grad():
        cond = {"encoder_hidden_states": conditioner.encode(["blue square moving down-left"])}
        uncond = {"encoder_hidden_states": conditioner.null(1).contiguous()}
    got = Session(tmp_path / "fused").run(cond, uncond, seed=4, progress=False)
    expected = Session(tmp_path / "unfused").run(cond, uncond, seed=4, progress=False)
    torch.testing.assert_close(got, expected, atol=TOLERANCE[backend], rtol=0)
