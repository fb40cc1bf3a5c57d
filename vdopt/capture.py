"""Capture: load a denoiser, wrap it as the step program, and `torch.export` it.

The denoiser can come from a diffusers class plus a checkpoint, from a `torch.export.save`d
program, or from the project's reference model. Pickled whole modules run code when they are
loaded, so they are refused unless the user says `--trust-pickle`.
"""

from __future__ import annotations

import json
import re
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from vdopt.errors import CaptureError, VdoptError, first_line
from vdopt.families import descriptor_for
from vdopt.families.base import ArchitectureDescriptor
from vdopt.program import DTYPES, STEP_DIMS, StepProgram, TensorSpec, dtype_name, step_multiples
from vdopt.recipe import Recipe
from vdopt.safety import UnsafeInputError, evaluate_shape, load_exported_program, shape_expression
from vdopt.sampler import ddim_update, flow_euler_update, gather_step, step_table
from vdopt.validate import check_capture, check_model_config, check_weights


class StepModule(nn.Module):
    """`step(x, i, *cond, *uncond) -> (x_next,)`: denoiser + guidance + sampler update."""

    def __init__(self, denoiser: nn.Module, table: dict[str, torch.Tensor], sampler_kind: str, prediction: str,
                 guidance_scale: float, num_cond: int, guidance: bool, timestep_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.denoiser = denoiser
        self.timestep_dtype = timestep_dtype
        for name, values in table.items():
            self.register_buffer(name, values.clone())
        self.sampler_kind = sampler_kind
        self.prediction = prediction
        self.guidance_scale = guidance_scale
        self.num_cond = num_cond
        self.guidance = guidance

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, ...], uncond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not self.guidance:
            return self.denoiser(x, t.expand(x.shape[0]), *cond)
        both = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
        out = self.denoiser(torch.cat([x, x]), t.expand(2 * x.shape[0]), *both)
        # explicit sizes: chunk(2) guards (3 * batch - 1) // batch == 2, which export cannot prove for a symbolic batch
        out_cond, out_uncond = out.split([x.shape[0], x.shape[0]])
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def forward(self, x: torch.Tensor, i: torch.Tensor, *conds: torch.Tensor):
        cond, uncond = conds[: self.num_cond], conds[self.num_cond:]
        t = gather_step(self.timesteps, i).to(self.timestep_dtype)
        # as diffusers' pipelines and schedulers: the timestep in float32 (a bf16 999 is 1000), the update in
        # float32, the latent back in the model's dtype
        prediction, latent = self.predict(x, t, cond, uncond).float(), x.float()
        if self.sampler_kind == "flow_euler":
            x_next = flow_euler_update(latent, prediction, gather_step(self.sigmas, i), gather_step(self.sigmas, i, 1))
        else:
            x_next = ddim_update(latent, prediction, gather_step(self.alpha, i), gather_step(self.alpha_prev, i), self.prediction)
        return (x_next.to(x.dtype),)


