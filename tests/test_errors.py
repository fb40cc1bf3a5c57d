"""Bad input gives a one-paragraph message and a non-zero exit, never a traceback or a partial bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vdopt.capture import with_suggested_fixes
from vdopt.cli import main as vdopt_main
from vdopt.compiler import compile_bundle
from vdopt.families import descriptor_for
from vdopt.families.base import KeywordDenoiser
from vdopt.recipe import parse_recipe
from vdopt.runtime.session import Session

WAN_INPUT = {"frames": {"min": 1, "max": 4}, "height": {"min": 4, "max": 8}, "width": {"min": 4, "max": 8}, "text_len": 7}


def write_recipe(path: Path, **overrides) -> Path:
    data = {"model": {"family": "wan", "input": WAN_INPUT}, "sampler": {"steps": 2}, "lower": {"backend": "torch"}}
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(capsys, argv: list[str]) -> str:
    code = vdopt_main(argv)
    captured = capsys.readouterr()
    assert code != 0, "a bad input must exit non-zero"
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("vdopt ") and ": error: " in line]
    assert len(errors) == 1, f"expected one error paragraph, got: {captured.err!r}"
    return errors[0]


def assert_no_bundle_left(output: Path) -> None:
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], "a staging directory was left behind"


@pytest.fixture(scope="module")
def wan_bundle(tmp_path_factory, wan_checkpoint) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    recipe = write_recipe(directory / "recipe.yaml")
    bundle = directory / "wan.vdopt"
    assert vdopt_main(["compile", str(recipe), str(wan_checkpoint), "-o", str(bundle)]) == 0
    cond = directory / "cond.safetensors"
    save_file({"cond.encoder_hidden_states": torch.randn(1, 7, 16)}, str(cond))
    return bundle


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", lower__optimise="yes")
    message = run_cli(capsys, ["compile", str(recipe), "-o", str(tmp_path / "out.vdopt")])
    assert "r.yaml" in message and "unknown key 'lower.optimise'" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")


def test_wrong_type(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", sampler__steps="fifty")
    message = run_cli(capsys, ["compile", str(recipe), "-o", str(tmp_path / "out.vdopt")])
    assert "'sampler.steps'" in message and "integer" in message and "fifty" in message


def test_missing_checkpoint(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    message = run_cli(capsys, ["compile", str(recipe), str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "out.vdopt")])
    assert "nope.safetensors" in message and "not found" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")


def test_checkpoint_that_does_not_fit(tmp_path, capsys, wan_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", model__config={**descriptor_for("wan").tiny_config, "num_layers": 3, "ffn_dim": 48})
    message = run_cli(capsys, ["compile", str(recipe), str(wan_checkpoint), "-o", str(tmp_path / "out.vdopt")])
    assert "does not fit" in message and "missing (first: blocks.2." in message and "wrong shape" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")


def test_pickled_module_needs_trust(tmp_path, capsys):
    model = descriptor_for("wan").build(dict(descriptor_for("wan").tiny_config))
    pickled = tmp_path / "model.pt"
    torch.save(model, pickled)
    for layout in ("pickled_module", "state_dict"):
        recipe = write_recipe(tmp_path / f"{layout}.yaml", model__layout=layout)
        message = run_cli(capsys, ["compile", str(recipe), str(pickled), "-o", str(tmp_path / "out.vdopt")])
        assert "--trust-pickle" in message
        assert_no_bundle_left(tmp_path / "out.vdopt")
    recipe = write_recipe(tmp_path / "trusted.yaml", model__layout="pickled_module")
    assert vdopt_main(["compile", str(recipe), str(pickled), "-o", str(tmp_path / "ok.vdopt"), "--trust-pickle"]) == 0


@pytest.mark.parametrize("damage", ["truncate_segment", "edit_segment", "truncate_manifest", "delete_segment"])
def test_damaged_bundle(tmp_path, capsys, wan_bundle, damage):
    import shutil

    bundle = tmp_path / "copy.vdopt"
    shutil.copytree(wan_bundle, bundle)
    segment = bundle / json.loads((bundle / "manifest.json").read_text())["segments"][0]["files"][0]
    if damage == "truncate_segment":
        segment.write_bytes(segment.read_bytes()[:-100])
    elif damage == "edit_segment":
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0xFF
        segment.write_bytes(bytes(data))
    elif damage == "truncate_manifest":
        manifest = bundle / "manifest.json"
        manifest.write_text(manifest.read_text()[:200])
    else:
        segment.unlink()
    cond = wan_bundle.parent / "cond.safetensors"
    message = run_cli(capsys, ["run", str(bundle), "--cond", str(cond), "-o", str(tmp_path / "v.pt")])
    assert ("checksum" in message) or ("damaged" in message)
    assert not (tmp_path / "v.pt").exists()


def test_wrong_input_shape_at_run_time(tmp_path, capsys, wan_bundle):
    cond = wan_bundle.parent / "cond.safetensors"
    message = run_cli(capsys, ["run", str(wan_bundle), "--cond", str(cond), "--frames", "9", "-o", str(tmp_path / "v.pt")])
    assert "frames" in message and "1..4" in message
    message = run_cli(capsys, ["run", str(wan_bundle), "--cond", str(cond), "--height", "5", "-o", str(tmp_path / "v.pt")])
    assert "multiple of 2" in message
    bad = tmp_path / "bad.safetensors"
    save_file({"cond.encoder_hidden_states": torch.randn(1, 9, 16)}, str(bad))
    message = run_cli(capsys, ["run", str(wan_bundle), "--cond", str(bad), "-o", str(tmp_path / "v.pt")])
    assert "[1, 9, 16]" in message and "[1, 7, 16]" in message


@torch.library.custom_op("vdopt_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class MysteryWan(torch.nn.Module):
    """A user's denoiser with an op ONNX has no translation for, in its output projection."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = MysteryHead()

    def forward(self, x, t, encoder_hidden_states):
        return self.head(self.model(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0])


