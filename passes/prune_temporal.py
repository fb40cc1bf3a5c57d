"""Temporal-layer pruning (SnapGen-V): remove whole transformer blocks from the step program.

A factorised video transformer (Latte, the reference teacher) spends a large share of its step in
temporal blocks, and SnapGen-V showed that a few of them can go for the target's latency if the
network is then fine-tuned to recover (`vdopt distill` with `prune:`). Nobody ships the removal as
a graph pass. This one takes block names or indices and deletes those blocks from the exported step:

- **what a block is** is the descriptor's business: `what: temporal` counts the descriptor's
  temporal blocks (`temporal_block_pattern`: Latte's `temporal_transformer_blocks.N`), `what: blocks`
  its main blocks (`block_pattern`). Families whose blocks mix space and time in one attention (Wan,
  CogVideoX, HunyuanVideo, LTX) have no temporal blocks; they are pruned with `what: blocks`.
- **removed means gone**: every node traced inside the block is erased explicitly (dead-code
  elimination alone keeps a block alive through its impure `_assert_tensor_metadata` nodes), each
  value the block hands on is replaced by the residual stream it continues, and the block's
  parameters and buffers leave the module before re-export, so they leave the program's state dict
  and the bundle. A block whose output does not continue an input of the same shape cannot be
  replaced by identity, and is refused.

The pass requires an uncached program (a cache is built on the block list it sees) and makes the
program pruned, which `reduce_steps` refuses (its weights file is for the whole network), so a
recipe runs reduce_steps -> prune_temporal -> insert_cache, by the passes' declared facts. Pruning
the same blocks again changes nothing; the input program is never written.
"""

from __future__ import annotations

from torch import fx

from vdopt.errors import PassError
from vdopt.module_stack import module_stack
from vdopt.pass_manager import Pass, module_paths, pruned_paths, register_fact, rewrite_graph
from vdopt.program import StepProgram
from vdopt.regions import block_indices, find_region

WHAT = ("temporal", "blocks")


def prunable_blocks(program: StepProgram, what: str) -> list[str]:
    """The module paths of the program's blocks of kind `what`, in execution order."""
    if what not in WHAT:
        raise PassError(f"prune_temporal: what '{what}' is not one of {', '.join(WHAT)}.")
    descriptor = program.descriptor
    if what == "temporal" and descriptor.temporal_block_pattern is None:
        raise PassError(f"prune_temporal: the {descriptor.family} family has no separate temporal blocks (its blocks "
                        f"attend over space and time together); prune whole blocks with what: blocks.")
    matches = descriptor.is_temporal_block if what == "temporal" else descriptor.is_block
    found = dict.fromkeys(fqn for node in program.ep.graph.nodes for fqn, _ in module_stack(node) if matches(fqn))
    return list(found)


def resolve_blocks(program: StepProgram, blocks: list[int | str], what: str) -> list[str]:
    """Module paths for `blocks`, given as indices among the original blocks of kind `what` or as module paths
    (the model's own, `temporal_transformer_blocks.2`, or the step graph's). Blocks pruned before are kept in the
    list (pruning them again changes nothing); a block the model never had is an error."""
    try:
        return program.descriptor.name_blocks(original_blocks(program, what), blocks, what)
    except ValueError as exc:
        raise PassError(f"prune_temporal: {exc}.") from None


def original_blocks(program: StepProgram, what: str) -> list[str]:
    """The model's blocks of kind `what` in execution order, as they were before any was pruned."""
    return program.extras.get("prunable", {}).get(what) or prunable_blocks(program, what)


def remove_block(module: fx.GraphModule, program: StepProgram, fqn: str) -> None:
    """Erases the block's nodes, hands each value it produced on as the residual stream it continues, and deletes
    its parameters, buffers and submodule."""
    graph = module.graph
    indices = block_indices(graph, program.descriptor)
    number = next(index for node, index in indices.items() if any(path == fqn for path, _ in module_stack(node)))
    region = find_region(graph, program.descriptor, number, number + 1)
    unmatched = [out.name for k, out in enumerate(region.outputs) if k not in region.streams]
    if unmatched:
        raise PassError(f"prune_temporal: {fqn} hands on {', '.join(unmatched)}, which continue no input of the same "
                        f"shape, so the block cannot be replaced by identity.")
    members = set(region.nodes)
    for k, out in enumerate(region.outputs):
        out.replace_all_uses_with(region.inputs[region.streams[k]], delete_user_cb=lambda user: user not in members)
    for node in reversed(region.nodes):
        if any(user not in members for user in node.users):
            raise PassError(f"prune_temporal: '{node.name}' of {fqn} is read outside the block.")
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and str(node.target).startswith(f"{fqn}."):
            graph.erase_node(node)
    held = [str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(f"{fqn}.")]
    if held:
        raise PassError(f"prune_temporal: the graph still reads {', '.join(held)} after {fqn} was removed.")
    parent, _, name = fqn.rpartition(".")
    delattr(module.get_submodule(parent), name)


def prune_temporal(program: StepProgram, blocks: list[int | str], what: str = "temporal") -> StepProgram:
    if not isinstance(blocks, list) or not blocks:
        raise PassError("prune_temporal: blocks must be a non-empty list of block indices or module paths.")
    with program.tracing():
        names = resolve_blocks(program, blocks, what)
        original = original_blocks(program, what)
        pruned = program.extras.get("pruned", {})
        todo = [fqn for fqn in names if fqn not in pruned.get(what, [])]
        if not todo:
            return program
        removed = {*pruned.get(what, []), *todo}
        if len(removed) == len(original) and what == "blocks":
            raise PassError("prune_temporal: that would remove every block of the model.")

        def rewrite(module: fx.GraphModule) -> bool:
            for fqn in todo:
                remove_block(module, program, fqn)
            return True

        result = rewrite_graph(program, rewrite)
        return result.replace(extras={**result.extras, "pruned": {**pruned, what: [b for b in original if b in removed]},
                                      "prunable": {**program.extras.get("prunable", {}), what: original}})


@register_fact("pruned_blocks_absent", "every pruned block is gone from the graph's metadata and its parameters "
                                       "and buffers from the program's state")
def pruned_blocks_absent(program: StepProgram) -> bool:
    paths = pruned_paths(program)
    in_graph = module_paths(program.ep)
    prefixes = tuple(f"{fqn}." for fqn in paths)
    state = [*program.ep.state_dict, *program.ep.constants]
    return bool(paths) and not any(fqn in in_graph for fqn in paths) and not any(name.startswith(prefixes) for name in state)


PASS = Pass(name="prune_temporal", run=prune_temporal, doc=__doc__, requires=("blocks_found", "uncached"),
            guarantees=("pruned_blocks_absent",), invalidates=("unpruned",))
