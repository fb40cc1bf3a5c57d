"""Hoist branch-invariant work out of the classifier-free-guidance batch.

With guidance the denoiser runs once on `cat([x, x])`, `t.expand(2B)` and `cat([cond, uncond])`.
Everything that depends only on the duplicated inputs -- the patch embedding of the latent, the
whole timestep-embedding MLP and the modulation it feeds -- is then computed twice on identical
rows: half of that work is wasted. This pass computes such values once at batch B and replicates
them (`cat([v] * k, 0)`) only where they meet something that differs between the branches (the
text embeddings, a batch-mixing op, the output). Backends get one batch-B input for those layers,
and TensorRT/ONNX see a smaller graph. The numbers do not change.

A value is replicated when it is `cat([a] * k, 0)` or `expand(a, [k, ...])` with `a.shape[0] == 1`.
Replication sinks past an op only if the op is on a conservative whitelist of row-wise ops and its
other tensor inputs broadcast over the batch (scalars, lower rank, or dim 0 of size 1). Values
that are written in place (directly or through a view) are never moved.

Its guarantee, `guidance_batch_folded`, is checked as a fixed point: the rewrite, run again on the
output, finds nothing left to fold.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from vdopt.pass_manager import Pass, editable_module, register_fact, rewrite_graph
from vdopt.program import StepProgram

aten = torch.ops.aten

# Node metadata worth keeping on a recomputed node (re-export recomputes shapes, not provenance).
PROVENANCE_META = ("nn_module_stack", "source_fn_stack", "stack_trace", "torch_fn")


@dataclass(frozen=True)
class Replica:
    """The original node equals `cat([base] * copies, 0)`; `base` has dim 0 of size `batch`."""

    base: fx.Node
    copies: int
    batch: int

    @property
    def group(self) -> tuple[int, int]:
        return self.copies, self.batch


@dataclass(frozen=True)
class Folding:
    args: tuple
    kwargs: dict
    group: tuple[int, int]


Replicas = dict[fx.Node, Replica]


# ----- reading nodes --------------------------------------------------------------------------

def value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node: Any) -> bool:
    return isinstance(value(node), torch.Tensor)


def rank(node: fx.Node) -> int:
    return value(node).dim()


def has_one_row(node: fx.Node) -> bool:
    rows = value(node).shape[0]
    return isinstance(rows, int) and rows == 1


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def normalized(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim


def dim_arg_off_batch(index: int, name: str, default: int | None = None, *, of_output: bool = False) -> Callable[[fx.Node], bool]:
    """The op's dim argument is not dim 0 (of its input, or of its output for unsqueeze)."""

    def check(node: fx.Node) -> bool:
        dim = argument(node, index, name, default)
        ndim = rank(node) if of_output else rank(node.args[0])
        return isinstance(dim, int) and normalized(dim, ndim) != 0

    return check


def dims_avoid_batch(index: int, name: str) -> Callable[[fx.Node], bool]:
    def check(node: fx.Node) -> bool:
        dims = argument(node, index, name)
        ndim = rank(node.args[0])
        return bool(dims) and all(isinstance(d, int) and normalized(d, ndim) != 0 for d in dims)

    return check


def normalizes_trailing_dims(node: fx.Node) -> bool:
    return len(node.args[1]) < rank(node.args[0])


def batched_convolution(node: fx.Node) -> bool:
    return rank(node.args[0]) == rank(node.args[1])


def permutation_keeps_batch(node: fx.Node) -> bool:
    return normalized(node.args[1][0], rank(node.args[0])) == 0


def transpose_keeps_batch(node: fx.Node) -> bool:
    ndim = rank(node.args[0])
    return all(normalized(d, ndim) != 0 for d in node.args[1:3])


def splits_off_batch(index: int, name: str) -> Callable[[fx.Node], bool]:
    """A multi-output split along a non-batch dim whose pieces are all taken with getitem."""
    dim_ok = dim_arg_off_batch(index, name, 0)
    return lambda node: dim_ok(node) and all(user.target is operator.getitem for user in node.users)


