"""insert_cache: the skip decision is a graph op, per sample and guidance branch; state is explicit."""

from __future__ import annotations

import json

import pytest
import torch

from graph_compare import assert_ops, op_counts
from vdopt.capture import capture
from vdopt.compiler import compile_bundle
from vdopt.errors import PassError
from vdopt.pass_manager import PassManager
from vdopt.passes import load_pass
from vdopt.recipe import parse_recipe
from vdopt.program import DTYPES
from vdopt.runtime import Session
from vdopt.program import resolve_size

INSERT_CACHE = load_pass("insert_cache")
DYNAMIC = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7}
INPUTS = {"wan": DYNAMIC, "cogvideox": DYNAMIC, "hunyuan_video": DYNAMIC, "ltx_video": DYNAMIC,
          "latte": {"frames": 4, "height": 8, "width": 8, "text_len": 7}}
STEPS = 6


def recipe(family: str, batch: int = 1, **sampler):
    return parse_recipe({"model": {"family": family, "input": {**INPUTS[family], "batch": batch}},
                         "sampler": {"steps": STEPS, **sampler}})


def cached(program, **params):
    return PassManager([(INSERT_CACHE, params)]).run(program)


def initial_state(program, x) -> list[torch.Tensor]:
    sizes = dict(zip(("frames", "height", "width"), x.shape[2:]))
    return [torch.zeros([resolve_size(d, sizes, list(program.multiples)) for d in spec.shape], dtype=DTYPES[spec.dtype])
            for spec in program.state]


def sample(program, x, conds, steps=STEPS):
    """The runtime loop, eagerly over the program's module: returns x and the final state."""
    module = program.module()
    state = initial_state(program, x)
    for i in range(steps):
        x, *state = module(x, torch.tensor(i), *conds, *state)
    return x, dict(zip([s.name for s in program.state], state))


@pytest.fixture(scope="module")
def wan():
    return capture(recipe("wan"), None)


def test_graph_gets_a_cond_and_declared_state(wan):
    after = cached(wan, policy="first_blocks", threshold=0.1)
    def conds(program):
        return [n for n in program.ep.graph.nodes if n.target is torch.ops.higher_order.cond]

    assert len(conds(after)) == 1 and not conds(wan)
    assert [s.name for s in after.state] == ["state.cache.0", "state.prev_probe", "state.reuse_run", "state.computed", "state.distance"]
    assert after.state[0].shape == (2, "height_units*width_units*frames", 16)  # cond + uncond rows
    assert [s.name for s in after.inputs[-5:]] == [s.name for s in after.state] == [s.name for s in after.outputs[1:]]
    assert after.extras["cache"]["body_blocks"] == [1, 2] and after.extras["cache"]["gather_rows"]


def test_static_height_and_width_make_the_cache_linear_in_frames():
    """Export refuses Dim.AUTO for a state size that is a linear function of a latent dim
    (16 * frames); capture's export retries with the relation it names."""
    static = parse_recipe({"model": {"family": "wan", "input": {**DYNAMIC, "height": 8, "width": 8}}, "sampler": {"steps": STEPS}})
    after = cached(capture(static, None), policy="first_blocks")
    assert after.state[0].shape == (2, "16*frames", 16)


def in_body(node) -> bool:
    """The node computes part of block 1, the body of the tiny Wan's cache (blocks [1, 2))."""
    return any(path.endswith("blocks.1") for path, _ in (node.meta.get("nn_module_stack") or {}).values())


def branches(program) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The compute and reuse branches of the program's one conditional."""
    cond = next(n for n in program.ep.graph.nodes if n.target is torch.ops.higher_order.cond)
    return tuple(getattr(program.ep.graph_module, branch.target) for branch in cond.args[1:3])


