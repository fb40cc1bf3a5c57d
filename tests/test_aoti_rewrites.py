"""What the AOTInductor lowering rewrites before compiling: a new program, the same function."""

from __future__ import annotations

import zipfile

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


class Convolutions(nn.Module):
    """A 3x3x3 convolution at batch 1 (the size PyTorch's CPU heuristic runs natively), a strided grouped 2-D one
    without bias, and a transposed one (left to Inductor)."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(6, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(8, 4, 3, stride=2, padding=(1, 0), groups=2, bias=False)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

    def forward(self, x):
        h = self.conv3d(x).mean(dim=2)
        return self.up(self.conv2d(h))


def test_cpu_convolutions_become_onednn_and_compute_the_same():
    torch.manual_seed(0)
    model = Convolutions().eval()
    x = torch.randn(1, 6, 4, 10, 10)
    ep = torch.export.export(model, (x,))
    before = str(ep.graph)

    rewritten = for_inductor(ep)

    assert str(ep.graph) == before
    assert count(rewritten, aten.conv3d.default) == count(rewritten, aten.conv2d.default) == 0
    assert count(rewritten, torch.ops.mkldnn._convolution_pointwise.default) == 2
    assert count(rewritten, aten.conv_transpose2d.input) == 1
    torch.testing.assert_close(rewritten.module()(x), model(x), rtol=1e-5, atol=1e-5)
    stacks = [n.meta["nn_module_stack"] for n in rewritten.graph.nodes if n.target is torch.ops.mkldnn._convolution_pointwise.default]
    assert [list(s.values())[-1][0] for s in stacks] == ["conv3d", "conv2d"]


def test_a_double_precision_convolution_stays():
    model = nn.Conv2d(2, 2, 3).double().eval()
    ep = torch.export.export(model, (torch.randn(1, 2, 5, 5, dtype=torch.float64),))
    assert for_inductor(ep) is ep


def test_the_compiled_package_calls_onednn_and_computes_the_eager_convolutions(tmp_path):
    torch.manual_seed(0)
    model = Convolutions().eval()
    x = torch.randn(1, 6, 4, 10, 10)
    package = torch._inductor.aoti_compile_and_package(for_inductor(torch.export.export(model, (x,))),
                                                       package_path=str(tmp_path / "conv.pt2"))
    with zipfile.ZipFile(package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp"))
    assert wrapper.count("mkldnn__convolution_pointwise(") == 2
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), model(x), rtol=1e-5, atol=1e-5)


class ConvolutionInABranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, flag):
        return torch.cond(flag, lambda x: self.conv(x), lambda x: x.clone(), (x,))


def test_a_convolution_inside_a_cond_branch_stays():
    ep = torch.export.export(ConvolutionInABranch().eval(), (torch.randn(1, 2, 6, 6), torch.tensor(True)))
    assert for_inductor(ep) is ep


class PatchEmbeddings(nn.Module):
    """A DiT's 2-D patch embedding (kernel = stride), a 3-D one without bias (kernel 1x2x2 over time too), and a
    strided convolution whose kernel is not its stride (oneDNN's)."""

    def __init__(self):
        super().__init__()
        self.patch2d = nn.Conv2d(5, 16, 4, stride=4)
        self.patch3d = nn.Conv3d(5, 16, (1, 2, 2), stride=(1, 2, 2), bias=False)
        self.strided = nn.Conv2d(5, 16, 3, stride=2, padding=1)

    def forward(self, x):
        frame = x[:, :, 0]
        return (self.patch2d(frame).flatten(2).transpose(1, 2), self.patch3d(x).flatten(2).transpose(1, 2),
                self.strided(frame))


def test_patch_embeddings_become_one_matmul_each_and_compute_the_same():
    torch.manual_seed(0)
    model = PatchEmbeddings().eval()
    x = torch.randn(2, 5, 3, 16, 16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    before = str(ep.graph)

    rewritten = for_inductor(ep)

    assert str(ep.graph) == before
    assert count(rewritten, aten.conv2d.default) == count(rewritten, aten.conv3d.default) == 0
    assert count(rewritten, aten.addmm.default) == count(rewritten, aten.mm.default) == 1
    assert count(rewritten, torch.ops.mkldnn._convolution_pointwise.default) == 1  # the strided 3x3 one
    for batch in (1, 2, 5):  # the batch stays dynamic
        y = torch.randn(batch, 5, 3, 16, 16)
        torch.testing.assert_close(rewritten.module()(y), model(y), rtol=1e-5, atol=1e-5)
    stacks = {list(n.meta["nn_module_stack"].values())[-1][0] for n in rewritten.graph.nodes
              if n.target in (aten.addmm.default, aten.mm.default, aten.permute.default, aten.clone.default)}
    assert stacks == {"patch2d", "patch3d"}
    assert all(isinstance(n.meta.get("val"), torch.Tensor) for n in rewritten.graph.nodes if n.op == "call_function")


def test_a_patch_embedding_that_does_not_tile_its_input_stays_a_convolution():
    model = nn.Conv2d(3, 4, 4, stride=4).eval()  # 18 is not a multiple of 4: the last row and column are dropped
    ep = torch.export.export(model, (torch.randn(1, 3, 18, 18),))
    rewritten = for_inductor(ep)
    assert count(rewritten, aten.addmm.default) == 0 and count(rewritten, torch.ops.mkldnn._convolution_pointwise.default) == 1


def test_the_compiled_package_runs_a_patch_embedding_as_a_gemm(tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(5, 16, 4, stride=4).eval()
    x = torch.randn(2, 5, 16, 16)
    package = torch._inductor.aoti_compile_and_package(for_inductor(torch.export.export(model, (x,))),
                                                       package_path=str(tmp_path / "patch.pt2"))
    with zipfile.ZipFile(package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp"))
    assert "convolution" not in wrapper and wrapper.count("addmm_out(") == 1
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), model(x), rtol=1e-5, atol=1e-5)