def asserts_no_size(node: fx.Node) -> bool:
    return argument(node, 1, "size") is None and argument(node, 2, "stride") is None


def inference_dropout(node: fx.Node) -> bool:
    return not argument(node, 2, "train", False)


# Ops computed independently per row, whose tensor inputs all broadcast against each other.
ELEMENTWISE = {
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.sin.default, aten.cos.default, aten.exp.default, aten.log.default, aten.neg.default,
    aten.abs.default, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.erf.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default, aten.clone.default,
}

# Ops whose first argument carries the batch in dim 0 and whose other inputs are per-model
# (weights, sizes); the predicate says when the op leaves dim 0 alone.
FIRST_ARG_ROWWISE: dict[Any, Callable[[fx.Node], bool]] = {
    aten.linear.default: lambda node: rank(node.args[0]) >= 2,
    aten.conv1d.default: batched_convolution,
    aten.conv2d.default: batched_convolution,
    aten.conv3d.default: batched_convolution,
    aten.convolution.default: batched_convolution,
    aten.layer_norm.default: normalizes_trailing_dims,
    aten.unsqueeze.default: dim_arg_off_batch(1, "dim", of_output=True),
    aten.squeeze.dim: dim_arg_off_batch(1, "dim"),
    aten.squeeze.dims: dims_avoid_batch(1, "dim"),
    aten.transpose.int: transpose_keeps_batch,
    aten.permute.default: permutation_keeps_batch,
    aten.flatten.using_ints: dim_arg_off_batch(1, "start_dim", 0),
    aten.unflatten.int: dim_arg_off_batch(1, "dim"),
    aten.slice.Tensor: dim_arg_off_batch(1, "dim", 0),
    aten.select.int: dim_arg_off_batch(1, "dim"),
    aten.mean.dim: dims_avoid_batch(1, "dim"),
    aten.sum.dim_IntList: dims_avoid_batch(1, "dim"),
    aten.chunk.default: splits_off_batch(2, "dim"),
    aten.split.Tensor: splits_off_batch(2, "dim"),
    aten.split_with_sizes.default: splits_off_batch(2, "dim"),
    aten.unbind.int: splits_off_batch(1, "dim"),
    aten.dropout.default: inference_dropout,
    aten._assert_tensor_metadata.default: asserts_no_size,
}

SIZED = {aten.view.default, aten.reshape.default, aten.expand.default}


# ----- where replication starts ---------------------------------------------------------------

def replication_seed(node: fx.Node) -> Replica | None:
    """`cat([a] * k, 0)` or `expand(a, [k, ...])` with a's dim 0 of size 1; the base is `a`."""
    if node.target is aten.cat.default:
        tensors, dim = node.args[0], argument(node, 1, "dim", 0)
        first = tensors[0] if tensors else None
        if len(tensors) >= 2 and all(t is first for t in tensors) and is_tensor(first) and rank(first) > 0 \
                and normalized(dim, rank(first)) == 0 and isinstance(value(first).shape[0], int):
            return Replica(first, len(tensors), value(first).shape[0])
    if node.target is aten.expand.default:
        source, sizes = node.args[0], node.args[1]
        if is_tensor(source) and rank(source) == len(sizes) > 0 and has_one_row(source) \
                and isinstance(sizes[0], int) and sizes[0] > 1:
            return Replica(source, sizes[0], 1)
    return None


def written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """Nodes sharing storage (through views, either way) with something an in-place op writes."""
    parent: dict[fx.Node, fx.Node] = {}

    def root(node: fx.Node) -> fx.Node:
        while node in parent:
            node = parent[node]
        return node

    def share_storage(a: fx.Node, b: fx.Node) -> None:
        if root(a) is not root(b):
            parent[root(a)] = root(b)

    writes = []
    for node in graph.nodes:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            share_storage(node, node.args[0])
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        returns_alias = any(r.alias_info is not None for r in schema.returns)
        for index, spec in enumerate(schema.arguments):
            arg = argument(node, index, spec.name)
            if isinstance(arg, fx.Node) and spec.alias_info is not None:
                if spec.alias_info.is_write:
                    writes.append(arg)
                if returns_alias:
                    share_storage(node, arg)
    written = {root(node) for node in writes}
    return {node for node in graph.nodes if root(node) in written}