def test_the_body_moves_into_the_compute_branch(wan):
    """One conditional is added; every op of the body leaves the step's graph for the compute branch
    (which adds the row gather and scatter around it); the reuse branch runs no block op."""
    after = cached(wan, policy="first_blocks")
    body = op_counts(wan, in_body)
    compute, reuse = branches(after)
    assert body["aten.linear.default"] == 10 and not op_counts(after, in_body)
    assert_ops(after, {"higher_order.cond": 1, "aten.linear.default": op_counts(wan)["aten.linear.default"] - 10,
                       "aten.scaled_dot_product_attention.default": op_counts(wan)["aten.scaled_dot_product_attention.default"] - 2})
    assert_ops(compute, body, at_least=True)
    assert_ops(compute, {"aten.linear.default": 10, "aten.index_copy.default": 2})
    assert_ops(reuse, {"aten.linear.default": 0, "aten.scaled_dot_product_attention.default": 0})


def test_a_second_cache_is_an_error_that_says_why(wan):
    once = cached(wan, policy="first_blocks")
    with pytest.raises(PassError, match=r"already has a cache \(policy first_blocks, body blocks \[1, 2\]\).*would cache the cached body"):
        INSERT_CACHE.run(once, policy="static")
    with pytest.raises(PassError, match=r"pass 'insert_cache' requires uncached \(no cache is inserted yet"):
        cached(once, policy="first_blocks")


@pytest.mark.parametrize("params, message", [
    ({"policy": "sometimes"}, "not one of"),
    ({"policy": "first_blocks", "first": 0}, "first >= 1"),
    ({"policy": "static", "first": 1, "last": 1}, "empty"),
    ({"policy": "adacache", "first": 0}, "first >= 1"),
    ({"policy": "static", "threshold": 0.1}, "unknown parameter"),
    ({"policy": "static", "forecast": 2}, "weight in"),
    ({"policy": "static", "interval": 0}, r"interval=0; expected a step interval >= 1"),
    ({"policy": "static", "warmup": -1}, r"warmup=-1; expected a step count >= 0"),
    ({"policy": "first_blocks", "first": -2}, r"first=-2; expected a block count >= 0"),
    ({"policy": "first_blocks", "threshold": float("nan")}, r"threshold=nan; expected a finite number"),
    ({"policy": "teacache", "threshold": "0.1"}, r"threshold='0.1'; expected a finite number"),
    ({"policy": "teacache", "coefficients": []}, "non-empty list"),
    ({"policy": "adacache", "codebook_scale": 0}, r"codebook_scale=0; expected a finite number > 0"),
    ({"policy": "adacache", "codebook": [[0.1, 0]]}, "steps >= 1"),
    ({"policy": "adacache", "moreg": "yes"}, "true or false"),
    ({"policy": "static", "max_reuse": -2}, "-1 for no cap"),
])
def test_bad_parameters_are_refused(wan, params, message):
    with pytest.raises(PassError, match=message):
        cached(wan, **params)


NEVER_SKIP = {"static": {"interval": 1}, "first_blocks": {"threshold": 0.0},
              "adacache": {"codebook": [[1e9, 1]]}, "teacache": {"threshold": 0.0}}
_captured = {}


def captured(family):
    if family not in _captured:
        _captured[family] = capture(recipe(family), None)
    return _captured[family]


@pytest.mark.parametrize("policy", sorted(NEVER_SKIP))
@pytest.mark.parametrize("family", sorted(INPUTS))
def test_never_skipping_equals_uncached(family, policy):
    program = captured(family)
    x, _, *conds = program.example_inputs
    uncached, _ = sample(program, x, conds)
    got, state = sample(cached(program, policy=policy, **NEVER_SKIP[policy]), x, conds)
    torch.testing.assert_close(got, uncached, atol=1e-6, rtol=0)
    assert state["state.computed"].tolist() == [STEPS, STEPS]


def test_never_skipping_with_a_forecast_equals_uncached(wan):
    x, _, *conds = wan.example_inputs
    uncached, _ = sample(wan, x, conds)
    got, state = sample(cached(wan, policy="static", interval=1, forecast=1.0), x, conds)
    torch.testing.assert_close(got, uncached, atol=1e-6, rtol=0)
    assert state["state.gap"].tolist() == [1.0, 1.0]


