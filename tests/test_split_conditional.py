"""split_conditional: the cached step cut at its `torch.cond` into head, compute | reuse and tail.

The ONNX Runtime bundle in the segmented form is in test_insert_cache (`split: always`); the
full-size Wan2.1 split is in test_full_size_fake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_insert_cache import cached, recipe, sample
from vdopt.capture import capture
from vdopt.compiler import compile_program
from vdopt.lower.split_conditional import PART_NAMES, conditionals, split_conditional
from vdopt.lower.tensorrt_backend import build_settings
from vdopt.program import DTYPES, resolve_size
from vdopt.recipe import load_recipe

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vdopt/reference/weights/teacher.safetensors"


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    return cached(capture(recipe("wan"), None), policy="first_blocks", threshold=0.15)


@pytest.fixture(scope="module")
def split(program):
    return split_conditional(program)


def ops(program) -> set[str]:
    return {str(n.target) for n in program.ep.graph.nodes if n.op == "call_function"}


def body_weights(program) -> set[str]:
    """Parameters of the cached body (block 1 of the two-block tiny Wan)."""
    return {name for name in program.ep.state_dict if "blocks.1." in name or "blocks_1_" in name}


def test_parts_and_their_wiring(program, split):
    assert [p.name for p in split.parts] == list(PART_NAMES)
    head, compute, reuse, tail = (p.program for p in split.parts)
    flag = head.outputs[0]
    assert (flag.name, flag.shape, flag.dtype) == ("flag", (), "bool")
    assert compute.inputs == reuse.inputs and compute.outputs == reuse.outputs
    assert [s.name for s in tail.outputs] == [s.name for s in program.outputs]
    available = {s.name for s in program.inputs}
    for part in (head, compute, tail):
        assert {s.name for s in part.inputs} <= available
        available |= {s.name for s in part.outputs}
    assert not any(conditionals(p.ep.graph) for p in (head, compute, reuse, tail))
    assert "aten.nonzero.default" in ops(compute)
    assert not any("aten.nonzero.default" in ops(p) for p in (head, reuse, tail))
    assert body_weights(compute) and not any(body_weights(p) for p in (head, reuse, tail))


def test_a_step_without_a_conditional_is_not_split():
    assert split_conditional(capture(recipe("wan"), None)) is None


def run_split(split, program, x, conds, steps):
    """The runtime's split loop, eagerly over the parts' modules."""
    sizes = dict(zip(("frames", "height", "width"), x.shape[2:]))
    values = {s.name: torch.zeros([resolve_size(d, sizes, list(program.multiples)) for d in s.shape],
                                  dtype=DTYPES[s.dtype]) for s in program.state}
    values.update(zip([s.name for s in program.inputs[2:2 + len(conds)]], conds))
    modules = {p.name: p.program.ep.module() for p in split.parts}
    branches = []
    for i in range(steps):
        values.update(x=x, i=torch.tensor(i))
        for name in ("head", "branch", "tail"):
            if name == "branch":
                name = "compute" if bool(values["flag"]) else "reuse"
                branches.append(name)
            part = split.part(name).program
            outputs = modules[name](*(values[s.name] for s in part.inputs))
            assert all(t.is_contiguous() for t in outputs), f"{name} hands over a view; the runtime would copy it"
            values.update(zip([s.name for s in part.outputs], outputs))
        x = values["x_next"]
    return x, values, branches


@pytest.mark.parametrize("frames", [2, 3])
def test_split_loop_equals_the_step(program, split, frames):
    generator = torch.Generator().manual_seed(frames)
    x = torch.randn(1, 4, frames, 8, 8, generator=generator)
    conds = (torch.randn(1, 7, 16, generator=generator), torch.zeros(1, 7, 16))
    expected, state = sample(program, x, conds, STEPS)
    got, values, branches = run_split(split, program, x, conds, STEPS)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    for name, value in state.items():
        torch.testing.assert_close(values[name], value, atol=0, rtol=0)
    assert {"compute", "reuse"} == set(branches), "the threshold should make the runtime take both branches"


def test_engine_profiles_cover_every_part_input(split):
    for part in split.parts:
        profiles = build_settings(part.program).profiles
        assert list(profiles) == [s.name for s in part.program.inputs]
        for low, opt, high in profiles.values():
            assert all(lo <= o <= hi for lo, o, hi in zip(low, opt, high))
    low, _, high = build_settings(split.part("compute").program).profiles["state.cache.0"]
    # tokens = frames * (height / 2) * (width / 2): frames 1..8, height and width 4..16 in recipe()
    assert low[1] == 1 * 2 * 2 and high[1] == 8 * 8 * 8


def test_sizes_are_read_by_the_size_grammar_not_sympify(program, tmp_path):
    """A manifest size string is parsed by vdopt.safety's grammar: a hostile one is refused, never run."""
    import dataclasses

    from vdopt.errors import LoweringError

    marker = tmp_path / "ran"
    x = program.inputs[0]
    hostile = dataclasses.replace(x, shape=(*x.shape[:2], f"__import__('pathlib').Path({str(marker)!r}).touch() or 1", *x.shape[3:]))
    with pytest.raises(LoweringError, match="input 'x' has the size .* outside the size grammar"):
        split_conditional(program.replace(inputs=(hostile, *program.inputs[1:])))
    assert not marker.exists()


def test_values_cross_a_cut_contiguous():
    """The shipped cached teacher's head computes a transposed view and an expanded scalar that compute and tail
    read: the head hands them over contiguous, so the runtime copies nothing between parts."""
    program = compile_program(load_recipe(ROOT / "recipes" / "reference_cached.yaml"), TEACHER)
    split = split_conditional(program)
    values = dict(zip([s.name for s in program.inputs], program.example_inputs))
    for name in ("head", "reuse", "compute"):
        part = split.part(name).program
        outputs = part.ep.module()(*(values[s.name] for s in part.inputs))
        assert all(t.is_contiguous() for t in outputs), name
        values.update(zip([s.name for s in part.outputs], outputs))
