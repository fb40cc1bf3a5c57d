"""Every pass is held to its contract (ARCHITECTURE contract 4), checked the same way for all of them.

- Purity: the input program, graph and weights, is unchanged after the pass runs. Calibration and
  the tests apply many passes to one capture, so a pass that writes into its input corrupts every
  later trial. Every pass vdopt ships needs a case in `PURITY_CASES`; a new one fails here until it has one.
- Facts: requirements and guarantees are predicates the manager checks; a pass that names a fact
  without a predicate is refused, and one whose output lacks what it guarantees is caught.
- Parameters: only a call that does not fit the pass's signature is "bad parameters"; an error from
  inside the pass surfaces as the bug it is.
- Composition: passes in an order that cannot work are refused with the reason.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, fields

import pytest
import torch
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode

from cmd_helpers import random_cmd_file
from vdopt.capture import capture
from vdopt.errors import PassError
from vdopt.pass_manager import FACTS, Pass, PassManager, readable_graph
from vdopt.passes import LOWERING_PREP_PASSES, OPTIMIZATION_PASSES, load_pass, pipeline
from vdopt.program import StepProgram
from vdopt.recipe import parse_recipe

WAN_INPUT = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7}
PREFIX = "denoiser.model."
LORA_MODULES = ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2")


def wan_recipe():
    return parse_recipe({"model": {"family": "wan", "input": WAN_INPUT}, "sampler": {"steps": 6, "guidance_scale": 5.0}})


@pytest.fixture(scope="module")
def wan() -> StepProgram:
    torch.manual_seed(0)
    return capture(wan_recipe(), None)


@pytest.fixture(scope="module")
def latte() -> StepProgram:
    """A tiny Latte: adaLN blocks, whose modulated norms fuse_norm_modulate rewrites."""
    torch.manual_seed(0)
    return capture(parse_recipe({"model": {"family": "latte", "input": {"frames": 4, "height": 8, "width": 8, "text_len": 7}},
                                 "sampler": {"steps": 4}}), None)


@pytest.fixture(scope="module")
def cached_wan(wan) -> StepProgram:
    return PassManager([(load_pass("insert_cache"), {"policy": "first_blocks"})]).run(wan)


def small_lora(program: StepProgram, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-2 peft-layout LoRA over two of the program's linears."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for module in LORA_MODULES:
        out_features, in_features = program.ep.state_dict[f"{PREFIX}{module}.weight"].shape
        lora[f"transformer.{module}.lora_A.weight"] = torch.randn(2, in_features, generator=generator)
        lora[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, 2, generator=generator)
    return lora


@pytest.fixture(scope="module")
def weight_files(wan, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    generator = torch.Generator().manual_seed(1)
    student = {k.removeprefix(PREFIX): v + 0.05 * torch.randn(v.shape, generator=generator)
               for k, v in wan.ep.state_dict.items() if k.startswith(PREFIX)}
    save_file(student, str(folder / "student.safetensors"))
    save_file(small_lora(wan), str(folder / "lora.safetensors"))
    return {"student": str(folder / "student.safetensors"), "lora": str(folder / "lora.safetensors"),
            "cmd": str(random_cmd_file(folder / "cmd.safetensors"))}


@pytest.fixture(scope="module")
def reference() -> StepProgram:
    """The reference teacher (its real weights), which rewrite_content_motion rewrites into CMD's stages."""
    from vdopt.reference.model import WEIGHTS_DIR, WEIGHTS_FILE

    return capture(parse_recipe({"model": {"family": "reference", "input": {"frames": 8, "height": 32, "width": 32, "text_len": 3}},
                                 "sampler": {"steps": 3, "guidance_scale": 3.0}}), WEIGHTS_DIR / WEIGHTS_FILE)


# ----- purity ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PurityCase:
    """A pass's input (a fixture name) and parameters; `weights` names one of `weight_files` to pass in."""

    program: str
    params: dict
    weights: str | None = None

    def call(self, request) -> tuple[StepProgram, dict]:
        params = dict(self.params)
        if self.weights is not None:
            params["weights"] = request.getfixturevalue("weight_files")[self.weights]
        return request.getfixturevalue(self.program), params


