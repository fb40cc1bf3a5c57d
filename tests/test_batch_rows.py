"""Batch-dynamic bundles (issue 14, item 4): one bundle takes 1..max samples per call, a batch gives
each prompt the clip it gets alone, and a per-row cache runs its body on the recomputing rows only.

Body rows are counted, not inferred from the decisions: `torch.profiler` records every attention call
with its input shape, the head blocks' calls give the rows-per-call pattern of all rows, and the body's
calls in a step must follow that pattern scaled to the rows the trace says recomputed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vdopt.compiler import compile_bundle
from vdopt.errors import RunInputError
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.runtime import Session
from vdopt.runtime.trace import CacheTrace

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vdopt/reference/weights/teacher.safetensors"
PROMPTS = ["red circle moving up", "blue square moving left", "green triangle moving down-right"]
STEPS = 8
ATTENTION = "aten::scaled_dot_product_attention"


def reference_recipe(cache: dict):
    data = load_recipe(ROOT / "recipes/reference.yaml").model_dump(mode="json")
    data["model"]["input"]["batch"] = {"min": 1, "max": 4}
    data["sampler"]["steps"] = STEPS
    data["lower"] = {"backend": "torch"}
    data["passes"] = [{"name": "insert_cache", "params": cache}]
    return parse_recipe(data)


def latte_recipe(cache: dict):
    return parse_recipe({
        "model": {"family": "latte", "input": {"batch": {"min": 1, "max": 4}, "frames": 4, "height": 8, "width": 8, "text_len": 7}},
        "sampler": {"steps": STEPS}, "lower": {"backend": "torch"}, "passes": [{"name": "insert_cache", "params": cache}]})


class Case:
    """A family's cached bundle, its inputs for a batch of three, and each sample's inputs alone."""

    def __init__(self, family: str, directory: Path):
        self.family, self.directory = family, directory

    def compile(self, threshold: float) -> Session:
        cache = {"policy": "first_blocks", "first": 1, "threshold": threshold, "warmup": 1, "final": 0}
        recipe = reference_recipe(cache) if self.family == "reference" else latte_recipe(cache)
        path = self.directory / f"{self.family}_{threshold}.vdopt"
        if not path.exists():
            torch.manual_seed(0)  # the latte case has random weights
            compile_bundle(recipe, TEACHER if self.family == "reference" else None, path, verify=False)
        return Session(path)

    def conds(self, session: Session) -> tuple[dict, dict]:
        if self.family == "reference":
            return session.prompt_encoder()(PROMPTS)
        generator = torch.Generator().manual_seed(1)
        cond = {"encoder_hidden_states": torch.randn(len(PROMPTS), 7, 16, generator=generator)}
        return cond, {"encoder_hidden_states": torch.zeros(len(PROMPTS), 7, 16)}


def traced_run(session: Session, cond: dict, uncond: dict, seed: int = 0):
    trace = CacheTrace(session.manifest)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        video = session.run(cond, uncond, seed=seed, progress=False, on_step=trace.on_step)
    return video, trace, prof.events()


def attention_rows_per_step(events) -> list[list[int]]:
    """Dim 0 of every attention call's query, grouped by the step range it ran in."""
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name.startswith("vdopt/step "))
    calls = [[] for _ in steps]
    for event in sorted((e for e in events if e.name == ATTENTION), key=lambda e: e.time_range.start):
        k = next(k for k, (start, end) in enumerate(steps) if start <= event.time_range.start <= end)
        calls[k].append(event.input_shapes[0][0])
    return calls


def mixed_threshold(case: Case) -> float:
    """A first_blocks threshold between the rows' distances at step 1 (the first after the warmup step,
    so the same with any threshold), so rows decide differently there."""
    session = case.compile(0.0)
    _, trace, _ = traced_run(session, *case.conds(session))
    distances = sorted(trace.steps[1]["distance"])
    middle = len(distances) // 2
    return round((distances[middle - 1] + distances[middle]) / 2, 6)