class ExportedDenoiser(nn.Module):
    """A user's exported `(x, t, *cond) -> prediction` program, called as a module."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.signature = [n.meta.get("val") for n in user_input_nodes(program)]
        self.program = program.module()

    def train(self, mode: bool = True) -> "ExportedDenoiser":
        return self  # an exported program is already in inference form and refuses train()/eval()

    def forward(self, x, t, *cond):
        # Interpreting under preserve_node_meta copies each node's nn_module_stack into the new
        # trace, so the user's module structure stays visible to the descriptors and passes.
        with torch.fx.traceback.preserve_node_meta():
            out = torch.fx.Interpreter(self.program).run(x, t, *cond)
        return out[0] if isinstance(out, (tuple, list)) else out


# ----- loading ------------------------------------------------------------------------------

def model_config(recipe: Recipe, descriptor: ArchitectureDescriptor, model_path: str | Path | None = None) -> dict:
    """The model's config: the recipe's `model.config`, else a diffusers folder's config.json, else the family's
    tiny test config."""
    config = recipe.model.config
    if config is None and recipe.model.layout == "diffusers" and model_path is not None and Path(model_path).is_dir():
        return folder_config(Path(model_path), descriptor)
    if config is None:
        return dict(descriptor.tiny_config)
    if isinstance(config, str):
        path = Path(config)
        if not path.is_file():
            raise CaptureError(f"model.config: config file '{config}' not found.")
        config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise CaptureError(
            f"{path}: not a plain state dict ({type(exc).__name__}). If it is a pickled nn.Module, set "
            f"model.layout: pickled_module and pass --trust-pickle (unpickling runs code from the file)."
        ) from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CaptureError(f"{path}: expected a mapping of parameter names to tensors.")
    return data


MAX_INDEX_BYTES = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def shard_files(index: Path) -> list[Path]:
    """The shards a sharded checkpoint's `*.index.json` maps its tensors to: files beside the index only."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise CaptureError(f"{index}: {index.stat().st_size} bytes is far beyond a checkpoint index.")
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CaptureError(f"{index}: not a readable checkpoint index ({type(exc).__name__}).") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CaptureError(f"{index}: a sharded checkpoint's index maps tensor names to shard files under 'weight_map'; "
                           f"this one does not.")
    shards = []
    for name in sorted(set(weight_map.values())):
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name or not name.endswith(WEIGHT_SUFFIXES):
            raise UnsafeInputError(f"{index}: shard {name[:80]!r} is not a weights file beside the index; an index names "
                                   f"files in its own folder only.")
        if not (index.parent / name).is_file():
            raise CaptureError(f"{index}: shard '{name}' is missing from {index.parent}; copy the whole checkpoint folder.")
        shards.append(index.parent / name)
    return shards


def checkpoint_files(path: Path) -> list[Path]:
    """The weights files of a checkpoint: a file, a sharded checkpoint's `*.index.json`, or a folder holding one of
    those (a diffusers `save_pretrained` folder, plain or sharded)."""
    if path.name.endswith(".index.json"):
        return shard_files(path)
    if not path.is_dir():
        return [path]
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return shard_files(indexes[0])
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(path.glob(f"*{suffix}"))
        if len(found) == 1 and not indexes:
            return found
        if found or indexes:
            shown = ", ".join(p.name for p in (indexes or found)[:4])
            raise CaptureError(f"{path}: expected one weights file or one *.index.json in the folder, found "
                               f"{len(indexes or found)} ({shown}{', ...' if len(indexes or found) > 4 else ''}); give the "
                               f"file itself.")
    raise CaptureError(f"{path}: no weights in the folder (a {', '.join(WEIGHT_SUFFIXES)} file or a sharded checkpoint's "
                       f"*.index.json).")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (a file, a folder, or the shards of a sharded one) by name, in its stored dtype."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        shard = read_state_dict(file)
        twice = sorted(set(shard) & set(state))
        if twice:
            raise CaptureError(f"{path}: tensor '{twice[0]}' is stored in two shards; the checkpoint is damaged.")
        state.update(shard)
    return state


