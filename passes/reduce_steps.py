"""Step reduction: run a few-step distilled denoiser without guidance.

A 50-step guided teacher costs 100 network evaluations per video; a step-distilled student
(AccVideo, LightX2V, FastVideo, or `vdopt distill`) needs 4 and no classifier-free guidance. The
student differs from the teacher in three things only, and this pass applies all three to the
captured step program:

1. **Weights.** A full state dict of the denoiser (safetensors or torch), or a LoRA merged into
   the base weights, `W += lora_scale * (B @ A) * (alpha / rank)`. LoRA keys in the common layouts
   are mapped onto the program's parameters: diffusers/peft (`<module>.lora_A.weight`,
   `lora_B.weight`), kohya (`lora_unet_<module with _ for .>.lora_down.weight`, `lora_up`, `.alpha`)
   and the ComfyUI/LightX2V layout (`diffusion_model.<module>`, original Wan module names,
   `.diff`/`.diff_b` full deltas for norms and biases). Unknown keys are an error that lists them.
2. **Step table.** The `timesteps`/`sigmas` buffers become the student's schedule: an explicit
   list of model timesteps (`[1000, 750, 500, 250]`, as the distilled checkpoints publish it,
   sigma = t / 1000) or `steps` + `shift` of the flow-match schedule. `program.step_table` (and so
   the manifest's `num_steps`) follows.
3. **No guidance** (unless `keep_guidance`). The captured step runs the denoiser on
   `cat([x, x])`, `t.expand(2B)`, `cat([cond, uncond])` and combines `u + g * (c - u)`. The pass
   finds that structure in the graph -- the uncond inputs, the batch-doubling `cat`/`expand`
   seeds, the two-way split of the output -- and removes it: the denoiser then runs at batch B
   on `x`, `t` and `cond`, its output is the prediction, and the `uncond.*` inputs are dropped.
   Because a static batch is baked into the graph's reshapes (`reshape(h, [2B, F, ...])`), every
   value computed from the doubled batch is tracked with the dimension that holds the batch, and
   the size arguments that mention it are halved. An op the tracker does not know, or one that
   mixes the two branches (a reduction over the batch), is an error that names the node.

It must run before `fold_guidance_batch` (a lowering-prep pass, which runs after the recipe's
passes anyway), before `insert_cache` (a cache is built for the schedule and the rows it sees) and
before `prune_temporal` (a weights file is for the whole network).
Applying it twice with the same parameters changes nothing: a merged weights file is recorded by its
digest and not merged again. The input program is never written: the merged weights are new tensors
of the output, so one capture can take a LoRA twice (calibration reuses one capture for every trial).
"""

from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from vdopt.errors import PassError
from vdopt.module_stack import STEP_PROGRAM, module_path
from vdopt.pass_manager import Pass, editable_module
from vdopt.program import StepProgram

aten = torch.ops.aten

# ===== 1. weights ===========================================================================

LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_A.default.weight": "A", ".lora_B.default.weight": "B",
    ".lora_down.weight": "A", ".lora_up.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
KEY_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# Original (non-diffusers) module names of a family -> diffusers names. ComfyUI and LightX2V
# publish Wan LoRAs against the original Wan code.
ORIGINAL_NAMES: dict[str, list[tuple[str, str]]] = {
    "wan": [
        (r"\.self_attn\.(q|k|v)\b", r".attn1.to_\1"), (r"\.self_attn\.o\b", r".attn1.to_out.0"),
        (r"\.self_attn\.norm_(q|k)\b", r".attn1.norm_\1"),
        (r"\.cross_attn\.(q|k|v)\b", r".attn2.to_\1"), (r"\.cross_attn\.o\b", r".attn2.to_out.0"),
        (r"\.cross_attn\.norm_(q|k)\b", r".attn2.norm_\1"),
        (r"\.ffn\.0\b", r".ffn.net.0.proj"), (r"\.ffn\.2\b", r".ffn.net.2"), (r"\.norm3\b", r".norm2"),
        (r"\.modulation$", r".scale_shift_table"),
        (r"^head\.head\b", r"proj_out"), (r"^head\.modulation$", r"scale_shift_table"),
        (r"^text_embedding\.0\b", r"condition_embedder.text_embedder.linear_1"),
        (r"^text_embedding\.2\b", r"condition_embedder.text_embedder.linear_2"),
        (r"^time_embedding\.0\b", r"condition_embedder.time_embedder.linear_1"),
        (r"^time_embedding\.2\b", r"condition_embedder.time_embedder.linear_2"),
        (r"^time_projection\.1\b", r"condition_embedder.time_proj"),
    ],
}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise PassError(f"reduce_steps: weights file '{path}' not found.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"reduce_steps: '{path}' is not a safetensors file or a plain torch state dict ({type(exc).__name__}).") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PassError(f"reduce_steps: '{path}' must map parameter names to tensors.")
    return data, {}


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def is_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(s) for k in state for s in LORA_SUFFIXES if s not in (".alpha",))