def head_calls(case: Case) -> list[int]:
    """The attention calls of the always-computed head blocks: a step where no row recomputes the body."""
    session = case.compile(1e6)
    _, trace, events = traced_run(session, *case.conds(session))
    assert sum(trace.steps[1]["computed"]) == 0
    return attention_rows_per_step(events)[1]


@pytest.fixture(scope="module", params=["reference", "latte"])
def case(request, tmp_path_factory):
    case = Case(request.param, tmp_path_factory.mktemp(request.param))
    case.session = case.compile(mixed_threshold(case))
    case.head = head_calls(case)
    return case


def test_cache_gathers_rows(case):
    assert case.session.manifest["cache"]["gather_rows"] is True
    assert case.session.manifest["latent"]["batch"] == [1, 4]
    assert all(s["shape"][0] in ("2*batch", "16*batch", "128*batch", "8*batch", "32*batch", "64*batch")
               for s in case.session.manifest["state"]), [s["shape"] for s in case.session.manifest["state"]]


def test_body_runs_on_the_recomputing_rows_only(case):
    cond, uncond = case.conds(case.session)
    _, trace, events = traced_run(case.session, cond, uncond)
    per_step = attention_rows_per_step(events)
    rows = 2 * len(PROMPTS)
    full_body = per_step[0][len(case.head):]  # step 0 (warmup) recomputes every row
    assert full_body and all(calls[: len(case.head)] == case.head for calls in per_step), "the head must run on every row"
    mixed = 0
    for step, calls in zip(trace.steps, per_step):
        computed = sum(step["computed"])
        expected = [size * computed // rows for size in full_body] if computed else []
        assert calls[len(case.head):] == expected, (f"step {step['step']}: {computed} of {rows} rows recomputed, "
                                                   f"body attention rows {calls[len(case.head):]}")
        mixed += 0 < computed < rows
    assert mixed, "no step where only some rows recomputed: the test counted nothing"


def test_a_batch_gives_each_prompt_its_clip_alone(case):
    """Sample k of a batch run with seed s is the clip of its prompt alone with seed s + k, decisions included."""
    cond, uncond = case.conds(case.session)
    batch, trace, _ = traced_run(case.session, cond, uncond, seed=7)
    n = len(PROMPTS)
    for k in range(n):
        one = {name: t[k: k + 1] for name, t in cond.items()}
        one_un = {name: t[k: k + 1] for name, t in uncond.items()}
        alone, trace_alone, _ = traced_run(case.session, one, one_un, seed=7 + k)
        torch.testing.assert_close(alone[0], batch[k], atol=2e-3, rtol=0)  # float noise of batched GEMMs, far below a pixel level
        assert [s["computed"] for s in trace_alone.steps] == [[s["computed"][k], s["computed"][n + k]] for s in trace.steps]


def test_batch_beyond_the_compiled_range_is_refused(case):
    cond, uncond = case.conds(case.session)
    big = {name: t.repeat(2, *[1] * (t.dim() - 1)) for name, t in cond.items()}
    with pytest.raises(RunInputError, match=r"6 sample\(s\) per call; this bundle was compiled for 1..4"):
        case.session.run(big, {name: t.repeat(2, *[1] * (t.dim() - 1)) for name, t in uncond.items()}, progress=False)


def test_a_batch_of_one_or_two_is_one_symbol_for_every_input():
    """torch.export does not relate inputs that share a Dim(min=1, max=2); capture works around it."""
    from vdopt.capture import capture

    data = load_recipe(ROOT / "recipes/reference.yaml").model_dump(mode="json")
    data["model"]["input"]["batch"] = {"min": 1, "max": 2}
    program = capture(parse_recipe(data), TEACHER)
    assert [s.shape[0] for s in program.inputs if s.name != "i"] == ["batch"] * 3
    assert program.dims["batch"] == (1, 2)