def folder_config(path: Path, descriptor: ArchitectureDescriptor) -> dict:
    """A diffusers folder's config.json, checked to be one of the family's class."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CaptureError(f"{path}: a diffusers folder holds a config.json beside its weights; this one has none.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CaptureError(f"{config_file}: not readable JSON ({type(exc).__name__}).") from None
    if not isinstance(config, dict):
        raise CaptureError(f"{config_file}: a model config is a JSON object.")
    stored = config.get("_class_name")
    if stored is not None and stored != descriptor.diffusers_class:
        raise CaptureError(f"{path}: the folder holds a {stored}, but model.family {descriptor.family} is a "
                           f"{descriptor.diffusers_class}. Set model.family to the folder's family.")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    check_model_config(config, descriptor, str(config_file))
    return config


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, family: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (first: {', '.join(wrong[:3])})")
        raise CaptureError(
            f"{path}: the checkpoint does not fit the {family} architecture of the recipe's model.config: "
            f"{'; '.join(parts)}. Check that model.family and model.config describe this checkpoint."
        )


def load_denoiser(recipe: Recipe, model_path: str | Path | None, trust_pickle: bool = False) -> tuple[nn.Module, ArchitectureDescriptor, dict]:
    """Returns the denoiser as `(x, t, *cond) -> prediction`, its descriptor and its config."""
    descriptor = descriptor_for(recipe.model.family)
    config = model_config(recipe, descriptor, model_path)
    layout = recipe.model.layout
    path = Path(model_path) if model_path is not None else None
    if path is not None and not path.exists():
        raise CaptureError(f"{path}: model file not found.")
    if layout == "exported_program":
        if path is None:
            raise CaptureError("model.layout is exported_program but no .pt2 file was given.")
        try:  # weights-only unpickling, guarded shape strings and guards unless --trust-pickle (vdopt.safety)
            return ExportedDenoiser(load_exported_program(path, trust_pickle=trust_pickle)), descriptor, config
        except VdoptError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"{path}: cannot load as a torch.export program ({type(exc).__name__}: "
                               f"{first_line(exc)[:200]}). Give a file written by torch.export.save.") from None
    if layout == "pickled_module":
        if not trust_pickle:
            raise CaptureError(
                f"{path}: model.layout is pickled_module, and unpickling a whole module runs arbitrary code from the "
                f"file. Re-run with --trust-pickle if you trust it, or save a state dict / safetensors instead."
            )
        module = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise CaptureError(f"{path}: the pickle holds a {type(module).__name__}, not an nn.Module.")
        return descriptor.adapter(module), descriptor, config
    if layout == "diffusers":
        if path is None or not path.is_dir():
            raise CaptureError(f"{path}: model.layout diffusers expects a folder with config.json and weights.")
    model = descriptor.build(config)
    if path is not None:
        state = descriptor.checkpoint_state(read_checkpoint(path))
        check_state_dict(model, state, path, descriptor.family)
        check_weights(state, model.state_dict(), path)
        model.load_state_dict(state)
    return descriptor.adapter(model), descriptor, config


def cast_weights(denoiser: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The floating weights in the recipe's dtype, except in the modules the model's class keeps in float32
    (diffusers' `_keep_in_fp32_modules`, matched on whole path components as `from_pretrained` matches them):
    the model's forward casts around those (Wan's time embedder and norms), so a bf16 bundle computes what
    `from_pretrained(torch_dtype=torch.bfloat16)` gives."""
    keep = {name for module in denoiser.modules() for name in getattr(type(module), "_keep_in_fp32_modules", None) or ()}
    for module_path, module in denoiser.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    continue  # float64 tables (position embeddings) stay as the model made them
                wanted = torch.float32 if keep & {*module_path.split("."), name} else dtype
                if tensor.dtype != wanted:
                    cast = tensor.detach().to(wanted)
                    table[name] = nn.Parameter(cast, requires_grad=False) if table is module._parameters else cast
    return denoiser


# ----- exporting ----------------------------------------------------------------------------

def latent_dims(recipe: Recipe, profile: dict[str, int] | None) -> dict[str, tuple[int, int]]:
    """The step's sizes, name -> (min, max): the batch, then the latent dims (a profile fixes those)."""
    spec = recipe.model.input
    dims = {name: (getattr(spec, name).min, getattr(spec, name).max) for name in STEP_DIMS}
    for name, size in (profile or {}).items():
        dims[name] = (size, size)
    return dims


def trace_sizes(recipe: Recipe, dims: dict[str, tuple[int, int]], multiples: tuple[int, int, int]) -> dict[str, int]:
    spec = recipe.model.input
    sizes = {}
    for name, multiple in step_multiples(multiples).items():
        lo, hi = dims[name]
        dim = getattr(spec, name)
        size = dim.trace_size if lo != hi else lo
        if name == "batch" and lo != hi and dim.opt is None:
            size = 2  # the cheapest size that keeps the batch symbolic
        size = min(max(size, lo), hi)
        sizes[name] = max(multiple, size - size % multiple)
        if lo != hi and sizes[name] < 2:  # a traced size of 1 would specialise the dimension
            sizes[name] = 2 * multiple
    return sizes


