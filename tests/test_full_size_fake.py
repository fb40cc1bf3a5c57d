"""Full-size configs are captured and passed under FakeTensorMode: real graph scale, no memory."""

from __future__ import annotations

import time

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from vdopt.capture import capture
from vdopt.families import descriptor_for
from vdopt.lower.split_conditional import PART_NAMES, conditionals, split_conditional
from vdopt.lower.tensorrt_backend import build_settings
from vdopt.pass_manager import PassManager
from vdopt.passes import load_pass, pipeline
from vdopt.recipe import parse_recipe

WAN_13B_RECIPE = {
    "model": {"family": "wan", "config": descriptor_for("wan").full_configs["Wan2.1-T2V-1.3B"],
              "input": {"frames": {"min": 1, "max": 21, "opt": 21}, "height": 60, "width": 104, "text_len": 512}},
    "sampler": {"kind": "flow_euler", "steps": 50, "shift": 5.0, "guidance_scale": 5.0},
}


CACHE_POLICIES = ("static", "first_blocks", "adacache", "teacache")
FLOW = {"kind": "flow_euler", "steps": 50, "shift": 5.0, "guidance_scale": 5.0}
# Published configs at their published latent sizes (latent units), batch 1..2 so the cache gathers rows.
FULL_SIZE = {
    "Wan2.1-T2V-1.3B": ("wan", {"frames": {"min": 1, "max": 21, "opt": 21}, "height": 60, "width": 104, "text_len": 512}, FLOW),
    "HunyuanVideo": ("hunyuan_video", {"frames": {"min": 1, "max": 33, "opt": 33}, "height": 90, "width": 160,
                                       "text_len": 256}, FLOW),
    "CogVideoX-5b": ("cogvideox", {"frames": {"min": 2, "max": 13, "opt": 13}, "height": 60, "width": 90, "text_len": 226},
                     {"kind": "ddim", "prediction": "v_prediction", "steps": 50, "guidance_scale": 6.0}),
    "LTX-Video-0.9": ("ltx_video", {"frames": {"min": 1, "max": 16, "opt": 16}, "height": 16, "width": 24, "text_len": 128},
                      {**FLOW, "shift": 3.0}),
}