# ----- folding one op -------------------------------------------------------------------------

def broadcasts_over_batch(arg: fx.Node, output_rank: int) -> bool:
    if not is_tensor(arg):
        return True  # a SymInt or other non-tensor value
    return rank(arg) < output_rank or has_one_row(arg)


def one_group(args: list[fx.Node], replicas: Replicas) -> tuple[int, int] | None:
    groups = {replicas[arg].group for arg in args}
    return groups.pop() if len(groups) == 1 else None


def to_bases(tree: Any, batched: set[fx.Node], replicas: Replicas) -> Any:
    return fx.node.map_arg(tree, lambda arg: replicas[arg].base if arg in batched else arg)


def fold_elementwise(node: fx.Node, replicas: Replicas) -> Folding | None:
    output_rank = rank(node)
    inputs = node.all_input_nodes
    batched = {arg for arg in inputs if arg in replicas and rank(arg) == output_rank}
    group = one_group(list(batched), replicas)
    if group is None or not all(arg in batched or broadcasts_over_batch(arg, output_rank) for arg in inputs):
        return None
    return Folding(to_bases(node.args, batched, replicas), to_bases(node.kwargs, batched, replicas), group)


def fold_first_arg(node: fx.Node, replicas: Replicas) -> Folding | None:
    source = node.args[0] if node.args else None
    others = [arg for arg in node.all_input_nodes if arg is not source]
    if source not in replicas or any(arg in replicas for arg in others) or not FIRST_ARG_ROWWISE[node.target](node):
        return None
    return Folding((replicas[source].base, *node.args[1:]), dict(node.kwargs), replicas[source].group)


def fold_sized(node: fx.Node, replicas: Replicas) -> Folding | None:
    """view/reshape/expand that keep dim 0 as the literal batch size k*B, rewritten to B."""
    source, sizes = node.args[0], node.args[1]
    if source not in replicas or any(arg in replicas for arg in node.all_input_nodes if arg is not source):
        return None
    replica = replicas[source]
    keeps_batch = sizes[0] == replica.copies * replica.batch
    if node.target is aten.expand.default:
        keeps_batch = len(sizes) == rank(source) and (sizes[0] == -1 or keeps_batch)
    if not keeps_batch or not isinstance(sizes[0], int):
        return None
    batch = sizes[0] if sizes[0] == -1 else replica.batch
    return Folding((replica.base, [batch, *sizes[1:]], *node.args[2:]), dict(node.kwargs), replica.group)


def fold_cat_off_batch(node: fx.Node, replicas: Replicas) -> Folding | None:
    tensors, dim = node.args[0], argument(node, 1, "dim", 0)
    output_rank = rank(node)
    if normalized(dim, output_rank) == 0 or not all(t in replicas and rank(t) == output_rank for t in tensors):
        return None
    group = one_group(tensors, replicas)
    return None if group is None else Folding(([replicas[t].base for t in tensors], dim), {}, group)


def fold_type_as(node: fx.Node, replicas: Replicas) -> Folding | None:
    """type_as reads only the dtype of its second argument, so that one may differ per row."""
    source, like = node.args
    if source not in replicas:
        return None
    like = replicas[like].base if like in replicas else like
    return Folding((replicas[source].base, like), {}, replicas[source].group)


def fold_getitem(node: fx.Node, replicas: Replicas) -> Folding | None:
    pieces, index = node.args
    if pieces not in replicas or not isinstance(value(pieces), (list, tuple)):
        return None
    return Folding((replicas[pieces].base, index), {}, replicas[pieces].group)