def root_dims(dims: dict[str, tuple[int, int]], multiples: tuple[int, int, int]) -> dict[int, tuple[Dim, int]]:
    """Per dynamic axis of `x` (batch and latent dims): the root `Dim` (in patch units where the patch
    is > 1) and the multiple."""
    roots = {}
    for axis, (name, multiple) in zip((0, 2, 3, 4), step_multiples(multiples).items()):
        lo, hi = dims[name]
        if lo == hi:
            continue
        lo_units, hi_units = -(-lo // multiple), hi // multiple
        if lo_units > hi_units:
            raise CaptureError(f"model.input.{name}: no size in [{lo}, {hi}] is a multiple of the patch size {multiple}.")
        # torch.export gives each input its own symbol for a Dim(min=1, max=2) shared between inputs (the
        # conditioning batch would not be x's batch); any wider range relates them. The manifest keeps [1, 2].
        export_hi = 3 if (lo_units, hi_units) == (1, 2) else hi_units
        roots[axis] = (Dim(f"{name}_units" if multiple > 1 else name, min=lo_units, max=export_hi), multiple)
    return roots


def state_dim(size: int | str, roots: dict[str, Dim]):
    """An export dim for a state size named in the step dims: `128*batch` derives from the batch's Dim;
    a size that is not linear in one dynamic dim is left for export to derive (`Dim.AUTO`)."""
    if type(size) is int:
        return None
    linear = linear_relation(size, set(roots))
    if linear is None:
        return Dim.AUTO
    name, slope, offset = linear
    derived = roots[name] * slope if slope != 1 else roots[name]
    return derived + offset if offset else derived


def export_dynamic_shapes(dims: dict[str, tuple[int, int]], multiples: tuple[int, int, int], example: tuple[torch.Tensor, ...],
                          state_shapes: list[tuple[int | str, ...]] = ()):
    """Dynamic sizes of the latent `x` (the first input), keyed by tensor so any call structure fits.

    Conditioning tensors share `x`'s batch (dim 0); a latent-shaped one (rank 5, with `x`'s frames, height and
    width at the traced sizes: a first-frame latent, a control video, a mask) shares those dims too. State tensors (the last inputs, one per entry of
    `state_shapes`, their sizes named in the step dims) follow the step's sizes.
    """
    roots = root_dims(dims, multiples)
    x_dims = {axis: dim * multiple if multiple > 1 else dim for axis, (dim, multiple) in roots.items()}
    shapes = torch.export.ShapesCollection()
    if not x_dims:
        return shapes
    shapes[example[0]] = x_dims
    num_state = len(state_shapes)
    for cond in example[2: len(example) - num_state]:
        latent_shaped = cond.dim() == 5 and cond.shape[2:] == example[0].shape[2:]
        cond_dims = {axis: dim for axis, dim in x_dims.items() if axis == 0 or latent_shaped}
        if cond_dims:
            shapes[cond] = cond_dims
    by_name = {dim.__name__: dim for dim, _ in roots.values()}
    for state, shape in zip(example[len(example) - num_state:], state_shapes):
        state_dims = {d: state_dim(size, by_name) for d, size in enumerate(shape)}
        shapes[state] = {d: dim for d, dim in state_dims.items() if dim is not None}
    return shapes


SUGGESTED_FIX = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\] = (.+)")


def linear_relation(text: str, names: set[str]) -> tuple[str, int, int] | None:
    """`16*frames + 2` -> ("frames", 16, 2) when the expression is linear in exactly one of `names`;
    parsed by the size grammar (vdopt.safety), never evaluated as code."""
    try:
        shape_expression(text, frozenset(names))
    except ValueError:
        return None
    used = {n for n in names if re.search(rf"\b{re.escape(n)}\b", text)}
    if len(used) != 1:
        return None
    (name,) = used
    at = [evaluate_shape(text, {name: v}) for v in (0, 1, 2)]
    slope, offset = at[1] - at[0], at[0]
    if at[2] - at[1] != slope:
        return None
    return name, slope, offset