class MysteryHead(torch.nn.Module):
    def forward(self, x):
        return mystery(x)


def test_op_a_backend_cannot_lower(tmp_path, capsys):
    descriptor = descriptor_for("wan")
    user = MysteryWan(descriptor.build(dict(descriptor.tiny_config))).eval()
    example = (torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 16))
    program = tmp_path / "user.pt2"
    torch.export.save(torch.export.export(user, example), str(program))
    recipe = write_recipe(tmp_path / "r.yaml", model__layout="exported_program",
                          model__input={"frames": 2, "height": 8, "width": 8, "text_len": 7},
                          sampler={"steps": 2, "guidance_scale": 1.0}, lower={"backend": "onnx"})
    message = run_cli(capsys, ["compile", str(recipe), str(program), "-o", str(tmp_path / "out.vdopt")])
    assert "vdopt_test.mystery" in message and "MysteryHead" in message and "onnx" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")


def test_bare_program_without_known_structure(tmp_path, capsys):
    plain = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1))

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain

        def forward(self, x, t, encoder_hidden_states):
            return self.net(x) + t.reshape(-1, 1, 1, 1, 1) * 0 + encoder_hidden_states.mean() * 0

    program = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(Denoiser(), (torch.randn(1, 4, 2, 8, 8), torch.tensor([1.0]), torch.randn(1, 7, 16))), str(program))
    recipe = write_recipe(tmp_path / "r.yaml", model__layout="exported_program",
                          model__input={"frames": 2, "height": 8, "width": 8, "text_len": 7}, sampler={"steps": 2, "guidance_scale": 1.0})
    message = run_cli(capsys, ["compile", str(recipe), str(program), "-o", str(tmp_path / "out.vdopt")])
    assert "no wan transformer blocks" in message and "Conv3d" in message and "vdopt inspect --graph" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")


def exported_wan(tmp_path, batch: int, dynamic: bool) -> Path:
    descriptor = descriptor_for("wan")
    denoiser = descriptor.adapter(descriptor.build(dict(descriptor.tiny_config))).eval()
    example = (torch.randn(batch, 4, 2, 8, 8), torch.full((batch,), 500.0), torch.randn(batch, 7, 16))
    shapes = None
    if dynamic:
        rows = torch.export.Dim("batch", min=1, max=8)
        shapes = ({0: rows}, {0: rows}, ({0: rows},))  # the adapter takes the conditioning as *cond
    program = tmp_path / "user.pt2"
    torch.export.save(torch.export.export(denoiser, example, dynamic_shapes=shapes), str(program))
    return program


