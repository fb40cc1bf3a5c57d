"""fold_guidance_batch: branch-invariant work leaves the guidance batch, numbers unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_compare import assert_rewrites_to, assert_same_graph
from vdopt.capture import capture
from vdopt.errors import PassError
from vdopt.pass_manager import PassManager
from vdopt.passes import load_pass
from vdopt.passes.fold_guidance_batch import PASS, fold_guidance_batch, fold_guidance_batch_graph, guidance_batch_folded
from vdopt.recipe import parse_recipe

aten = torch.ops.aten
WAN_INPUT = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7}


def wan_recipe(**sampler):
    return parse_recipe({"model": {"family": "wan", "input": WAN_INPUT}, "sampler": {"steps": 4, **sampler}})


@pytest.fixture(scope="module")
def captured():
    return capture(wan_recipe(), None)


@pytest.fixture(scope="module")
def folded(captured):
    return PassManager([(PASS, {})]).run(captured)


def input_batches(program, keep) -> list[int]:
    """Dim 0 of the first argument of every node `keep` selects, in graph order."""
    return [node.args[0].meta["val"].shape[0] for node in program.ep.graph.nodes if node.op == "call_function" and keep(program, node)]


def is_patch_embedding(program, node) -> bool:
    return node.target is aten.conv3d.default


def is_time_embedder_linear(program, node) -> bool:
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return node.target is aten.linear.default and any(program.descriptor.is_time_embedding(path) for path in paths)


def test_registered_under_its_name():
    assert load_pass("fold_guidance_batch") is PASS
    assert PASS.requires == ("guidance",) and "guidance" in PASS.doc


def test_embeddings_run_at_batch_b(captured, folded):
    assert input_batches(captured, is_patch_embedding) == [2]
    assert input_batches(captured, is_time_embedder_linear) == [2, 2]
    assert input_batches(folded, is_patch_embedding) == [1]
    assert input_batches(folded, is_time_embedder_linear) == [1, 1]


def test_the_text_path_stays_at_batch_2b(folded):
    def text_linear(program, node):
        return node.target is aten.linear.default and any("text_embedder" in path for path, _ in (node.meta.get("nn_module_stack") or {}).values())

    assert input_batches(folded, text_linear) == [2, 2]


def test_records_itself(captured, folded):
    record = folded.passes[-1]
    assert record["name"] == "fold_guidance_batch" and record["nodes_before"] == sum(1 for n in captured.ep.graph.nodes if n.op == "call_function")

def test_its_guarantee_is_a_fixed_point(captured, folded):
    assert PASS.guarantees == ("guidance_batch_folded",)
    assert not guidance_batch_folded(captured) and guidance_batch_folded(folded)


@pytest.mark.parametrize("frames, height, width", [(2, 6, 12), (7, 16, 8)])
def test_numerics_match_at_two_frame_counts(captured, folded, frames, height, width):
    generator = torch.Generator().manual_seed(frames)
    x = torch.randn(1, 4, frames, height, width, generator=generator)
    cond, uncond = (torch.randn(1, 7, 16, generator=generator) for _ in range(2))
    inputs = (x, torch.tensor(1), cond, uncond)
    with torch.no_grad():
        expected, actual = captured.ep.module()(*inputs), folded.ep.module()(*inputs)
    assert actual[0].shape == x.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_idempotent(folded):
    again = fold_guidance_batch(folded)
    assert again is folded
    assert not fold_guidance_batch_graph(folded.ep.module())


def test_without_guidance_the_manager_refuses_and_nothing_is_replicated():
    program = capture(wan_recipe(guidance_scale=1.0), None)
    assert not program.guidance
    with pytest.raises(PassError, match="requires guidance"):
        PassManager([(PASS, {})]).run(program)
    assert fold_guidance_batch(program) is program


# ----- hand-built graphs --------------------------------------------------------------------

class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))


def with_forward(forward) -> Linear:
    module = Linear()
    module.forward = forward.__get__(module)
    return module


def exported(forward, *inputs) -> torch.fx.GraphModule:
    return torch.export.export(with_forward(forward), inputs).module()


def folded_module(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    assert fold_guidance_batch_graph(module)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def test_a_row_wise_chain_runs_once_and_is_replicated_where_it_leaves():
    def before(self, x):
        return (F.silu(F.linear(torch.cat([x, x]), self.weight)) * 2.0,)

    def expected(self, x):
        h = F.silu(F.linear(x, self.weight)) * 2.0
        return (torch.cat([h, h], 0),)

    assert_rewrites_to(folded_module, with_forward(before), with_forward(expected), (torch.randn(3, 8),))


def test_cat_of_different_tensors_is_left_alone():
    def forward(self, a, b):
        return (F.linear(torch.cat([a, b]), self.weight),)

    inputs = torch.randn(2, 8), torch.randn(2, 8)
    module = exported(forward, *inputs)
    assert not fold_guidance_batch_graph(module)
    assert_same_graph(module, exported(forward, *inputs))


def test_replication_is_materialised_before_batch_mixing_ops():
    def forward(self, x, y):
        h = F.silu(F.linear(torch.cat([x, x]), self.weight))
        return h.sum(0), h.sum(1), h * y, h.t() @ y

    x, y = torch.randn(3, 8), torch.randn(6, 8)
    module = exported(forward, x, y)
    with torch.no_grad():
        expected = module(x, y)
    assert fold_guidance_batch_graph(module)
    module.recompile()
    linear, silu = (next(n for n in module.graph.nodes if n.target is op) for op in (aten.linear.default, aten.silu.default))
    assert linear.args[0].name == "x"  # computed once, at batch 3
    silu_copies, row_sums = [node for node in module.graph.nodes if node.target is aten.cat.default]
    assert silu_copies.args[0] == [silu, silu]
    assert {user.target for user in silu_copies.users} == {aten.sum.dim_IntList, aten.mul.Tensor, aten.t.default}
    assert row_sums.args[0][0].args == (silu, [1]) and list(row_sums.users)[0].op == "output"  # sum(1) is row-wise
    with torch.no_grad():
        torch.testing.assert_close(module(x, y), expected, atol=1e-6, rtol=1e-6)


def test_values_written_in_place_are_not_moved():
    def written_after_replication(self, x, y):
        h = F.linear(torch.cat([x, x]), self.weight)
        h[:, :2].copy_(y[:, :2])  # the two halves of h now differ
        return (F.linear(h, self.weight),)

    def base_written_through_an_alias(self, x, y):
        w = x + 0
        view = w[:, :4]
        replicated = torch.cat([view, view])  # a copy of the view's values now
        w.mul_(2)  # changes the view, not the copy
        return (F.linear(replicated, self.weight[:, :4]),)

    x, y = torch.randn(2, 8), torch.randn(4, 8)
    for forward in (written_after_replication, base_written_through_an_alias):
        module = exported(forward, x, y)
        with torch.no_grad():
            expected = module(x, y)
            fold_guidance_batch_graph(module)
            module.recompile()
            torch.testing.assert_close(module(x, y), expected)
