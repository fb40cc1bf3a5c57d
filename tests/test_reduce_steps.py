"""reduce_steps: distilled weights (full or LoRA), a new step table, and no guidance branch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from graph_compare import assert_op_changes, assert_rewrites_to, assert_same_graph
from vdopt.capture import capture
from vdopt.errors import PassError
from vdopt.pass_manager import PassManager
from vdopt.passes.reduce_steps import PASS, plain_module, reduce_steps, remove_guidance_graph
from vdopt.recipe import parse_recipe

aten = torch.ops.aten
WAN_INPUT = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7}
STUDENT_TIMESTEPS = [1000, 750, 500, 250]
PREFIX = "denoiser.model."


def wan_recipe(**sampler):
    return parse_recipe({"model": {"family": "wan", "input": WAN_INPUT}, "sampler": {"steps": 6, "guidance_scale": 5.0, **sampler}})


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return capture(wan_recipe(), None)


def base_state(program) -> dict[str, torch.Tensor]:
    """The diffusers state dict of the program's denoiser."""
    return {k.removeprefix(PREFIX): v.clone() for k, v in program.ep.state_dict.items() if k.startswith(PREFIX)}


def eager_model(program, state):
    model = program.descriptor.build(program.model_config)
    model.load_state_dict({**model.state_dict(), **state})
    return model.eval()