@pytest.fixture(scope="module", params=sorted(FULL_SIZE))
def full_size(request):
    family, spec, sampler = FULL_SIZE[request.param]
    recipe = parse_recipe({"model": {"family": family, "config": descriptor_for(family).full_configs[request.param],
                                     "input": {**spec, "batch": {"min": 1, "max": 2}}}, "sampler": sampler})
    start = time.perf_counter()
    program = capture(recipe, None, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
    return request.param, program, time.perf_counter() - start


@pytest.mark.slow
def test_full_size_capture_every_pass_and_split_under_fake_tensors(full_size):
    """Issue 17: each published config, frames dynamic, captured, cached with rows gathered, through the lowering-prep
    passes and split for TensorRT, in minutes (the times are printed; the issue's bound is 2 minutes each)."""
    name, program, capture_s = full_size
    start = time.perf_counter()
    cached = PassManager(pipeline([("insert_cache", {"policy": "first_blocks"})])).run(program)
    assert cached.extras["cache"]["gather_rows"] is True, cached.extras["cache"].get("gather_rows_failed")
    assert [record["name"] for record in cached.passes] == ["insert_cache", *(spec.name for spec, _ in pipeline([]))]
    split = split_conditional(cached)
    assert [part.name for part in split.parts] == list(PART_NAMES)
    assert not any(conditionals(part.program.ep.graph) for part in split.parts)
    assert cached.inputs[0].shape[2] in ("frames", "2*frames_units")
    print(f"{name}: fake capture {capture_s:.1f} s, insert_cache + lowering prep + split {time.perf_counter() - start:.1f} s")


@pytest.fixture(scope="module")
def wan_1_3b():
    start = time.perf_counter()
    program = capture(parse_recipe(WAN_13B_RECIPE), None, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
    return program, time.perf_counter() - start


@pytest.mark.slow
def test_wan_1_3b_captured_and_passed_under_fake_tensors(wan_1_3b):
    program, capture_s = wan_1_3b
    start = time.perf_counter() - capture_s
    parameters = sum(t.numel() for t in program.ep.state_dict.values())
    assert 1.3e9 < parameters < 1.5e9
    blocks = {fqn for n in program.ep.graph.nodes for fqn, _ in (n.meta.get("nn_module_stack") or {}).values()
              if program.descriptor.is_block(fqn)}
    assert len(blocks) == 30
    passed = PassManager(pipeline([])).run(program)
    assert [record["name"] for record in passed.passes] == [spec.name for spec, _ in pipeline([])]
    assert passed.inputs[0].shape[2] == "frames"
    print(f"Wan2.1-T2V-1.3B fake capture + passes: {time.perf_counter() - start:.1f} s")  # the bound: 2 minutes


@pytest.mark.slow
@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_wan_1_3b_cache_inserted_and_split_under_fake_tensors(wan_1_3b, policy):
    """Issue 4: every policy on the full-size graph, lowered to the segmented (TensorRT) form."""
    program, _ = wan_1_3b
    start = time.perf_counter()
    cached = PassManager(pipeline([("insert_cache", {"policy": policy})])).run(program)
    assert len(conditionals(cached.ep.graph)) == 1
    assert cached.state, "the cache keeps its residuals and counters as declared step state"
    split = split_conditional(cached)
    assert [part.name for part in split.parts] == list(PART_NAMES)
    head, compute, reuse, tail = (part.program for part in split.parts)
    assert head.outputs[0].name == "flag" and head.outputs[0].dtype == "bool"
    assert not any(conditionals(part.ep.graph) for part in (head, compute, reuse, tail))
    body = {fqn for n in compute.ep.graph.nodes for fqn, _ in (n.meta.get("nn_module_stack") or {}).values()
            if program.descriptor.is_block(fqn)}
    assert len(body) == 30 - 1  # the body: every block but the first, which is the probe
    for part in (head, reuse, tail):
        assert sum(t.numel() for t in part.ep.state_dict.values()) < sum(t.numel() for t in compute.ep.state_dict.values())
    for part in (head, compute, reuse, tail):
        profiles = build_settings(part).profiles
        assert list(profiles) == [spec.name for spec in part.inputs]
        for low, opt, high in profiles.values():
            assert all(lo <= o <= hi for lo, o, hi in zip(low, opt, high))
    print(f"Wan2.1-T2V-1.3B insert_cache({policy}) + split under fake tensors: {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_full_size_latte_pruned_under_fake_tensors():
    """Issue 18: Latte-1 (28 spatial + 28 temporal blocks, 16 frames of 32x32 latents) captured, half its temporal
    blocks pruned, then cached, within 2 minutes (printed); the pruned blocks' parameters leave the program."""
    recipe = parse_recipe({"model": {"family": "latte", "config": descriptor_for("latte").full_configs["Latte-1"],
                                     "input": {"frames": 16, "height": 32, "width": 32, "text_len": 120}},
                           "sampler": {"kind": "ddim", "prediction": "epsilon", "steps": 50, "guidance_scale": 7.5}})
    start = time.perf_counter()
    program = capture(recipe, None, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
    captured = time.perf_counter() - start
    pruned = PassManager([(load_pass("prune_temporal"), {"blocks": list(range(1, 28, 2))})]).run(program)
    cached = PassManager(pipeline([("insert_cache", {"policy": "first_blocks"})])).run(pruned)
    seconds = time.perf_counter() - start
    assert [r["name"] for r in cached.passes][:2] == ["prune_temporal", "insert_cache"]
    temporal = "denoiser.model.temporal_transformer_blocks."
    removed = {f"{temporal}{k}" for k in range(1, 28, 2)}
    before = {n: t.numel() for n, t in program.ep.state_dict.items()}
    after = {n: t.numel() for n, t in pruned.ep.state_dict.items()}
    prefixes = tuple(f"{block}." for block in removed)
    assert after == {n: c for n, c in before.items() if not n.startswith(prefixes)}
    assert sum(before.values()) > sum(after.values())
    print(f"Latte-1: fake capture {captured:.1f} s, prune 14 of 28 temporal blocks + insert_cache + lowering prep "
          f"{seconds - captured:.1f} s, {seconds:.1f} s in all; parameters {sum(before.values()) / 1e6:.0f} M -> "
          f"{sum(after.values()) / 1e6:.0f} M")
