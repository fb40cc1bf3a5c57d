"""Block regions of a step graph, found through the architecture descriptor.

A region is the span of graph nodes that computes transformer blocks [start, stop) — what a cache
skips or a pruning pass removes. Its inputs are the values it reads from before the span, its
outputs the values read after it. Each output that continues an input of the same shape (the
residual stream entering block `start`) is a *stream*: caching it means caching `out - in`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from vdopt.errors import PassError
from vdopt.families.base import ArchitectureDescriptor
from vdopt.module_stack import module_stack


def block_fqn(node: fx.Node, descriptor: ArchitectureDescriptor) -> str | None:
    for fqn, _ in module_stack(node):
        if descriptor.is_block(fqn) or descriptor.is_temporal_block(fqn):
            return fqn
    return None


def block_indices(graph: fx.Graph, descriptor: ArchitectureDescriptor) -> dict[fx.Node, int]:
    """Each block node's block number, counting blocks in execution order across all block lists
    (HunyuanVideo's dual- then single-stream blocks; Latte's spatial and temporal blocks alternate)."""
    order: dict[str, int] = {}
    indices = {}
    for node in graph.nodes:
        fqn = block_fqn(node, descriptor) if node.op == "call_function" else None
        if fqn is not None:
            indices[node] = order.setdefault(fqn, len(order))
    if not indices:
        raise PassError(f"no {descriptor.family} blocks (pattern '{descriptor.block_pattern}') in the step graph's metadata.")
    return indices


def block_count(graph: fx.Graph, descriptor: ArchitectureDescriptor) -> int:
    return max(block_indices(graph, descriptor).values()) + 1


def shape_of(node: fx.Node) -> tuple:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def numel_hint(node: fx.Node) -> int:
    count = 1
    for size in shape_of(node):
        count *= size if isinstance(size, int) else int(size.node.hint)
    return count


@dataclass
class Region:
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    streams: dict[int, int]  # output position -> input position whose value it continues
    last: fx.Node            # the last node of the span; replacements go after it

    def main_stream(self) -> tuple[fx.Node, fx.Node] | None:
        """(output, input) of the largest stream: the hidden states, not a small value the blocks share."""
        if not self.streams:
            return None
        out, inp = max(self.streams.items(), key=lambda kv: numel_hint(self.outputs[kv[0]]))
        return self.outputs[out], self.inputs[inp]


def find_region(graph: fx.Graph, descriptor: ArchitectureDescriptor, start: int, stop: int) -> Region:
    nodes = list(graph.nodes)
    indices = block_indices(graph, descriptor)
    positions = [k for k, n in enumerate(nodes) if indices.get(n) is not None and start <= indices[n] < stop]
    if not positions:
        raise PassError(f"blocks {start}..{stop - 1} are not in the step graph.")
    span = nodes[positions[0]: positions[-1] + 1]
    strays = sorted({indices[n] for n in span if indices.get(n) is not None and not start <= indices[n] < stop})
    if strays:
        raise PassError(f"blocks {start}..{stop - 1} interleave with blocks {strays} in the graph; they cannot be one region.")
    members: set[fx.Node] = set()
    for node in span:  # the blocks, and whatever in the span reads from them
        if node.op == "call_function" and (indices.get(node) is not None or any(a in members for a in node.all_input_nodes)):
            members.add(node)
    region_nodes = [n for n in span if n in members]
    inputs = list(dict.fromkeys(a for n in region_nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"))
    sizes = [n for n in inputs if n.target is torch.ops.aten.sym_size.int]
    if sizes:  # read sizes off their tensors inside the region, so no bare size crosses into it
        members.update(sizes)
        region_nodes = sizes + region_nodes
        inputs = list(dict.fromkeys(a for n in region_nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"))
    outputs = [n for n in region_nodes if n not in sizes and any(user not in members for user in n.users)]
    first_block_inputs = {a for n in region_nodes if indices.get(n) == start for a in n.all_input_nodes}
    later_inputs = {a for n in region_nodes if indices.get(n) not in (None, start) for a in n.all_input_nodes}
    streams = {}
    for o, out in enumerate(outputs):
        for k, inp in enumerate(inputs):
            if k not in streams.values() and inp in first_block_inputs and inp not in later_inputs and shape_of(inp) == shape_of(out):
                streams[o] = k
                break
    return Region(region_nodes, inputs, outputs, streams, span[-1])


def extract_region(module: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region as its own GraphModule: `body(*region.inputs) -> tuple(region.outputs)`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in region.inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env and arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)
        return env[arg]

    for node in region.nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[o] for o in region.outputs))
    return fx.GraphModule(module, graph)