@pytest.fixture(scope="module")
def student_weights(teacher, tmp_path_factory):
    model = teacher.descriptor.build(teacher.model_config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("w") / "student.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


@pytest.fixture(scope="module")
def reduced(teacher, student_weights):
    return PassManager([(PASS, {"weights": str(student_weights[0]), "timesteps": STUDENT_TIMESTEPS})]).run(teacher)


def run_program(program, x, cond):
    module = program.ep.module()
    with torch.no_grad():
        for i in range(program.num_steps):
            x = module(x, torch.tensor(i), *cond)[0]
    return x


@torch.no_grad()
def eager_loop(model, x, cond, timesteps):
    """A plain diffusers loop, no CFG: Euler on sigma = t / 1000 down to 0."""
    sigmas = [t / 1000 for t in timesteps] + [0.0]
    for k, t in enumerate(timesteps):
        v = model(hidden_states=x, timestep=torch.tensor([float(t)] * x.shape[0]), encoder_hidden_states=cond, return_dict=False)[0]
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    return x


def ops(program, target):
    return [n for n in program.ep.graph.nodes if n.target is target]


def inputs_of(frames=3, height=8, width=12, seed=0, batch=1, channels=4, text=(7, 16)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, height, width, generator=generator), torch.randn(batch, *text, generator=generator)


# ----- before / after -------------------------------------------------------------------------

def test_before_after_graph(teacher, reduced):
    assert [s.name for s in teacher.inputs] == ["x", "i", "cond.encoder_hidden_states", "uncond.encoder_hidden_states"]
    assert [s.name for s in reduced.inputs] == ["x", "i", "cond.encoder_hidden_states"]
    assert teacher.guidance and not reduced.guidance
    assert teacher.num_steps == 6 and reduced.num_steps == 4
    assert reduced.step_table["timesteps"] == [1000.0, 750.0, 500.0, 250.0]
    assert reduced.step_table["sigmas"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert len(ops(teacher, aten.chunk.default)) >= 1 and any(len(n.args[0]) == 2 for n in ops(teacher, aten.cat.default))
    # no cat along the batch, no split of the prediction, and the patch embedding runs at batch 1
    assert not [n for n in ops(reduced, aten.cat.default) if n.meta["val"].dim() and (n.args[1] if len(n.args) > 1 else 0) == 0]
    assert all(n.args[0].meta["val"].shape[0] == 1 for n in ops(reduced, aten.conv3d.default))
    assert all(n.args[0].meta["val"].shape[0] == 2 for n in ops(teacher, aten.conv3d.default))
    assert reduced.recipe.sampler.steps == 4 and not reduced.recipe.sampler.uses_guidance
    record = reduced.passes[-1]
    assert record["name"] == "reduce_steps" and record["nodes_after"] < record["nodes_before"]


def test_the_guidance_batch_and_combination_are_gone_and_nothing_else(teacher, reduced):
    """The two batch-doubling cats, the split of the prediction into its halves (split_with_sizes and
    two getitems) and u + g * (c - u) go; every other op stays."""
    guidance = {"aten.cat.default": -2, "aten.split_with_sizes.default": -1, "getitem": -2,
                "aten.sub.Tensor": -1, "aten.mul.Tensor": -1, "aten.add.Tensor": -1}
    assert_op_changes(teacher, reduced, guidance)


def test_registered_doc_and_facts():
    assert "guidance" in PASS.doc and PASS.name == "reduce_steps"
    assert PASS.requires == ("uncached", "unpruned") and PASS.guarantees == ("step_table_in_graph", "guidance_matches_sampler")


# ----- numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("frames, height, width", [(3, 8, 12), (1, 4, 6)])
def test_matches_the_plain_diffusers_loop_with_the_new_weights(reduced, student_weights, frames, height, width):
    x, cond = inputs_of(frames, height, width, seed=frames)
    expected = eager_loop(student_weights[1], x, cond, STUDENT_TIMESTEPS)
    torch.testing.assert_close(run_program(reduced, x, (cond,)), expected, atol=1e-4, rtol=1e-4)


def test_steps_and_shift_follow_the_flow_match_schedule(teacher):
    from reference_loop import reference_sample

    program = reduce_steps(teacher, steps=3, shift=3.0)
    sampler = wan_recipe(steps=3, shift=3.0, guidance_scale=1.0).sampler
    assert program.num_steps == 3 and program.step_table["timesteps"][0] == 1000.0
    x, cond = inputs_of(seed=3)
    expected = reference_sample("wan", eager_model(teacher, base_state(teacher)), sampler, {"encoder_hidden_states": cond}, None, 3, x.shape)
    torch.testing.assert_close(run_program(program, torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), (cond,)),
                               expected, atol=1e-4, rtol=1e-4)


def random_lora(state, generator, rank=2):
    """A random peft-layout LoRA (diffusers names) over the attention and FFN linears, plus alphas."""
    lora = {}
    for key, weight in state.items():
        if weight.dim() == 2 and key.endswith(".weight") and ".blocks." in "." + key and ("attn" in key or "ffn" in key):
            module = key.removesuffix(".weight")
            lora[module] = (torch.randn(rank, weight.shape[1], generator=generator) * 0.3,
                            torch.randn(weight.shape[0], rank, generator=generator) * 0.3, 4.0)
    return lora


def merged(state, lora, scale):
    out = dict(state)
    for module, (down, up, alpha) in lora.items():
        out[module + ".weight"] = state[module + ".weight"] + scale * (alpha / down.shape[0]) * (up @ down)
    return out


WAN_ORIGINAL = [("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"), ("attn1.to_", "self_attn."),
                ("attn2.to_", "cross_attn."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")]


def original_wan_name(module: str) -> str:
    for new, old in WAN_ORIGINAL:
        module = module.replace(new, old)
    return module


def peft_layout(lora):
    out = {}
    for module, (down, up, alpha) in lora.items():
        out[f"transformer.{module}.lora_A.weight"], out[f"transformer.{module}.lora_B.weight"] = down, up
        out[f"transformer.{module}.alpha"] = torch.tensor(alpha)
    return out


def kohya_layout(lora):
    out = {}
    for k, (module, (down, up, alpha)) in enumerate(lora.items()):
        # half the modules in kohya form, half in the ComfyUI/LightX2V `diffusion_model.` form with original Wan names
        name = f"lora_unet_{module.replace('.', '_')}" if k % 2 else f"diffusion_model.{original_wan_name(module)}"
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"], out[f"{name}.alpha"] = down, up, torch.tensor(alpha)
    return out


@pytest.mark.parametrize("layout", [peft_layout, kohya_layout])
def test_lora_matches_the_merged_weights_eager_output(teacher, tmp_path, layout):
    generator = torch.Generator().manual_seed(11)
    base = base_state(teacher)
    lora = random_lora(base, generator)
    assert len(lora) == 2 * 10  # two blocks x (attn1 q k v o, attn2 q k v o, ffn in, ffn out)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in layout(lora).items()}, str(path))
    program = reduce_steps(teacher, weights=str(path), lora_scale=0.7, timesteps=STUDENT_TIMESTEPS)
    assert program.extras["reduce_steps_weights"]["kind"] == "lora" and program.extras["reduce_steps_weights"]["tensors"] == 20
    model = eager_model(teacher, merged(base, lora, 0.7))
    x, cond = inputs_of(seed=5)
    torch.testing.assert_close(run_program(program, x, (cond,)), eager_loop(model, x, cond, STUDENT_TIMESTEPS), atol=1e-4, rtol=1e-4)
    changed = program.ep.state_dict[PREFIX + "blocks.1.ffn.net.2.weight"] - base["blocks.1.ffn.net.2.weight"]
    assert changed.abs().max() > 1e-2  # the LoRA really changed the weights


@pytest.mark.slow
def test_latte_batch_two_with_a_flattened_frame_batch():
    """Latte folds the batch into the frame axis ([2B*F, tokens, D]) and back: the sizes are halved there."""
    recipe = parse_recipe({"model": {"family": "latte", "input": {"batch": 2, "frames": 4, "height": 8, "width": 8, "text_len": 3}},
                           "sampler": {"steps": 5}})
    program = capture(recipe, None)
    reduced = reduce_steps(program, timesteps=[1000, 500])
    assert [s.name for s in reduced.inputs] == ["x", "i", "cond.encoder_hidden_states"]
    from reference_loop import call_latte

    model = eager_model(program, base_state(program))
    x, cond = inputs_of(4, 8, 8, seed=2, batch=2, text=(3, 16))
    sigmas, expected = [1.0, 0.5, 0.0], x
    with torch.no_grad():
        for k, t in enumerate([1000.0, 500.0]):
            expected = expected + (sigmas[k + 1] - sigmas[k]) * call_latte(model, expected, torch.tensor([t, t]), {"encoder_hidden_states": cond})
    torch.testing.assert_close(run_program(reduced, x, (cond,)), expected, atol=1e-4, rtol=1e-4)


# ----- idempotence and negative cases ---------------------------------------------------------

def test_idempotent(reduced, student_weights):
    again = reduce_steps(reduced, weights=str(student_weights[0]), timesteps=STUDENT_TIMESTEPS)
    assert again is reduced


def test_without_guidance_removal_is_a_no_op(student_weights):
    program = capture(wan_recipe(guidance_scale=1.0), None)
    assert not program.guidance
    assert reduce_steps(program) is program
    reduced = reduce_steps(program, timesteps=STUDENT_TIMESTEPS)
    assert [s.name for s in reduced.inputs] == [s.name for s in program.inputs]
    assert_same_graph(reduced, program)  # only the table buffers changed
    assert reduced.ep.state_dict["timesteps"].tolist() == [float(t) for t in STUDENT_TIMESTEPS]


def test_keep_guidance_keeps_the_uncond_branch_and_a_lora_is_not_merged_twice(teacher, tmp_path):
    lora = random_lora(base_state(teacher), torch.Generator().manual_seed(3))
    path = tmp_path / "lora.safetensors"
    save_file(peft_layout(lora), str(path))
    once = reduce_steps(teacher, weights=str(path), timesteps=STUDENT_TIMESTEPS, keep_guidance=True)
    assert once.guidance and once.num_steps == 4 and len(once.inputs) == 4
    assert reduce_steps(once, weights=str(path), timesteps=STUDENT_TIMESTEPS, keep_guidance=True) is once


def test_lora_with_unknown_keys_is_a_clear_error(teacher, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_blocks_0_attn9_to_q.lora_down.weight": torch.zeros(2, 16),
               "lora_unet_blocks_0_attn9_to_q.lora_up.weight": torch.zeros(16, 2)}, str(path))
    with pytest.raises(PassError, match=r"match no parameter.*lora_unet_blocks_0_attn9_to_q"):
        reduce_steps(teacher, weights=str(path))


def test_state_dict_with_wrong_shapes_is_a_clear_error(teacher, tmp_path):
    state = base_state(teacher)
    state["blocks.0.attn1.to_q.weight"] = torch.zeros(8, 8)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(PassError, match=r"wrong shape.*blocks.0.attn1.to_q.weight \(8, 8\) vs \(16, 16\)"):
        reduce_steps(teacher, weights=str(path))


def test_bad_timesteps_are_refused(teacher):
    with pytest.raises(PassError, match="decreasing"):
        reduce_steps(teacher, timesteps=[250, 500])


def test_an_op_that_mixes_the_branches_is_refused():
    """A hand-built step whose 'denoiser' reduces over the batch: the pass names the node."""

    class Step(torch.nn.Module):
        def forward(self, x, i, c, u):
            h = torch.cat([x, x]) * torch.cat([c, u])
            h = h - h.mean(0, keepdim=True)  # mixes cond and uncond
            out_c, out_u = h.chunk(2)
            return (out_u + 3.0 * (out_c - out_u),)

    module = torch.export.export(Step(), (torch.randn(1, 4), torch.tensor(0), torch.randn(1, 4), torch.randn(1, 4))).module()
    with pytest.raises(PassError, match=r"reduces over the batch"):
        remove_guidance_graph(module, ["x", "i", "cond.c", "uncond.c"], 1)


def test_guidance_combination_is_replaced_by_the_prediction():
    """Before: a guided step with the batch size baked into its reshapes. Expected: the same step
    written by hand at batch 1, without uncond, split or combination."""

    class Guided(torch.nn.Module):
        def forward(self, x, i, c, u):
            h = torch.cat([x, x]).reshape(2, 2, 2) * torch.cat([c, u]).reshape(2, 2, 2)
            out_c, out_u = h.reshape(2, 4).chunk(2)
            return (x + 0.5 * (out_u + 3.0 * (out_c - out_u)),)

    class Unguided(torch.nn.Module):
        def forward(self, x, i, c):
            h = x.reshape(1, 2, 2) * c.reshape(1, 2, 2)
            return (x + 0.5 * h.reshape(1, 4),)

    def without_guidance(module):
        assert remove_guidance_graph(module, ["x", "i", "cond.c", "uncond.c"], 1)
        return plain_module(module)

    x, i, c, u = torch.randn(1, 4), torch.tensor(0), torch.randn(1, 4), torch.randn(1, 4)
    assert_rewrites_to(without_guidance, Guided(), Unguided(), (x, i, c, u), (x, i, c))