def test_a_bare_program_with_a_static_batch_says_to_export_a_dynamic_one(tmp_path, capsys):
    """Regression: a batch-1 static export failed deep in the trace with `Guard failed: x.size()[0] == 1`."""
    program = exported_wan(tmp_path, batch=1, dynamic=False)
    recipe = write_recipe(tmp_path / "r.yaml", model__layout="exported_program",
                          model__input={"frames": 2, "height": 8, "width": 8, "text_len": 7}, sampler={"steps": 2})
    message = run_cli(capsys, ["compile", str(recipe), str(program), "-o", str(tmp_path / "out.vdopt")])
    assert "exported with a static batch of 1" in message and "guidance doubles the rows" in message
    assert "Dim on dim 0 of x and on dim 0 of t and every conditioning input" in message
    assert_no_bundle_left(tmp_path / "out.vdopt")
    dynamic = exported_wan(tmp_path, batch=2, dynamic=True)
    assert vdopt_main(["compile", str(recipe), str(dynamic), "-o", str(tmp_path / "out.vdopt")]) == 0


def test_a_bare_program_exported_with_every_dim_dynamic_is_cached_like_its_checkpoint(tmp_path):
    """Regression: a user's program exported with `Dim.AUTO` on every dim (text length too, a symbol the step
    does not name) gave cached state sizes the manifest could not express (`size 's53' names ['s53'], which are
    not latent dims`). CogVideoX attends over text and video tokens jointly, so its cached residual spans both."""
    descriptor = descriptor_for("cogvideox")
    config = dict(descriptor.tiny_config)
    torch.manual_seed(0)
    model = descriptor.build(config).eval()
    checkpoint = tmp_path / "cogvideox.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    example = (torch.randn(2, 4, 3, 8, 8), torch.full((2,), 500.0), torch.randn(2, 7, 16))
    every_dim = tuple({axis: torch.export.Dim.AUTO for axis in range(value.dim())} for value in example)
    program = tmp_path / "user.pt2"
    torch.export.save(torch.export.export(descriptor.adapter(model), example, dynamic_shapes=every_dim), str(program))
    sizes = {"batch": {"min": 1, "max": 3}, "frames": 3, "height": {"min": 8, "max": 16}, "width": 8, "text_len": 7}
    cache = [{"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.05}}]
    base = {"model": {"family": "cogvideox", "input": sizes}, "sampler": {"steps": 4}, "passes": cache}
    compile_bundle(parse_recipe(base), checkpoint, tmp_path / "from_checkpoint")
    compile_bundle(parse_recipe({**base, "model": {**base["model"], "layout": "exported_program"}}), program,
                   tmp_path / "from_program")
    manifest = json.loads((tmp_path / "from_program" / "manifest.json").read_text())
    state = {spec["name"]: spec["shape"] for spec in manifest["inputs"] if spec["name"].startswith("state.")}
    assert state["state.cache.0"] == ["2*batch", "12*height_units", 16], state
    cond = {"encoder_hidden_states": torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))}
    for height in (8, 16):
        expected = Session(tmp_path / "from_checkpoint").run(cond, seed=1, height=height, progress=False)
        got = Session(tmp_path / "from_program").run(cond, seed=1, height=height, progress=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_export_retry_keeps_the_conditioning_specs_of_a_step_taking_conds():
    """Regression: the retry with export's suggested relations crashed on the step's `*conds` argument (a tuple of
    specs) with `TypeError: cannot convert dictionary update sequence element #0 to a sequence`, hiding the real
    export error."""
    frames = torch.export.Dim("frames", min=1, max=4)
    conds = ({0: torch.export.Dim.AUTO},)
    shapes = {"x": {2: frames}, "i": None, "conds": conds, "state_cache_0": {1: torch.export.Dim.AUTO}}
    message = "Constraints violated\nSuggested fixes:\n  L['state_cache_0'].size()[1] = 16*frames\n  L['i'].size()[0] = 3"
    fixed = with_suggested_fixes(message, shapes, {2: (frames, 1)})
    assert fixed["conds"] == conds and fixed["i"] is None and fixed["x"] == {2: frames}
    assert str(fixed["state_cache_0"][1]) == str(frames * 16)
    assert shapes["state_cache_0"] == {1: torch.export.Dim.AUTO}, "the caller's specs are not edited"


def test_a_bare_program_taking_other_inputs_names_the_call(tmp_path, capsys):
    class TwoInputs(torch.nn.Module):
        def forward(self, x, t):
            return x * t.reshape(-1, 1, 1, 1, 1)

    program = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(TwoInputs(), (torch.randn(2, 4, 2, 8, 8), torch.ones(2))), str(program))
    recipe = write_recipe(tmp_path / "r.yaml", model__layout="exported_program",
                          model__input={"frames": 2, "height": 8, "width": 8, "text_len": 7}, sampler={"steps": 2})
    message = run_cli(capsys, ["compile", str(recipe), str(program), "-o", str(tmp_path / "out.vdopt")])
    assert "takes 2 inputs; the wan step calls it as (x, t, encoder_hidden_states)" in message