def step_states(program, x, conds, steps):
    """x and the state (by name) entering each of the first `steps` steps."""
    module = program.module()
    names = [spec.name for spec in program.state]
    state, seen = initial_state(program, x), []
    for i in range(steps):
        seen.append((x, dict(zip(names, state))))
        x, *state = module(x, torch.tensor(i), *conds, *state)
    return seen


@pytest.mark.parametrize("interval, step, ahead", [(3, 2, 1.0), (3, 3, 1.0), (2, 4, 0.5)])
def test_forecast_is_reuse_of_the_damped_taylor_step(wan, interval, step, ahead):
    """At a skipped step the forecast program gives what plain reuse gives with the cache set to
    r_k + w * (r_k - r_j) * min(i - k, k - j) / (k - j). Interval 3 computes steps 0, 1, 4, 5: at step 3
    the forecast would reach two gaps ahead and stops at one; interval 2 computes 0, 1, 3, 5: step 4
    is half a gap ahead of step 3."""
    x, _, *conds = wan.example_inputs
    schedule = {"policy": "static", "interval": interval, "warmup": 1, "final": 1, "max_reuse": -1}
    weight = 0.5
    forecasting = cached(wan, **schedule, forecast=weight)
    x_i, state = step_states(forecasting, x, conds, step + 1)[step]
    newest, before = state["state.cache.0"], state["state.cache_before.0"]
    assert state["state.gap"].tolist() == [1.0 if interval == 3 else 2.0] * 2
    reusing = cached(wan, **schedule)
    reuse_state = {name: state[name] for name in [s.name for s in reusing.state]}
    reuse_state["state.cache.0"] = newest + weight * ahead * (newest - before)
    expected = reusing.module()(x_i, torch.tensor(step), *conds, *reuse_state.values())[0]
    got = forecasting.module()(x_i, torch.tensor(step), *conds, *state.values())[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(newest, before), "the two computed residuals should differ for the test to mean anything"


def test_always_reusing_never_runs_the_body(wan):
    x, _, *conds = wan.example_inputs
    never = cached(wan, policy="first_blocks", threshold=1e30, warmup=0, final=0, max_reuse=-1)
    _, state = sample(never, x, conds)
    assert state["state.computed"].tolist() == [0, 0]
    static = cached(wan, policy="static", interval=3, warmup=1, final=1, max_reuse=-1)
    _, state = sample(static, x, conds)
    assert state["state.computed"].tolist() == [4, 4]  # steps 0 (warm-up), 1 and 4 (every third after it), 5 (final)


def test_batch_of_two_prompts_matches_each_alone():
    torch.manual_seed(0)
    alone = capture(recipe("wan"), None)
    torch.manual_seed(0)  # the same random weights
    pair = capture(recipe("wan", batch=2), None)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 8, 8, generator=generator)
    text = torch.randn(2, 7, 16, generator=generator) * torch.tensor([1.0, 8.0]).reshape(2, 1, 1)
    null = torch.zeros(1, 7, 16)
    for threshold in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        both, state = sample(cached(pair, policy="first_blocks", threshold=threshold), x, (text, null.expand(2, -1, -1)))
        computed = state["state.computed"].tolist()
        if len(set(computed)) > 1:
            break
    else:
        pytest.fail("no threshold made the two prompts decide differently")
    single = cached(alone, policy="first_blocks", threshold=threshold)
    for k in range(2):
        one, state = sample(single, x[k:k + 1], (text[k:k + 1], null))
        torch.testing.assert_close(both[k:k + 1], one, atol=1e-5, rtol=1e-5)
        assert state["state.computed"].tolist() == [computed[k], computed[k + 2]]


@pytest.mark.parametrize("backend, split, forecast", [("torch", "never", 0), ("onnx", "never", 0), ("onnx", "always", 0),
                                                      ("onnx", "always", 0.5),
                                                      pytest.param("aoti", "never", 0, marks=pytest.mark.slow)])