def folding(node: fx.Node, replicas: Replicas) -> Folding | None:
    """How to compute `node` on the bases of its replicated inputs, or None if it cannot be."""
    if node.target in ELEMENTWISE:
        return fold_elementwise(node, replicas)
    if node.target in FIRST_ARG_ROWWISE:
        return fold_first_arg(node, replicas)
    if node.target in SIZED:
        return fold_sized(node, replicas)
    if node.target is aten.cat.default:
        return fold_cat_off_batch(node, replicas)
    if node.target is aten.type_as.default:
        return fold_type_as(node, replicas)
    if node.target is operator.getitem:
        return fold_getitem(node, replicas)
    return None


def keeps_rows(node: fx.Node, group: tuple[int, int]) -> bool:
    """The folded op's output still has the k*B rows its replica claims (or is a tuple of such)."""
    out = value(node)
    if node.target is aten._assert_tensor_metadata.default:
        return True  # returns nothing
    if isinstance(out, (list, tuple)):
        return all(isinstance(piece, torch.Tensor) and piece.dim() > 0 and piece.shape[0] == group[0] * group[1] for piece in out)
    return isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == group[0] * group[1]


def sym_size_off_batch(node: fx.Node, replicas: Replicas) -> bool:
    return node.target is aten.sym_size.int and node.args[0] in replicas and normalized(node.args[1], rank(node.args[0])) != 0


# ----- the rewrite ----------------------------------------------------------------------------

def materialize(graph: fx.Graph, replicas: Replicas, folded: list[fx.Node]) -> None:
    """Gives every consumer that was not folded `cat([base] * k, 0)`, built just before the first."""
    folded_set = set(folded)
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in folded:
        consumers = [user for user in node.users if user not in folded_set]
        if not consumers:
            continue
        replica = replicas[node]
        with graph.inserting_before(min(consumers, key=position.__getitem__)):
            full = graph.call_function(aten.cat.default, ([replica.base] * replica.copies, 0))
        for user in consumers:
            user.replace_input_with(node, full)


def fold_guidance_batch_graph(module: fx.GraphModule) -> bool:
    """Rewrites `module` in place; returns whether anything was folded."""
    graph = module.graph
    written = written_in_place(graph)
    replicas: Replicas = {}
    folded: list[fx.Node] = []  # originals now computed on a base, in graph order
    seeds: list[fx.Node] = []
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node in written:
            continue
        seed = replication_seed(node)
        if seed is not None and seed.base not in written:
            inner = replicas.get(seed.base)
            if inner is None:
                replicas[node] = seed
                seeds.append(node)
            else:  # cat of an already replicated value: replicate the inner base further
                replicas[node] = Replica(inner.base, seed.copies * inner.copies, inner.batch)
                folded.append(node)
            continue
        if sym_size_off_batch(node, replicas):
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.call_function(aten.sym_size.int, (replicas[node.args[0]].base, node.args[1])))
            graph.erase_node(node)
            changed = True
            continue
        if not any(arg in replicas for arg in node.all_input_nodes):
            continue
        plan = folding(node, replicas)
        if plan is None or not keeps_rows(node, plan.group):
            continue
        with graph.inserting_before(node):
            base = graph.call_function(node.target, plan.args, plan.kwargs)
        base.meta.update({key: node.meta[key] for key in PROVENANCE_META if key in node.meta})
        replicas[node] = Replica(base, *plan.group)
        folded.append(node)
    if not folded and not changed:
        return False
    materialize(graph, replicas, folded)
    for node in reversed(folded):
        graph.erase_node(node)
    for node in reversed(seeds):
        if not node.users:
            graph.erase_node(node)
    return True


def fold_guidance_batch(program: StepProgram) -> StepProgram:
    return rewrite_graph(program, fold_guidance_batch_graph)


@register_fact("guidance_batch_folded", "no branch-invariant work is left in the guidance batch: "
                                        "the fold finds nothing more to move")
def guidance_batch_folded(program: StepProgram) -> bool:
    with program.tracing():
        return not fold_guidance_batch_graph(editable_module(program))


PASS = Pass(
    name="fold_guidance_batch",
    run=fold_guidance_batch,
    doc=__doc__,
    requires=("guidance",),
    guarantees=("guidance_batch_folded",),
)