@dataclass
class KeyIndex:
    """Maps checkpoint names (any prefix, kohya `_` form, original family names) to program names."""

    names: list[str]  # program parameter/buffer names (e.g. denoiser.model.blocks.0.attn1.to_q.weight)
    family: str
    by_suffix: dict[str, list[str]] = field(default_factory=dict)
    by_kohya: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = [n.split(".") for n in self.names]
        common = []
        for pieces in zip(*[p[:-1] for p in parts]) if parts else []:
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        self.root = "".join(piece + "." for piece in common)  # e.g. "denoiser.model."
        self.exact = set(self.names)
        for name in self.names:
            parts = name.split(".")
            for start in range(len(parts)):
                suffix = ".".join(parts[start:])
                self.by_suffix.setdefault(suffix, []).append(name)
                self.by_kohya.setdefault(suffix.replace(".", "_"), []).append(name)

    def candidates(self, key: str) -> list[str]:
        forms = [key]
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                forms.append(key[len(prefix):])
        for form in list(forms):
            renamed = form
            for pattern, repl in ORIGINAL_NAMES.get(self.family, []):
                renamed = re.sub(pattern, repl, renamed)
            if renamed != form:
                forms.append(renamed)
        return forms

    def lookup(self, key: str) -> str | None:
        """The one program name that `key` (a parameter name, e.g. `blocks.0.attn1.to_q.weight`) denotes."""
        for form in self.candidates(key):
            if self.root + form in self.exact:
                return self.root + form
        for form in self.candidates(key):
            found = self.by_suffix.get(form, [])
            if len(set(found)) == 1:
                return found[0]
        for prefix in KOHYA_PREFIXES:
            if key.startswith(prefix):
                kohya = key[len(prefix):].replace(".", "_")
                found = self.by_kohya.get(kohya, [])
                exact = [n for n in found if n.startswith(self.root) and n[len(self.root):].replace(".", "_") == kohya]
                if len(exact) == 1:
                    return exact[0]
                if len(set(found)) == 1:
                    return found[0]
        return None


def unknown_keys_error(path: Any, unknown: list[str], index: KeyIndex, what: str) -> PassError:
    example = next((n for n in index.names if n.endswith(".weight")), index.names[0] if index.names else "?")
    return PassError(
        f"reduce_steps: {len(unknown)} {what} key(s) in '{path}' match no parameter of the program "
        f"(first: {', '.join(unknown[:5])}). Expected diffusers module names such as "
        f"'{example.split('.', 2)[-1] if example.count('.') > 1 else example}', optionally prefixed with "
        f"{', '.join(repr(p) for p in KEY_PREFIXES[:3])} or in kohya form 'lora_unet_<module_with_underscores>'. "
        f"Check that the file was made for this model family and size."
    )


def full_state_updates(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], index: KeyIndex, path: Any) -> dict[str, torch.Tensor]:
    updates, unknown, wrong = {}, [], []
    for key, tensor in state.items():
        name = index.lookup(key)
        if name is None:
            unknown.append(key)
        elif tuple(tensor.shape) != tuple(params[name].shape):
            wrong.append(f"{key} {tuple(tensor.shape)} vs {tuple(params[name].shape)}")
        else:
            updates[name] = tensor
    if unknown:
        raise unknown_keys_error(path, unknown, index, "state-dict")
    if wrong:
        raise PassError(f"reduce_steps: {len(wrong)} tensor(s) in '{path}' have the wrong shape for this program "
                        f"(first: {'; '.join(wrong[:3])}). The weights are for a different model size or config.")
    if not updates:
        raise PassError(f"reduce_steps: '{path}' holds no tensors.")
    return updates