def with_suggested_fixes(message: str, shapes: dict, roots: dict[int, tuple[Dim, int]]) -> dict:
    """`shapes` (keyed by argument name) with the linear relations export found
    (`L['state_cache_0'].size()[1] = 16*frames`) as derived dims."""
    by_name = {dim.__name__: dim for dim, _ in roots.values()}
    fixed = {name: dict(spec) if isinstance(spec, dict) else spec for name, spec in shapes.items()}
    for line in message.split("Suggested fixes:", 1)[1].splitlines():
        match = SUGGESTED_FIX.fullmatch(line.strip())
        if not match or not isinstance(fixed.get(match.group(1)), dict):
            continue
        linear = linear_relation(match.group(3), set(by_name))
        if linear is None:
            continue
        name, slope, offset = linear
        derived = by_name[name] * slope
        fixed[match.group(1)][int(match.group(2))] = derived + offset if offset else derived
    return fixed


def export_step(module: nn.Module, example: tuple[torch.Tensor, ...], dims: dict[str, tuple[int, int]],
                multiples: tuple[int, int, int], state_shapes: list[tuple[int | str, ...]] = ()) -> torch.export.ExportedProgram:
    """Exports with the latent's dims dynamic. When a state size turns out to be a linear function of
    a latent dim (a cached residual has 1560 * frames tokens when height and width are static),
    export refuses `Dim.AUTO` and names the relation; the export is retried with it as a derived dim."""
    shapes = export_dynamic_shapes(dims, multiples, example, state_shapes).dynamic_shapes(module, example)
    with torch.no_grad():
        try:
            return torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
        except torch._dynamo.exc.UserError as exc:
            if "Suggested fixes:" not in str(exc) or not isinstance(shapes, dict):
                raise
            fixed = with_suggested_fixes(str(exc), shapes, root_dims(dims, multiples))
            return torch.export.export(module, example, dynamic_shapes=fixed, strict=False)


def example_inputs(recipe: Recipe, descriptor: ArchitectureDescriptor, config: dict, sizes: dict[str, int], guidance: bool):
    spec = recipe.model.input
    dtype = DTYPES[recipe.model.dtype]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sizes["batch"], descriptor.in_channels(config), sizes["frames"], sizes["height"], sizes["width"], generator=generator).to(dtype)
    cond = descriptor.example_cond(config, sizes["batch"], spec.text_len, generator,
                                   latent=(sizes["frames"], sizes["height"], sizes["width"]))
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    tensors = [x, torch.tensor(0, dtype=torch.int64), *cond.values()]
    names = ["x", "i", *(f"cond.{k}" for k in cond)]
    if guidance:
        tensors += list(descriptor.null_cond(cond).values())
        names += [f"uncond.{k}" for k in cond]
    return names, tuple(tensors)


def named_shape(shape, rename) -> tuple[int | str, ...]:
    """A traced shape for the manifest: ints stay ints, symbolic sizes become latent-dim expressions."""
    return tuple(int(d) if str(d).isdigit() else rename(d) for d in shape)


def user_input_nodes(ep: torch.export.ExportedProgram) -> list:
    """The placeholders of the step's own inputs (not lifted parameters or buffers), in order."""
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]


def io_specs(ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str], dims: dict[str, tuple[int, int]]):
    user_inputs = user_input_nodes(ep)
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = [a for a in output_node.args[0]][-len(output_names):]
    rename = symbol_names(ep, dims)

    def spec(name, node):
        val = node.meta["val"]
        return TensorSpec(name, named_shape(val.shape, rename), dtype_name(val.dtype))

    return tuple(spec(n, node) for n, node in zip(input_names, user_inputs)), tuple(spec(n, node) for n, node in zip(output_names, outs))


def symbol_names(ep: torch.export.ExportedProgram, dims: dict[str, tuple[int, int]]):
    """Maps export's symbols to step dim names: `s0` -> `frames`, the `s1` of `2*s1` -> `height_units`."""
    x = user_input_nodes(ep)[0]
    mapping = {}
    for axis, name in zip((0, 2, 3, 4), STEP_DIMS):
        size = x.meta["val"].shape[axis]
        if not isinstance(size, int):
            expr = size.node.expr
            for symbol in expr.free_symbols:
                mapping[str(symbol)] = name if expr == symbol else f"{name}_units"

    def rename(size) -> str:
        return re.sub(r"\b[a-z]+\d+\b", lambda m: mapping.get(m.group(0), m.group(0)), str(size)).replace(" ", "")

    return rename