PURITY_CASES: dict[str, dict[str, PurityCase]] = {
    "rewrite_content_motion": {
        "reference": PurityCase("reference", {}, weights="cmd"),
    },
    "reduce_steps": {
        "lora_no_guidance": PurityCase("wan", {"lora_scale": 0.7, "timesteps": [1000, 500]}, weights="lora"),
        "full_weights_keep_guidance": PurityCase("wan", {"steps": 3, "keep_guidance": True}, weights="student"),
    },
    "prune_temporal": {
        "whole_block": PurityCase("wan", {"blocks": [1], "what": "blocks"}),
    },
    "fuse_norm_modulate": {
        "latte": PurityCase("latte", {}),
    },
    "insert_cache": {
        "first_blocks_forecast": PurityCase("wan", {"policy": "first_blocks", "forecast": 0.5}),
    },
    "fold_guidance_batch": {
        "captured": PurityCase("wan", {}),
        "cached": PurityCase("cached_wan", {}),
    },
}
ALL_PASSES = [*OPTIMIZATION_PASSES, *LOWERING_PREP_PASSES]


@dataclass
class Snapshot:
    """Everything of a program a pass could write to, copied."""

    graph: str
    signature: str
    tensors: dict[str, torch.Tensor]
    fields: dict

    @classmethod
    def of(cls, program: StepProgram) -> "Snapshot":
        tensors = {f"state_dict.{k}": v.clone() for k, v in program.ep.state_dict.items()}
        tensors |= {f"constants.{k}": v.clone() for k, v in program.ep.constants.items() if isinstance(v, torch.Tensor)}
        tensors |= {f"example_inputs.{k}": v.clone() for k, v in enumerate(program.example_inputs)}
        plain = {f.name: copy.deepcopy(getattr(program, f.name)) for f in fields(program)
                 if f.name not in ("ep", "example_inputs", "descriptor", "extras")}
        plain["extras"] = copy.deepcopy({k: v for k, v in program.extras.items() if k != "fake_mode"})
        signature = f"{program.ep.graph_signature}\n{program.ep.range_constraints}"
        return cls(readable_graph(program), signature, tensors, plain)

    def differences(self, other: "Snapshot") -> list[str]:
        found = []
        if self.graph != other.graph:
            diff = difflib.unified_diff(self.graph.splitlines(), other.graph.splitlines(), "before", "after", lineterm="", n=1)
            found.append("graph:\n" + "\n".join(list(diff)[:40]))
        if self.signature != other.signature:
            found.append("graph signature or range constraints")
        if set(self.tensors) != set(other.tensors):
            found.append(f"tensor names: {sorted(set(self.tensors) ^ set(other.tensors))}")
        found += [f"tensor {name}" for name, t in self.tensors.items() if name in other.tensors and not torch.equal(t, other.tensors[name])]
        found += [f"field {name}" for name, value in self.fields.items() if other.fields[name] != value]
        return found


def test_every_pass_has_a_purity_case():
    missing = [name for name in ALL_PASSES if not PURITY_CASES.get(name)]
    assert not missing, f"add a case to PURITY_CASES for {missing}: every pass must show it leaves its input unchanged"


@pytest.mark.parametrize("name, case", [(name, case) for name in ALL_PASSES for case in PURITY_CASES.get(name, {})])
def test_the_input_program_is_unchanged(request, name, case):
    program, params = PURITY_CASES[name][case].call(request)
    before = Snapshot.of(program)
    result = PassManager([(load_pass(name), params)]).run(program)
    assert result.ep is not program.ep, "the case should make the pass change something"
    changed = before.differences(Snapshot.of(program))
    assert not changed, f"{name} modified its input program:\n" + "\n".join(changed)


def test_a_lora_applied_twice_to_one_capture_gives_the_same_program(wan, weight_files):
    params = {"weights": weight_files["lora"], "lora_scale": 0.7}
    first, second = (PassManager([(load_pass("reduce_steps"), params)]).run(wan) for _ in range(2))
    for name, tensor in first.ep.state_dict.items():
        torch.testing.assert_close(second.ep.state_dict[name], tensor, atol=0, rtol=0, msg=name)
    inputs = [t.clone() for t in first.example_inputs]
    torch.testing.assert_close(second.module()(*inputs), first.module()(*inputs), atol=0, rtol=0)


