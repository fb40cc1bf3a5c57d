"""Fuse adaLN's modulate into its LayerNorm: `layer_norm(x) * (1 + scale) + shift` becomes one
`vdopt::layer_norm_modulate` node.

Every adaLN DiT block (DiT, PixArt, Latte, the reference teacher) normalises its input without affine
weights and then scales and shifts it by the timestep's modulation: three passes over the activations
where one does. On ONNX Runtime, `vdopt profile` gives the teacher's norms 3.0 % of a step and the
blocks' own elementwise ops (modulate, gates, residual adds) 6.8 % (bench/results/profile_teacher_onnx.json);
the op alone is 1.5-3x faster than its aten form (bench/results/ops.json). Where the step is compiled it
does not pay: Inductor fuses the same chain into its own kernel and must call an opaque op through its
proxy executor (0.94x on AOTInductor), and ONNX Runtime runs the op's function, the same arithmetic.
It is for the eager torch backend and for TensorRT, where the op is a plugin. It finds the chain by op and shape —
the norm without weight or bias, its only use multiplied by `scale + 1`, that product's only use added
to `shift`, scale and shift `[rows or 1, tokens or 1, width]` of the activations' dtype — and leaves
anything else alone (Wan normalises in float32 and casts back between the steps: not this chain).
Fusing an already fused program changes nothing; the input program is never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from vdopt.ops import library_path
from vdopt.pass_manager import Pass, register_fact, rewrite_graph
from vdopt.program import StepProgram

aten = torch.ops.aten


@dataclass(frozen=True)
class Modulated:
    norm: fx.Node
    gain: fx.Node  # scale + 1
    product: fx.Node
    result: fx.Node
    x: fx.Node
    scale: fx.Node
    shift: fx.Node
    eps: float


def value(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def other_operand(node: fx.Node, known: fx.Node):
    a, b = node.args[:2]
    return b if a is known else a if b is known else None


def broadcasts_over(modulation, x) -> bool:
    """[rows or 1, tokens or 1, width] of x's dtype (sizes compared as expressions: symbolic rows stay symbolic)."""
    m, v = value(modulation), value(x)
    return (isinstance(m, torch.Tensor) and m.dim() == 3 and m.dtype == v.dtype and m.shape[2] == v.shape[2]
            and all(str(m.shape[k]) in ("1", str(v.shape[k])) for k in (0, 1)))


def match(norm: fx.Node) -> Modulated | None:
    if norm.op != "call_function" or norm.target is not aten.layer_norm.default:
        return None
    x, shape, *rest = norm.args
    weight, bias, eps = (list(rest) + [None, None, 1e-5])[:3]
    if weight is not None or bias is not None or not isinstance(value(x), torch.Tensor) or value(x).dim() != 3:
        return None
    if list(shape) != [value(x).shape[-1]]:
        return None
    product = only_user(norm)
    if product is None or product.target is not aten.mul.Tensor:
        return None
    gain = other_operand(product, norm)
    if not isinstance(gain, fx.Node) or gain.target is not aten.add.Tensor or 1 not in gain.args[:2]:
        return None
    scale = other_operand(gain, 1)
    result = only_user(product)
    if not isinstance(scale, fx.Node) or result is None or result.target is not aten.add.Tensor:
        return None
    shift = other_operand(result, product)
    if not isinstance(shift, fx.Node) or not broadcasts_over(scale, x) or not broadcasts_over(shift, x):
        return None
    if value(result) is None or value(result).shape != value(x).shape:
        return None
    return Modulated(norm, gain, product, result, x, scale, shift, float(eps))


def chains(graph: fx.Graph) -> list[Modulated]:
    return [m for m in (match(node) for node in graph.nodes) if m is not None]


def fuse(graph: fx.Graph, chain: Modulated) -> None:
    with graph.inserting_before(chain.result):
        fused = graph.call_function(torch.ops.vdopt.layer_norm_modulate.default,
                                    (chain.x, chain.scale, chain.shift, chain.eps))
    fused.meta = {**chain.result.meta, "nn_module_stack": chain.norm.meta.get("nn_module_stack", {})}
    chain.result.replace_all_uses_with(fused)
    for node in (chain.result, chain.product, chain.norm):
        graph.erase_node(node)
    if not chain.gain.users:
        graph.erase_node(chain.gain)


def fuse_norm_modulate(program: StepProgram) -> StepProgram:
    library_path()  # the op library, built on first use

    def rewrite(module: fx.GraphModule) -> bool:
        found = chains(module.graph)
        for chain in found:
            fuse(module.graph, chain)
        return bool(found)

    result = rewrite_graph(program, rewrite)
    fused = sum(1 for n in result.ep.graph.nodes if n.target is torch.ops.vdopt.layer_norm_modulate.default)
    return result.replace(extras={**result.extras, "fused_norm_modulate": fused}) if result is not program else program


@register_fact("modulates_fused", "no LayerNorm followed by an adaLN modulate is left unfused in the step graph")
def modulates_fused(program: StepProgram) -> bool:
    return not chains(program.ep.graph)


PASS = Pass(name="fuse_norm_modulate", run=fuse_norm_modulate, doc=__doc__, requires=("uncached",),
            guarantees=("modulates_fused",))
