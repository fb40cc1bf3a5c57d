"""Pass manager, recipe schema, bundle manifest, inspect and run outputs, on the tiny Wan."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vdopt.capture import capture
from vdopt.cli import main as vdopt_main
from vdopt.errors import PassError
from vdopt.pass_manager import Pass, PassManager, register_fact, rewrite_graph
from vdopt.recipe import parse_recipe, recipe_schema

RECIPE = {"model": {"family": "wan", "input": {"frames": {"min": 1, "max": 4}, "height": 8, "width": 8, "text_len": 7}},
          "sampler": {"steps": 2}, "lower": {"backend": "torch"}}


@pytest.fixture(scope="module")
def program():
    return capture(parse_recipe(RECIPE), None)


def negate_output(program):
    """A test pass: flips the sign of x_next, through the same rewrite path real passes use."""

    def rewrite(module):
        output = next(n for n in module.graph.nodes if n.op == "output")
        value = output.args[0][0]
        with module.graph.inserting_before(output):
            negated = module.graph.call_function(torch.ops.aten.neg.default, (value,))
        output.args = ((negated, *output.args[0][1:]),)
        return True

    return rewrite_graph(program, rewrite)


@register_fact("x_next_negated", "the step returns a negated x_next (a test fact)")
def x_next_negated(program):
    output = next(n for n in program.ep.graph.nodes if n.op == "output")
    return output.args[0][0].target is torch.ops.aten.neg.default


NEGATE = Pass("negate_output", negate_output, "test pass", requires=("guidance",), guarantees=("x_next_negated",))


def test_pass_manager_records_dumps_and_checks(program, tmp_path):
    result = PassManager([(NEGATE, {})], dump_ir=tmp_path / "ir").run(program)
    assert [r["name"] for r in result.passes] == ["negate_output"]
    record = result.passes[0]
    assert record["seconds"] > 0 and record["nodes_after"] == record["nodes_before"] + 1
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["000_captured.txt", "001_negate_output.txt"]
    assert "aten.neg" in (tmp_path / "ir" / "001_negate_output.txt").read_text()
    inputs = [t.clone() for t in program.example_inputs]
    torch.testing.assert_close(result.module()(*inputs)[0], -program.module()(*inputs)[0])


def test_pass_requirements_are_enforced(program):
    unguided = capture(parse_recipe({**RECIPE, "sampler": {"steps": 2, "guidance_scale": 1.0}}), None)
    with pytest.raises(PassError, match="requires guidance"):
        PassManager([(NEGATE, {})]).run(unguided)


def test_schema_lists_sections(tmp_path, capsys):
    schema = recipe_schema()
    assert set(schema["properties"]) == {"model", "sampler", "passes", "lower", "verify", "measured"}
    assert vdopt_main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    assert json.loads((tmp_path / "schema.json").read_text())["title"] == "Recipe"


def test_manifest_inspect_and_outputs(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    bundle = tmp_path / "w.vdopt"
    assert vdopt_main(["compile", str(recipe), "-o", str(bundle), "--dump-ir", str(tmp_path / "ir")]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 3 and manifest["family"] == "wan"
    assert [s["name"] for s in manifest["inputs"]] == ["x", "i", "cond.encoder_hidden_states", "uncond.encoder_hidden_states"]
    assert manifest["inputs"][0]["shape"][2] == "frames"
    assert set(manifest["checksums"]) == {"segments/step_0.pt2"}
    assert len(manifest["step_table"]["sigmas"]) == manifest["num_steps"] + 1 == 3
    assert manifest["recipe"]["sampler"]["steps"] == 2
    assert (tmp_path / "ir" / "000_captured.txt").exists()

    capsys.readouterr()
    assert vdopt_main(["inspect", str(bundle), "--graph"]) == 0
    shown = capsys.readouterr().out
    for expected in ("family: wan", "parameters:", "pass fold_guidance_batch", "cond.encoder_hidden_states", "matching families: wan"):
        assert expected in shown

    cond = tmp_path / "cond.safetensors"
    save_file({"encoder_hidden_states": torch.randn(1, 7, 16)}, str(cond))
    for name in ("v.pt", "v.safetensors", "v.gif"):
        assert vdopt_main(["run", str(bundle), "--cond", str(cond), "--frames", "3", "--quiet", "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 0
    assert torch.load(tmp_path / "v.pt").shape == (1, 4, 3, 8, 8)


def test_same_seed_same_video_different_seed_different(tmp_path):
    from vdopt.compiler import compile_bundle
    from vdopt.runtime import Session

    bundle = tmp_path / "w.vdopt"
    compile_bundle(parse_recipe(RECIPE), None, bundle)
    session = Session(bundle)
    cond = {"encoder_hidden_states": torch.randn(1, 7, 16)}
    first, again, other = (session.run(cond, seed=s, progress=False) for s in (1, 1, 2))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)