def test_passes_work_on_a_fake_tensor_capture(weight_files):
    """FakeTensorMode captures (real graph scale, no memory) go through every pass, guarantees checked."""
    program = capture(wan_recipe(), None, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
    passes = pipeline([("reduce_steps", {"weights": weight_files["lora"], "timesteps": [1000, 500], "keep_guidance": True}),
                       ("insert_cache", {"policy": "teacache"})])
    result = PassManager(passes).run(program)
    assert [r["name"] for r in result.passes] == ["reduce_steps", "insert_cache", "fold_guidance_batch"]
    assert result.num_steps == 2


# ----- facts ----------------------------------------------------------------------------------

def test_every_fact_a_pass_names_has_a_predicate():
    for name in ALL_PASSES:
        spec = load_pass(name)
        assert set(spec.requires) | set(spec.guarantees) | set(spec.invalidates) <= set(FACTS), name


def test_a_pass_naming_a_fact_without_a_predicate_is_refused():
    with pytest.raises(ValueError, match=r"names sparkly, which no predicate defines"):
        Pass("sparkle", lambda program: program, "test pass", guarantees=("sparkly",))


def test_a_pass_that_lies_about_a_guarantee_is_caught(wan):
    liar = Pass("pretend_cache", lambda program: program, "claims a cache it never inserts", guarantees=("cached",))
    with pytest.raises(PassError, match=r"pass 'pretend_cache' guarantees cached .* does not hold of its output"):
        PassManager([(liar, {})]).run(wan)


def test_a_pass_that_lies_about_what_it_ends_is_caught(wan):
    liar = Pass("pretend_prune", lambda program: program, "claims to prune", invalidates=("unpruned",))
    with pytest.raises(PassError, match=r"pass 'pretend_prune' declares that it ends unpruned, which still holds"):
        PassManager([(liar, {})]).run(wan)


def test_an_unmet_requirement_is_refused_with_its_meaning(cached_wan):
    needs_uncached = Pass("needs_uncached", lambda program: program, "test pass", requires=("uncached",))
    with pytest.raises(PassError, match=r"requires uncached \(no cache is inserted yet.*passes before it: insert_cache"):
        PassManager([(needs_uncached, {})]).run(cached_wan)


# ----- parameters -----------------------------------------------------------------------------

def test_a_misspelt_parameter_names_itself_and_the_accepted_ones(wan):
    with pytest.raises(PassError, match=r"bad parameters.*unexpected keyword argument 'weigths'.*accepts: weights, lora_scale"):
        PassManager([(load_pass("reduce_steps"), {"weigths": "student.safetensors"})]).run(wan)


def test_a_missing_parameter_names_itself(wan):
    def scale_table(program, factor):
        return program

    with pytest.raises(PassError, match=r"missing a required argument: 'factor'.*accepts: factor"):
        PassManager([(Pass("scale_table", scale_table, "test pass"), {})]).run(wan)


def test_a_type_error_inside_a_pass_is_a_bug_not_bad_parameters(wan):
    def broken(program, factor=1):
        return program.step_table + factor  # a dict plus an int: the pass's own bug

    with pytest.raises(TypeError, match="unsupported operand"):
        PassManager([(Pass("broken", broken, "test pass"), {"factor": 2})]).run(wan)


# ----- composition ----------------------------------------------------------------------------

def test_reduce_steps_after_insert_cache_is_refused(cached_wan):
    with pytest.raises(PassError, match=r"pass 'reduce_steps' requires uncached"):
        PassManager([(load_pass("reduce_steps"), {"steps": 3})]).run(cached_wan)
    with pytest.raises(PassError, match="reduce_steps must come before insert_cache: it requires uncached, which insert_cache ends"):
        pipeline([("insert_cache", {}), ("reduce_steps", {})])


def test_reduce_steps_after_fold_guidance_batch_is_refused(wan):
    folded = PassManager([(load_pass("fold_guidance_batch"), {})]).run(wan)
    with pytest.raises(PassError, match="run it before fold_guidance_batch"):
        PassManager([(load_pass("reduce_steps"), {})]).run(folded)