def test_lowered_cache_matches_and_leaks_nothing(backend, split, forecast, tmp_path):
    """`split: always` forces the segmented form (head, flag, compute | reuse, tail) on ONNX Runtime."""
    params = {"policy": "first_blocks", "threshold": 0.15, "forecast": forecast}
    data = {"model": {"family": "wan", "input": INPUTS["wan"]}, "sampler": {"steps": STEPS},
            "passes": [{"name": "insert_cache", "params": params}],
            "lower": {"backend": backend, "split_conditionals": split}}
    torch.manual_seed(0)
    compile_bundle(parse_recipe(data), None, tmp_path / "c.vdopt")
    session = Session(tmp_path / "c.vdopt")
    assert session.manifest["cache"]["policy"] == "first_blocks"
    segment = session.manifest["segments"][0]
    assert segment.get("kind", "step") == ("split" if split == "always" else "step")
    cond = {"encoder_hidden_states": torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(0))}
    from vdopt.runtime.trace import CacheTrace

    trace = CacheTrace(session.manifest)
    first = session.run(cond, seed=1, frames=3, height=8, width=8, progress=False, on_step=trace.on_step)
    again = session.run(cond, seed=1, frames=3, height=8, width=8, progress=False)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert 0 < min(trace.body_evaluations()) and max(trace.body_evaluations()) < STEPS, "the threshold should skip some steps"
    torch.manual_seed(0)  # the bundle's random weights
    program = cached(capture(parse_recipe({**data, "passes": [], "lower": {"backend": "torch"}}), None), **params)
    x = session.initial_noise(1, (1, 4, 3, 8, 8))
    expected, _ = sample(program, x, (cond["encoder_hidden_states"], torch.zeros(1, 7, 16)))
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)


def test_moreg_motion_score_grows_with_frame_change():
    from vdopt.passes.insert_cache import AdaCachePolicy, MOREG_NORM, MOREG_POWER

    policy = AdaCachePolicy({}, num_steps=10, patch_frames=1)
    x = torch.zeros(1, 4, 4, 8, 8)  # four latent frames
    still = torch.ones(2, 4, 3, 5)  # [samples, frames, tokens, dim]: identical frames
    moving = still.clone()
    moving[1, 1::2] = 3.0  # sample 1 alternates between 1 and 3 per frame
    score = policy.motion(moving.flatten(1, 2), x, samples=2)
    assert score[0] == 0
    # each of the 3 frame pairs changes by 2 per element over a combined size of 4: 2/4 per pair
    expected = ((3 * 2 * 15) / (3 * 4 * 15) / MOREG_NORM) ** MOREG_POWER
    torch.testing.assert_close(score[1], torch.tensor(expected))
    torch.testing.assert_close(policy.motion(still.flatten(1, 2), x, samples=2), torch.zeros(2))


def test_trace_records_the_moreg_motion_score_per_row(tmp_path):
    from vdopt.runtime.trace import CacheTrace

    data = {"model": {"family": "wan", "input": INPUTS["wan"]}, "sampler": {"steps": STEPS},
            "passes": [{"name": "insert_cache", "params": {"policy": "adacache"}}], "lower": {"backend": "torch"}}
    torch.manual_seed(0)
    compile_bundle(parse_recipe(data), None, tmp_path / "c.vdopt")
    session = Session(tmp_path / "c.vdopt")
    trace = CacheTrace(session.manifest)
    cond = {"encoder_hidden_states": torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(0))}
    session.run(cond, seed=1, frames=3, height=8, width=8, progress=False, on_step=trace.on_step)
    assert all(len(s["motion"]) == len(trace.rows) for s in trace.steps)
    motion = torch.tensor([s["motion"] for s in trace.steps])
    assert torch.isfinite(motion).all() and (motion > 0).any()
    # the score changes only where the body was recomputed
    computed = torch.tensor([s["computed"] for s in trace.steps], dtype=torch.bool)
    assert ((motion[1:] != motion[:-1]) <= computed[1:]).all()
    trace.write(tmp_path / "trace.json")
    assert "motion" in json.loads((tmp_path / "trace.json").read_text())["steps"][0]
    assert (tmp_path / "trace.png").stat().st_size > 0