def lora_updates(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], index: KeyIndex, scale: float, path: Any) -> dict[str, torch.Tensor]:
    """New values of the parameters a LoRA touches: W + scale * (B @ A) * alpha / rank (+ diffs)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        suffix = next((s for s in sorted(LORA_SUFFIXES, key=len, reverse=True) if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = tensor
    if unknown:
        raise unknown_keys_error(path, unknown, index, "non-LoRA")
    updates: dict[str, torch.Tensor] = {}
    unmatched = []
    for module, parts in groups.items():
        weight = index.lookup(module + ".weight")
        bias = index.lookup(module + ".bias")
        target = weight or (index.lookup(module) if "diff" in parts else None)
        if target is None:
            unmatched.append(module)
            continue
        if "A" in parts or "B" in parts:
            if not ("A" in parts and "B" in parts):
                raise PassError(f"reduce_steps: LoRA module '{module}' in '{path}' has only one of its down/up (A/B) matrices.")
            down, up = parts["A"].float(), parts["B"].float()
            rank = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
            base = updates.get(weight, params[weight]).float()
            delta = (up.flatten(1) @ down.flatten(1))
            if delta.numel() != base.numel():
                raise PassError(f"reduce_steps: LoRA '{module}' in '{path}' gives a {tuple(delta.shape)} update for "
                                f"'{weight}' of shape {tuple(base.shape)}: wrong model size.")
            updates[weight] = (base + scale * (alpha / rank) * delta.reshape(base.shape)).to(params[weight].dtype)
        if "diff" in parts:
            name = weight if weight is not None else target
            base = updates.get(name, params[name]).float()
            if parts["diff"].shape != base.shape:
                raise PassError(f"reduce_steps: '{module}.diff' in '{path}' has shape {tuple(parts['diff'].shape)}, "
                                f"'{name}' has {tuple(base.shape)}.")
            updates[name] = (base + scale * parts["diff"].float()).to(params[name].dtype)
        if "diff_b" in parts:
            if bias is None or parts["diff_b"].shape != params[bias].shape:
                raise PassError(f"reduce_steps: '{module}.diff_b' in '{path}' fits no bias of the program.")
            updates[bias] = (updates.get(bias, params[bias]).float() + scale * parts["diff_b"].float()).to(params[bias].dtype)
    if unmatched:
        raise unknown_keys_error(path, unmatched, index, "LoRA module")
    return updates


def replace_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Points `module`'s parameter or buffer `name` at `value`. The old tensor is left alone: the
    unlifted module shares it with the input program (`ExportedProgram.module()` copies no weights)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    old = getattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)


def checkpoint(program: StepProgram, weights: str | Path) -> dict[str, torch.Tensor]:
    """The weights file's tensors: a LoRA as it is, a full state dict in the family's names. Read
    outside the capture's FakeTensorMode, which cannot hold a file's storage."""
    state, _ = read_weights(weights)
    return state if is_lora(state) else program.descriptor.checkpoint_state(state)


def swap_weights(module: torch.nn.Module, program: StepProgram, state: dict[str, torch.Tensor], weights: str | Path,
                 lora_scale: float) -> dict[str, Any]:
    """Gives `module` (the unlifted program) the distilled weights `state` (read from `weights`) as new
    tensors; returns a record."""
    tables = set(program.step_table)
    params = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if n not in tables}
    index = KeyIndex(list(params), program.descriptor.family)
    lora = is_lora(state)
    updates = lora_updates(state, params, index, lora_scale, weights) if lora else full_state_updates(state, params, index, weights)
    for name, value in updates.items():
        replace_tensor(module, name, value.to(params[name].dtype))
    return {"kind": "lora" if lora else "state_dict", "tensors": len(updates), "of": len(params)}


# ===== 2. step table ========================================================================

def student_table(program: StepProgram, timesteps: list[float] | None, steps: int | None, shift: float | None) -> dict[str, torch.Tensor]:
    sampler = program.recipe.sampler
    if timesteps is not None:
        if sampler.kind != "flow_euler":
            raise PassError("reduce_steps: an explicit `timesteps` list needs a flow_euler sampler; give `steps` for ddim.")
        values = [float(t) for t in timesteps]
        if not values or any(not 0 < t <= 1000 for t in values) or any(a <= b for a, b in zip(values, values[1:])):
            raise PassError(f"reduce_steps: timesteps must be decreasing values in (0, 1000], got {timesteps}.")
        ts = torch.tensor(values, dtype=torch.float32)
        return {"timesteps": ts, "sigmas": torch.cat([ts / 1000.0, torch.zeros(1)])}
    from vdopt.sampler import step_table

    changes = {"steps": steps if steps is not None else sampler.steps}
    if shift is not None:
        changes["shift"] = shift
    return step_table(sampler.model_copy(update=changes))


def set_tables(module: torch.nn.Module, table: dict[str, torch.Tensor]) -> None:
    for name, values in table.items():
        old = getattr(module, name, None)
        if not isinstance(old, torch.Tensor):
            raise PassError(f"reduce_steps: the step program has no '{name}' table buffer to replace.")
        module.register_buffer(name, values.to(old.dtype).clone())


# ===== 3. removing the guidance batch ======================================================

def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node: Any) -> bool:
    return isinstance(val(node), torch.Tensor)


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def set_argument(node: fx.Node, index: int, name: str, value: Any) -> None:
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def root_scope(node: fx.Node) -> bool:
    """The node is the step module's own code (guidance, sampler), not inside the denoiser."""
    return module_path(node) == STEP_PROGRAM