class ModeFromData(torch.nn.Module):
    """A model whose mode flag is computed from an input tensor: torch.export cannot hold the branch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, encoder_hidden_states):
        if encoder_hidden_states.abs().sum() > 0:  # the data-dependent branch
            return self.model(x, t, encoder_hidden_states)
        return x


def test_a_data_dependent_branch_points_to_the_guide(tmp_path, capsys, monkeypatch):
    """Regression: a model branching on data failed with torch.export's message alone, no way forward."""
    descriptor = descriptor_for("wan")
    monkeypatch.setattr(type(descriptor), "adapter", lambda self, model: ModeFromData(KeywordDenoiser(model, ("encoder_hidden_states",))))
    recipe = write_recipe(tmp_path / "r.yaml", model__input={"frames": 2, "height": 8, "width": 8, "text_len": 7},
                          sampler={"steps": 2})
    message = run_cli(capsys, ["compile", str(recipe), "-o", str(tmp_path / "out.vdopt")])
    assert "branches on the value of a tensor at test_errors.py:" in message
    assert "docs/export_troubleshooting.md" in message
    assert (Path(__file__).parents[1] / "docs" / "export_troubleshooting.md").is_file()


def test_inspect_graph_names_families_whose_time_embedding_is_missing(tmp_path, capsys):
    """Regression: families were suggested by the block regex alone, and teacache then failed on them."""
    class NoTimeEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    program = tmp_path / "p.pt2"
    torch.export.save(torch.export.export(NoTimeEmbedding(), (torch.randn(2, 8),)), str(program))
    assert vdopt_main(["inspect", str(program), "--graph"]) == 0
    out = capsys.readouterr().out
    assert "matching families: none" in out
    assert "wan: no time embedding matching 'condition_embedder\\.time_embedder' (teacache needs it)" in out


def test_inspect_graph_says_what_a_program_must_change_for_each_matching_family(tmp_path, capsys):
    """`vdopt inspect --graph` checks a bare program against each matching family's step call: inputs, a dynamic
    batch, static latent dims."""
    static = exported_wan(tmp_path, batch=1, dynamic=False)
    assert vdopt_main(["inspect", str(static), "--graph"]) == 0
    out = capsys.readouterr().out
    assert "inputs: x [1, 4, 2, 8, 8], t [1], cond_0 [1, 7, 16]" in out
    assert ("wan (2 blocks, time embedding model.condition_embedder.time_embedder; to change: a static batch: guidance "
            "doubles the rows") in out
    assert "static frames, height, width (2, 8, 8)" in out
    assert "wan_i2v (2 blocks, time embedding model.condition_embedder.time_embedder; to change: takes 3 inputs, the step calls (x, t, encoder_hidden_states, condition, encoder_hidden_states_image)" in out
    dynamic = exported_wan(tmp_path, batch=2, dynamic=True)
    assert vdopt_main(["inspect", str(dynamic), "--graph"]) == 0
    out = capsys.readouterr().out
    assert "inputs: x [dyn, 4, 2, 8, 8]" in out and "to change: static frames, height, width (2, 8, 8)" in out
    assert "a static batch" not in out