DATA_DEPENDENT = ("data-dependent", "data dependent", "GuardOnDataDependentSymNode", "DataDependentOutputException")


def is_data_dependent(exc: BaseException) -> bool:
    """An export failure caused by a branch or size that depends on a tensor's values."""
    while exc is not None:
        if any(mark in f"{type(exc).__name__}: {exc}" for mark in DATA_DEPENDENT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def user_frame(exc: BaseException) -> str:
    """` at file.py:123` for the innermost traceback frame outside torch and vdopt: the model's line that asked
    for a value."""
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = Path(frame.filename).parts
        if "torch" not in parts and "vdopt" not in parts and "sympy" not in parts and "<" not in frame.filename:
            frames.append(frame)
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def check_exported_signature(denoiser: ExportedDenoiser, descriptor: ArchitectureDescriptor, dims: dict[str, tuple[int, int]],
                             guidance: bool, source) -> None:
    """A bare program must take what the step passes it: `(x, t, *cond)`, a dynamic batch when guidance doubles the
    rows or the recipe's batch is a range, and every latent dim the recipe makes dynamic. Said before tracing, with
    the fix (docs/adding_a_family.md), rather than as a guard failure inside it."""
    names = ["x", "t", *(c.name for c in descriptor.cond_inputs)]
    values = denoiser.signature
    fix = "Export it again (docs/adding_a_family.md, 'Checking a program against a descriptor')"
    if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
        raise CaptureError(f"{source}: the program takes {len(values)} inputs; the {descriptor.family} step calls it as "
                           f"({', '.join(names)}), all tensors. {fix}.")
    x = values[0]
    if x.dim() != 5:
        raise CaptureError(f"{source}: the program's first input has {x.dim()} dims; the step passes the latent x as "
                           f"[batch, channels, frames, height, width]. {fix}.")
    wanted = [("batch", 0, "guidance doubles the rows (conditional and unconditional together)" if guidance
               else "model.input.batch is a range")] if guidance or dims["batch"][0] != dims["batch"][1] else []
    wanted += [(name, axis, f"model.input.{name} is a range") for axis, name in ((2, "frames"), (3, "height"), (4, "width"))
               if dims[name][0] != dims[name][1]]
    for name, axis, why in wanted:
        if not isinstance(x.shape[axis], torch.SymInt):
            raise CaptureError(f"{source}: the program was exported with a static {name} of {x.shape[axis]} (x dim "
                               f"{axis}), but {why}. {fix} with a Dim on dim {axis} of x"
                               f"{' and on dim 0 of t and every conditioning input' if axis == 0 else ''}.")


def check_export_ranges(ep: torch.export.ExportedProgram, dims: dict[str, tuple[int, int]], multiples: tuple[int, int, int],
                        family: str) -> None:
    """torch.export narrows a dynamic dim's range, silently, when the model branches on the size (a broadcast of a
    size-1 axis, `if frames == 1`); the program then refuses sizes the recipe promised. Said at compile time instead."""
    x = user_input_nodes(ep)[0].meta["val"]
    for axis, (name, multiple) in zip((0, 2, 3, 4), step_multiples(multiples).items()):
        lo, hi = dims[name]
        if lo == hi:
            continue
        size = x.shape[axis]
        symbols = size.node.expr.free_symbols if isinstance(size, torch.SymInt) else set()
        ranges = [ep.range_constraints[s] for s in symbols if s in ep.range_constraints]
        if not ranges:
            takes = f"only {name} {int(size)}"
        else:
            low, high = int(ranges[0].lower) * multiple, int(ranges[0].upper) * multiple
            if low <= -(-lo // multiple) * multiple and high >= hi - hi % multiple:
                continue
            takes = f"{name} {low}..{min(high, hi)} only"
        raise CaptureError(
            f"model.input.{name}: the exported {family} step takes {takes}, not the {lo}..{hi} the recipe asks for: the "
            f"model branches on this size (a size-1 axis broadcast, or a test on the size), and torch.export narrowed the "
            f"range. Set model.input.{name} to the range it takes and give other sizes as lower.profiles entries "
            f"(each a static export).")


def check_structure(ep: torch.export.ExportedProgram, descriptor: ArchitectureDescriptor, source) -> None:
    """A bare program must show the family's blocks in its metadata, or no pass can find them."""
    from vdopt.inspect import graph_modules, summarize_graph

    if not any(descriptor.is_block(fqn) for fqn, _ in graph_modules(ep)):
        raise CaptureError(
            f"{source}: no {descriptor.family} transformer blocks (module paths matching '{descriptor.block_pattern}') were "
            f"found in the program's nn_module_stack metadata, so passes cannot locate its structure. "
            f"`vdopt inspect --graph` found: {summarize_graph(ep, limit=8)}".replace("\n", "; ")
        )


def capture(recipe: Recipe, model_path: str | Path | None, *, trust_pickle: bool = False,
            profile: dict[str, int] | None = None, fake_mode=None) -> StepProgram:
    """Loads the denoiser and exports the step program for one shape profile.

    With `fake_mode` (a `FakeTensorMode`), the model is built and traced without real memory: a
    full-size config is captured on a laptop.
    """
    descriptor = descriptor_for(recipe.model.family)
    dims = latent_dims(recipe, profile)
    if not descriptor.dynamic_frames and dims["frames"][0] != dims["frames"][1]:
        raise CaptureError(
            f"The {descriptor.family} family exports static frame counts only (its temporal position embedding has a "
            f"fixed length): give lower.profiles with one entry per frame count, or make model.input.frames an int."
        )
    check_capture(recipe, descriptor, model_config(recipe, descriptor, model_path), dims, profile, host=fake_mode is None)
    guidance = recipe.sampler.uses_guidance
    table = step_table(recipe.sampler)
    dtype = DTYPES[recipe.model.dtype]
    with fake_mode or nullcontext():
        denoiser, descriptor, config = load_denoiser(recipe, model_path, trust_pickle)
        if isinstance(denoiser, ExportedDenoiser):
            check_exported_signature(denoiser, descriptor, dims, guidance, model_path)
        denoiser = cast_weights(denoiser.eval().requires_grad_(False), dtype)
        step = StepModule(denoiser, table, recipe.sampler.kind, recipe.sampler.prediction, recipe.sampler.guidance_scale,
                          len(descriptor.cond_inputs), guidance,
                          denoiser.signature[1].dtype if isinstance(denoiser, ExportedDenoiser) else torch.float32)
        names, example = example_inputs(recipe, descriptor, config, trace_sizes(recipe, dims, descriptor.multiples(config)), guidance)
        try:
            ep = export_step(step, example, dims, descriptor.multiples(config))
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - export errors are long; keep the first line and the fix
            first = first_line(exc)
            if is_data_dependent(exc):
                raise CaptureError(
                    f"the {descriptor.family} model branches on the value of a tensor{user_frame(exc)} (torch.export: "
                    f"{first[:160]}), which one exported graph cannot hold. docs/export_troubleshooting.md shows the "
                    f"rewrites that fix it: a constant mode flag, torch.where / torch.cond, a mask instead of a "
                    f"boolean index.") from exc
            raise CaptureError(
                f"torch.export could not capture the {descriptor.family} step program for latent sizes {dims}: "
                f"{type(exc).__name__}: {first}. Narrow model.input ranges or give lower.profiles with static sizes."
            ) from exc
    if recipe.model.layout == "exported_program":
        check_structure(ep, descriptor, model_path)
    check_export_ranges(ep, dims, descriptor.multiples(config), descriptor.family)
    inputs, outputs = io_specs(ep, names, ["x_next"], dims)
    return StepProgram(
        ep=ep, recipe=recipe, descriptor=descriptor, model_config=config, inputs=inputs, outputs=outputs, state=(),
        step_table={k: v.tolist() for k, v in table.items()}, dims=dims, example_inputs=example, guidance=guidance,
        extras={"fake_mode": fake_mode} if fake_mode is not None else {},
    )