def where(node: fx.Node) -> str:
    path = module_path(node)
    return f"node '{node.name}' ({node.target}{', in ' + path if path else ''})"


SAME_SHAPE = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
              aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.contiguous.default,
              aten.clone.default, aten.detach.default, aten.alias.default, aten.type_as.default, aten.dropout.default}
REDUCE_DIMS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
               aten.std.correction, aten.var_mean.correction}
DIM_OPS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
           aten.cumsum.default, aten.index_select.default}
SIZE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class BatchHalver:
    """Tracks which values held the doubled (cond + uncond) batch and at which dimension."""

    def __init__(self, graph: fx.Graph, batch: int):
        self.graph = graph
        self.batch = batch
        self.bdim: dict[fx.Node, int] = {}
        self.edits: list[tuple[fx.Node, int, str, Any]] = []  # (node, arg index, arg name, new value)
        self.seeds: dict[fx.Node, fx.Node] = {}  # doubled value -> its batch-B base
        self.splits: list[fx.Node] = []

    def fail(self, node: fx.Node, why: str) -> PassError:
        return PassError(f"reduce_steps: cannot remove the guidance batch at {where(node)}: {why}. "
                         f"Set keep_guidance: true, or report the op so the pass learns it.")

    def shape(self, node: fx.Node) -> tuple:
        return tuple(val(node).shape)

    def halve(self, node: fx.Node, size: Any) -> Any:
        if size == -1:
            return -1
        if isinstance(size, fx.Node):
            with self.graph.inserting_before(node):
                return self.graph.call_function(operator.floordiv, (size, 2))
        if isinstance(size, int) and size % 2 == 0:
            return size // 2
        raise self.fail(node, f"the batch dimension has size {size}, which is not the doubled batch")

    def prefix_is_one(self, node: fx.Node, dim: int) -> bool:
        return all(s == 1 for s in self.shape(node)[:dim])

    # ----- one node -----------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op != "call_function":
            return
        batched = [a for a in node.all_input_nodes if a in self.bdim]
        target = node.target
        if target is operator.getitem:
            if node.args[0] in self.bdim:
                self.bdim[node] = self.bdim[node.args[0]]
            return
        if not batched:
            return
        out = val(node)
        d = self.bdim[batched[0]]
        if target is aten.sym_size.int or target is aten._assert_tensor_metadata.default:
            if target is aten._assert_tensor_metadata.default:
                for index, name in ((1, "size"), (2, "stride")):
                    if argument(node, index, name) is not None:
                        self.edits.append((node, index, name, None))
            return
        if target in SAME_SHAPE:
            src = node.args[0]
            if src in self.bdim:
                self.bdim[node] = self.bdim[src]
            return
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            self.bdim[node] = self.broadcast(node, batched)
            return
        rank = len(self.shape(batched[0])) if is_tensor(batched[0]) else 0
        if target is aten.linear.default:
            self.require(node, node.args[0] in self.bdim and d < rank - 1 and len(batched) == 1, "linear over the batch")
            self.bdim[node] = d
        elif target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default, aten.group_norm.default):
            self.require(node, d == 0 and len(batched) == 1, "convolution/group norm with the batch off dim 0")
            self.bdim[node] = 0
        elif target in (aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default):
            self.require(node, d < rank - len(node.args[1]) and len(batched) == 1, "normalises over the batch")
            self.bdim[node] = d
        elif target in DIM_OPS:
            dim = argument(node, 1, "dim") % rank
            self.require(node, dim != d and len(batched) == 1 and node.args[0] in self.bdim, "works along the batch")
            self.bdim[node] = d
        elif target in REDUCE_DIMS:
            dims = argument(node, 1, "dim")
            keep = argument(node, 3 if target in (aten.var.correction, aten.std.correction, aten.var_mean.correction) else 2, "keepdim", False)
            self.require(node, bool(dims) and len(batched) == 1, "reduces every dimension, the batch included")
            dims = [x % rank for x in dims]
            self.require(node, d not in dims, "reduces over the batch (mixes the guidance branches)")
            self.bdim[node] = d if keep else d - sum(1 for x in dims if x < d)
        elif target is aten.unsqueeze.default:
            dim = node.args[1] % (rank + 1)
            self.bdim[node] = d + 1 if dim <= d else d
        elif target in (aten.squeeze.dim, aten.squeeze.dims):
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            dims = [x % rank for x in dims if self.shape(node.args[0])[x % rank] == 1]
            self.require(node, d not in dims, "squeezes the batch")
            self.bdim[node] = d - sum(1 for x in dims if x < d)
        elif target is aten.permute.default:
            self.bdim[node] = [x % rank for x in node.args[1]].index(d)
        elif target is aten.transpose.int:
            a, b = node.args[1] % rank, node.args[2] % rank
            self.bdim[node] = b if d == a else a if d == b else d
        elif target is aten.t.default:
            self.bdim[node] = 1 - d if rank == 2 else d
        elif target is aten.flatten.using_ints:
            start, end = argument(node, 1, "start_dim", 0) % rank, argument(node, 2, "end_dim", -1) % rank
            if start <= d <= end:
                self.require(node, all(s == 1 for s in self.shape(node.args[0])[start:d]), "flattens the batch behind other dims")
                self.bdim[node] = start
            else:
                self.bdim[node] = d - (end - start) if d > end else d
        elif target is aten.unflatten.int:
            dim, sizes = node.args[1] % rank, list(node.args[2])
            if dim == d:
                out_shape = self.shape(node)[dim: dim + len(sizes)]
                j = next(k for k, s in enumerate(out_shape) if s != 1)
                sizes[j] = self.halve(node, sizes[j])
                self.edits.append((node, 2, "sizes", sizes))
                self.bdim[node] = dim + j
            else:
                self.bdim[node] = d + len(sizes) - 1 if dim < d else d
        elif target in SIZE_OPS:
            self.require(node, self.prefix_is_one(node.args[0], d), "reshapes the batch behind other dims")
            sizes = list(node.args[1])
            j = next((k for k, s in enumerate(self.shape(node)) if s != 1), None)
            self.require(node, j is not None, "reshape to a single element")
            sizes[j] = self.halve(node, sizes[j])
            self.edits.append((node, 1, "size", sizes))
            self.bdim[node] = j
        elif target is aten.expand.default:
            sizes = list(node.args[1])
            j = d + len(sizes) - rank
            sizes[j] = -1
            self.edits.append((node, 1, "size", sizes))
            self.bdim[node] = j
        elif target is aten.repeat.default:
            j = d + len(node.args[1]) - rank
            self.require(node, node.args[1][j] == 1, "repeats along the batch")
            self.bdim[node] = j
        elif target is aten.repeat_interleave.self_int:
            dim = argument(node, 2, "dim")
            self.require(node, dim is not None, "repeat_interleave over the flattened tensor")
            dim = dim % rank
            if dim == d:
                self.require(node, self.prefix_is_one(node.args[0], d), "repeats the batch behind other dims")
                size = argument(node, 3, "output_size")
                if size is not None:
                    self.edits.append((node, 3, "output_size", self.halve(node, size)))
            self.bdim[node] = d
        elif target is aten.cat.default:
            tensors, dim = node.args[0], argument(node, 1, "dim", 0) % len(self.shape(node))
            dims = {self.bdim.get(t) for t in tensors}
            self.require(node, len(dims) == 1 and None not in dims and dim not in dims, "concatenates along the batch or mixes batched and other values")
            self.bdim[node] = dims.pop()
        elif target in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int):
            dim = argument(node, 1 if target is aten.unbind.int else 2, "dim", 0) % rank
            if dim == d:
                pieces = out if isinstance(out, (list, tuple)) else []
                self.require(node, target is not aten.unbind.int and len(pieces) == 2 and self.prefix_is_one(node.args[0], d)
                             and pieces[0].shape == pieces[1].shape, "splits the batch other than into the two guidance halves")
                self.splits.append(node)
                return
            self.bdim[node] = d - 1 if target is aten.unbind.int and dim < d else d
        elif target in (aten.slice.Tensor, aten.select.int, aten.narrow.default):
            dim = argument(node, 1, "dim", 0) % rank
            self.require(node, dim != d and node.args[0] in self.bdim, "slices the batch")
            self.bdim[node] = d - 1 if target is aten.select.int and dim < d else d
        elif target in (aten.scaled_dot_product_attention.default, aten.matmul.default, aten.bmm.default, aten.baddbmm.default):
            bd = self.broadcast(node, batched)
            self.require(node, bd < len(self.shape(node)) - 2, "attention/matmul over the batch dimension")
            self.bdim[node] = bd
        elif target is aten.einsum.default:
            self.bdim[node] = self.einsum(node)
        elif target is aten.copy_.default:
            self.require(node, node.args[0] in self.bdim, "copies doubled values into a value that is not doubled")
            self.bdim[node] = self.broadcast(node, batched)
        elif target in (aten.pad.default, aten.constant_pad_nd.default):
            self.require(node, d < rank - len(node.args[1]) // 2, "pads the batch")
            self.bdim[node] = d
        else:
            raise self.fail(node, "the op is not one the batch tracker knows")

    def require(self, node: fx.Node, ok: bool, why: str) -> None:
        if not ok:
            raise self.fail(node, why)

    def einsum(self, node: fx.Node) -> int:
        equation, operands = node.args[0].replace(" ", ""), node.args[1]
        self.require(node, "..." not in equation and "->" in equation, "einsum with an implicit or ellipsis output")
        ins, result = equation.split("->")
        letters = {ins.split(",")[k][self.bdim[t]] for k, t in enumerate(operands) if t in self.bdim}
        self.require(node, len(letters) == 1, "einsum combining batches in different dimensions")
        letter = letters.pop()
        for k, t in enumerate(operands):
            spec = ins.split(",")[k]
            if t not in self.bdim and letter in spec:
                self.require(node, self.shape(t)[spec.index(letter)] == 1, "einsum with a value that is not doubled along the batch")
        self.require(node, letter in result, "einsum contracting over the batch")
        return result.index(letter)

    def broadcast(self, node: fx.Node, batched: list[fx.Node]) -> int:
        out_rank = len(self.shape(node))
        dims = {self.bdim[a] + out_rank - len(self.shape(a)) for a in batched}
        if len(dims) != 1:
            raise self.fail(node, "combines values whose batch sits in different dimensions")
        bd = dims.pop()
        for a in node.all_input_nodes:
            if a in self.bdim or not is_tensor(a):
                continue
            aligned = bd - (out_rank - len(self.shape(a)))
            if aligned >= 0 and self.shape(a)[aligned] != 1:
                raise self.fail(node, f"combines the doubled batch with '{a.name}', which has {self.shape(a)[aligned]} rows and is not doubled")
        return bd


def guidance_combination(c: fx.Node, u: fx.Node) -> fx.Node | None:
    """`u + g * (c - u)` in any operand order, as an add node; None if the graph combines differently."""
    for sub in c.users:
        if sub.target is not aten.sub.Tensor or sub.args[:2] != (c, u):
            continue
        for mul in sub.users:
            if mul.target is not aten.mul.Tensor or sub not in mul.args[:2]:
                continue
            for add in mul.users:
                if add.target is aten.add.Tensor and set(add.args[:2]) == {u, mul}:
                    return add
    return None


def remove_guidance_graph(module: fx.GraphModule, input_names: list[str], batch: int) -> bool:
    """Rewrites `module`'s graph in place to the unguided program; returns whether there was guidance.

    The graph's signature changes (the uncond placeholders go), so call `plain_module` afterwards
    to get a module with a plain positional `forward` over the remaining inputs.
    """
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = dict(zip(input_names, placeholders))
    uncond = {by_name[n]: by_name.get("cond." + n.removeprefix("uncond.")) for n in input_names if n.startswith("uncond.")}
    if not uncond:
        return False
    halver = BatchHalver(graph, batch)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.cat.default and argument(node, 1, "dim", 0) % max(len(halver.shape(node)), 1) == 0 and len(node.args[0]) == 2:
            a, b = node.args[0]
            if a not in halver.bdim and b not in halver.bdim and (b is a or uncond.get(b) is a) and halver.shape(a)[0] == batch:
                halver.bdim[node], halver.seeds[node] = 0, a
                continue
        if node.target is aten.expand.default and root_scope(node) and node.args[0] not in halver.bdim and is_tensor(node.args[0]):
            src, sizes = node.args[0], list(node.args[1])
            if len(sizes) == len(halver.shape(src)) and halver.shape(src)[0] == 1 and sizes[0] == 2 * batch:
                halver.bdim[node] = 0
                halver.edits.append((node, 1, "size", [batch, *sizes[1:]]))
                continue
        halver.visit(node)
    if not halver.splits:
        raise PassError("reduce_steps: the program has uncond inputs but no two-way split of the denoiser output "
                        "(the guidance combination) was found in the graph.")
    output = next(n for n in graph.nodes if n.op == "output")
    leaked = [a for a in output.all_input_nodes if a in halver.bdim]
    if leaked:
        raise PassError(f"reduce_steps: the program's output {leaked[0].name} still carries the guidance batch.")
    # apply: the size edits, the seeds -> their bases, the split -> the (now batch-B) prediction
    for node, index, name, value in halver.edits:
        set_argument(node, index, name, value)
    for node, base in halver.seeds.items():
        node.replace_all_uses_with(base)
    for split in halver.splits:
        prediction = split.args[0]
        halves = {user.args[1]: user for user in split.users if user.target is operator.getitem}
        cond, unc = halves.get(0), halves.get(1)
        if cond is not None and unc is not None:
            combined = guidance_combination(cond, unc)
            if combined is not None:
                combined.replace_all_uses_with(prediction)
        for half in (cond, unc):  # any other use sees the single (conditional) prediction
            if half is not None:
                half.replace_all_uses_with(prediction)
    for node in [n for n in graph.nodes if n.op == "call_module" and all(a.op == "placeholder" for a in n.all_input_nodes) and not n.users]:
        graph.erase_node(node)  # the unlifted program's input guards; re-export makes new ones
    graph.eliminate_dead_code()
    for placeholder in uncond:
        if placeholder.users:
            raise PassError(f"reduce_steps: the uncond input '{placeholder.name}' is used outside the guidance batch "
                            f"(by {', '.join(u.name for u in placeholder.users)}).")
        graph.erase_node(placeholder)
    graph.lint()
    return True


def doubles_latent(program: StepProgram) -> bool:
    """The guidance batch is in its captured form: the graph concatenates the latent input with itself.
    After fold_guidance_batch the duplication sits deeper in the network, a form the halver is not tested on."""
    from vdopt.capture import user_input_nodes

    latent = user_input_nodes(program.ep)[0]
    return any(node.target is aten.cat.default and list(node.args[0]) == [latent, latent] for node in latent.users)


def plain_module(module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over the same graph and tensors, called positionally (no exported input spec)."""
    module.graph._codegen = fx.graph.CodeGen()
    return fx.GraphModule(module, module.graph)


# ===== the pass ==============================================================================

def reduce_steps(program: StepProgram, weights: str | None = None, lora_scale: float = 1.0,
                 timesteps: list[float] | None = None, steps: int | None = None, shift: float | None = None,
                 keep_guidance: bool = False) -> StepProgram:
    """The student's weights, step table and (unless `keep_guidance`) unguided batch; see the module docstring."""
    from vdopt.capture import export_step, io_specs

    if timesteps is not None and steps is not None and steps != len(timesteps):
        raise PassError(f"reduce_steps: give `timesteps` or `steps`, not both ({steps} steps vs {len(timesteps)} timesteps).")
    digest = f"{file_digest(weights)}@{float(lora_scale)}" if weights is not None else None
    merged = tuple(program.extras.get("merged_weights", ()))
    swap = digest is not None and digest not in merged
    table = student_table(program, timesteps, steps, shift) if (timesteps is not None or steps is not None or shift is not None) else None
    table_changed = table is not None and {k: v.tolist() for k, v in table.items()} != program.step_table
    drop_guidance = program.guidance and not keep_guidance
    if drop_guidance and not doubles_latent(program):
        raise PassError("reduce_steps: the guidance batch is not in its captured form (the step no longer runs the "
                        "denoiser on cat([x, x])): run it before fold_guidance_batch (list it in the recipe's passes; "
                        "lowering-prep passes run after them).")
    if not (swap or table_changed or drop_guidance):
        return program
    names = [s.name for s in program.inputs]
    distilled = checkpoint(program, weights) if swap else {}
    with program.tracing():
        module = editable_module(program)
        record: dict[str, Any] = {}
        if swap:
            record = swap_weights(module, program, distilled, weights, lora_scale)
        if table_changed:
            set_tables(module, table)
        example = program.example_inputs
        if drop_guidance:
            remove_guidance_graph(module, names, int(example[0].shape[0]))
            module = plain_module(module)
            keep = [k for k, n in enumerate(names) if not n.startswith("uncond.")]
            names, example = [names[k] for k in keep], tuple(example[k] for k in keep)
        try:
            ep = export_step(module, example, program.dims, program.multiples)
        except PassError:
            raise
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PassError(f"reduce_steps: re-exporting the reduced step program failed: {type(exc).__name__}: {first}") from exc
    inputs, outputs = io_specs(ep, names, [s.name for s in program.outputs], program.dims)
    new_table = {k: v.tolist() for k, v in table.items()} if table_changed else program.step_table
    sampler = program.recipe.sampler.model_copy(update={
        "steps": len(new_table["timesteps"]),
        **({"shift": shift} if shift is not None else {}),
        **({"guidance_scale": 1.0} if drop_guidance else {}),
    })
    extras = {**program.extras, "merged_weights": (*merged, digest) if swap else merged}
    if swap:
        extras["reduce_steps_weights"] = {"file": str(weights), **record}
    return program.replace(ep=ep, inputs=inputs, outputs=outputs, example_inputs=example, step_table=new_table,
                           guidance=program.guidance and not drop_guidance,
                           recipe=program.recipe.model_copy(update={"sampler": sampler}), extras=extras)


PASS = Pass(
    name="reduce_steps",
    run=reduce_steps,
    doc=__doc__,
    requires=("uncached", "unpruned"),
    guarantees=("step_table_in_graph", "guidance_matches_sampler"),
)
