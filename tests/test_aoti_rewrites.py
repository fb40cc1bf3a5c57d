"""What the AOTInductor lowering rewrites before compiling: a new program, the same function."""

from __future__ import annotations

import torch
from torch import nn

from vdopt.lower.aoti import for_inductor

aten = torch.ops.aten


class TwoGelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.gelu(self.lin(x), approximate="tanh") + nn.functional.gelu(x)


def count(ep, target) -> int:
    return sum(1 for n in ep.graph.nodes if n.target is target)


def test_tanh_gelu_becomes_a_sigmoid_and_exact_gelu_stays():
    torch.manual_seed(0)
    model = TwoGelus().eval()
    x = torch.randn(4, 8) * 3
    ep = torch.export.export(model, (x,))
    before = str(ep.graph)

    rewritten = for_inductor(ep)

    assert str(ep.graph) == before  # the input program is untouched
    assert count(rewritten, aten.gelu.default) == 1 and count(rewritten, aten.sigmoid.default) == 1
    assert [n.kwargs.get("approximate", "none") for n in rewritten.graph.nodes if n.target is aten.gelu.default] == ["none"]
    torch.testing.assert_close(rewritten.module()(x), model(x), rtol=1e-6, atol=1e-6)
    sigmoid = next(n for n in rewritten.graph.nodes if n.target is aten.sigmoid.default)
    assert sigmoid.meta["nn_module_stack"] == next(n for n in ep.graph.nodes if n.target is aten.gelu.default).meta["nn_module_stack"]


def test_a_program_without_tanh_gelu_is_returned_as_it_is():
    ep = torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.GELU()), (torch.randn(2, 4),))
    assert for_inductor(ep) is ep
