"""`aoti`: the step program compiled ahead of time by AOTInductor into a `.pt2` package.

The package runs from Python (`aoti_load_package`) or C++ (`AOTIModelPackageLoader`) without
the Python model code. A `.modules.json` beside it lists each kernel call of the generated wrapper in
source order with the module path of the graph nodes it computes; with `lower.kernel_profile` the
kernels are compiled with profiler records (`cpp.enable_kernel_profile`), and `vdopt profile` matches
the recorded kernels to those call sites to attribute time to modules. The records are opt-in: they
cost every kernel call even when no profiler listens, most on small graphs
(`bench/kernel_profile.py`).
"""

from __future__ import annotations

import copy

import json
import math
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from vdopt.errors import BundleError, first_line
from vdopt.lower.base import unsupported_op_error
from vdopt.module_stack import STEP_PROGRAM, module_path
from vdopt.program import StepProgram
from vdopt.safety import check_zip_members


@contextmanager
def cond_operands_keep_traced_strides():
    """Makes Inductor hand every `torch.cond` operand to the branches with the strides it was traced with.

    Inductor compiles each branch for the operands' traced strides but lays an operand out in the outer
    graph as it likes: Latte's temporal blocks see `[rows * tokens, frames, dim]` values that Inductor
    keeps frame-major (strides `(64, 8192, 1)` where the trace had `(512, 64, 1)`), and the branch then
    reads the wrong elements. The shipped cached recipe's clips were 14 dB from the torch backend's.
    Upstream fixed the same for branch outputs (pytorch/pytorch#169963), not operands: this requires
    each operand's traced strides, as `Conditional.create` does for the outputs.
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    create = ir.Conditional.__dict__["create"]

    def with_traced_strides(cls, predicate, true_fn, false_fn, operands):
        traced = V.graph.current_node.args[-1]
        operands = [ir.ExternKernel.require_exact_strides(operand, node.meta["val"].stride())
                    if isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor) else operand
                    for operand, node in zip(operands, traced)]
        return create.__func__(cls, predicate, true_fn, false_fn, operands)

    ir.Conditional.create = classmethod(with_traced_strides)
    try:
        yield
    finally:
        ir.Conditional.create = create


KERNEL_PROFILE_CONFIGS = {"cpp.enable_kernel_profile": True}


def inductor_configs(program: StepProgram) -> dict[str, bool]:
    return dict(KERNEL_PROFILE_CONFIGS) if program.recipe.lower.kernel_profile else {}


SQRT_2_OVER_PI = 0.7978845608028654


def tanh_gelu_as_sigmoid(graph: fx.Graph, gelu: fx.Node) -> None:
    """0.5·x·(1 + tanh(u)) is x·sigmoid(2u): the same function, and Inductor's vectorised sigmoid (an exp)
    costs a fraction of its tanh on CPU. `vdopt profile` showed tanh-GELU as a fifth of the teacher's
    AOTInductor step; rewritten, the step ran 1.19x faster (1e-7 apart)."""
    aten = torch.ops.aten
    with graph.inserting_before(gelu):
        x = gelu.args[0]
        nodes = [graph.call_function(aten.mul.Tensor, (x, x))]
        nodes.append(graph.call_function(aten.mul.Tensor, (nodes[-1], x)))
        nodes.append(graph.call_function(aten.mul.Tensor, (nodes[-1], 0.044715)))
        nodes.append(graph.call_function(aten.add.Tensor, (x, nodes[-1])))
        nodes.append(graph.call_function(aten.mul.Tensor, (nodes[-1], 2 * SQRT_2_OVER_PI)))
        nodes.append(graph.call_function(aten.sigmoid.default, (nodes[-1],)))
        nodes.append(graph.call_function(aten.mul.Tensor, (x, nodes[-1])))
    for node in nodes:  # elementwise: each has the GELU's shape, dtype and module stack
        node.meta = dict(gelu.meta)
    gelu.replace_all_uses_with(nodes[-1])
    graph.erase_node(gelu)


CONVOLUTIONS = {torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}


def convolution_args(conv: fx.Node) -> dict:
    """An `aten.conv2d/conv3d` node's arguments by name, stride, padding and dilation one entry per spatial dimension."""
    dims = CONVOLUTIONS[conv.target]
    args = {"bias": None, "groups": 1} | dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                                                   conv.args)) | conv.kwargs
    for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        value = list(args.get(name, [default]))
        args[name] = value * dims if len(value) == 1 else value
    return args


def is_cpu_float32_convolution(node: fx.Node) -> bool:
    return (node.target in CONVOLUTIONS and isinstance(node.meta.get("val"), torch.Tensor)
            and node.meta["val"].device.type == "cpu" and node.meta["val"].dtype == torch.float32)


def is_patch_embedding(node: fx.Node) -> bool:
    """A CPU float32 convolution whose kernel is its stride (a DiT's patch embedding: non-overlapping patches), over
    channel and spatial sizes known when compiling that the kernel divides (the batch may vary)."""
    if not is_cpu_float32_convolution(node):
        return False
    args = convolution_args(node)
    kernel = list(args["weight"].meta["val"].shape[2:])
    sizes = args["input"].meta["val"].shape[1:]
    return (args["stride"] == kernel and not any(args["padding"]) and set(args["dilation"]) == {1} and args["groups"] == 1
            and all(isinstance(s, int) for s in sizes) and all(s % k == 0 for s, k in zip(sizes[1:], kernel)))


def patch_embedding_sites(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_patch_embedding(n)]


def patch_embedding_as_matmul(graph: fx.Graph, conv: fx.Node) -> None:
    """A patch embedding as one matmul over the patches: [B, C, n1·k1, n2·k2] -> rows (B·n1·n2) of C·k1·k2 values.

    PyTorch's and oneDNN's CPU convolutions run the reference model's 4x4 stride-4 embedding of 5 channels far below
    the CPU's GEMM rate; as a copy and a GEMM the CMD motion stage ran 1.13x faster, the CMD bundle 1.06x and the
    teacher's 1.09x per clip (bench/aoti_rewrites.py)."""
    aten = torch.ops.aten
    args = convolution_args(conv)
    x, weight = args["input"], args["weight"]
    channels, *sizes = x.meta["val"].shape[1:]
    out_channels, _, *kernel = weight.meta["val"].shape
    counts = [s // k for s, k in zip(sizes, kernel)]
    patch = channels * math.prod(kernel)
    dims = len(kernel)
    meta = {k: v for k, v in conv.meta.items() if k != "val"}
    fake_mode = torch._guards.detect_fake_mode([x.meta["val"]])

    def call(op, *op_args):
        node = graph.call_function(op, op_args)
        node.meta = dict(meta)
        with fake_mode:
            node.meta["val"] = op(*fx.node.map_arg(op_args, lambda a: a.meta["val"]))
        return node

    with graph.inserting_before(conv):
        split = call(aten.reshape.default, x, [-1, channels, *(n for pair in zip(counts, kernel) for n in pair)])
        patches = call(aten.permute.default, split, [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)])
        rows = call(aten.reshape.default, patches, [-1, patch])
        columns = call(aten.t.default, call(aten.reshape.default, weight, [out_channels, patch]))
        product = (call(aten.addmm.default, args["bias"], rows, columns) if args["bias"] is not None
                   else call(aten.mm.default, rows, columns))
        grid = call(aten.reshape.default, product, [-1, *counts, out_channels])
        out = call(aten.clone.default, call(aten.permute.default, grid, [0, dims + 1, *range(1, dims + 1)]))
    conv.replace_all_uses_with(out)
    graph.erase_node(conv)


def onednn_convolution_sites(graph: fx.Graph) -> list[fx.Node]:
    """The float32 CPU convolutions `convolution_as_onednn` can take (none where torch was built without oneDNN), but
    patch embeddings, which `patch_embedding_as_matmul` takes."""
    if not torch.backends.mkldnn.is_available():
        return []
    return [n for n in graph.nodes if is_cpu_float32_convolution(n) and not is_patch_embedding(n)]


def convolution_as_onednn(graph: fx.Graph, conv: fx.Node) -> None:
    """A convolution as oneDNN's (`mkldnn._convolution_pointwise`, which Inductor lowers to its own oneDNN kernel).

    For a batch of one, PyTorch's CPU convolution picks its native unfold + GEMM kernel for 3x3 filters on small inputs
    (`ConvParams::use_mkldnn`, "for some case, native is faster"); on the CMD decoder's convolutions it is 4.0-6.7x
    slower than oneDNN, and the decode stage ran 11.2 ms per clip instead of 2.5 (bench/onednn_convolution.py)."""
    args = convolution_args(conv)
    with graph.inserting_before(conv):
        onednn = graph.call_function(torch.ops.mkldnn._convolution_pointwise.default,
                                     (args["input"], args["weight"], args["bias"], args["padding"], args["stride"],
                                      args["dilation"], args["groups"], "none", [None], ""))
    onednn.meta = dict(conv.meta)
    conv.replace_all_uses_with(onednn)
    graph.erase_node(conv)


def tanh_gelu_sites(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.target is torch.ops.aten.gelu.default and n.kwargs.get("approximate") == "tanh"]


# (finder, rewrite, also inside `torch.cond` branches): Inductor cannot lower a oneDNN convolution in a branch (its
# operands there are fake tensors it cannot realise; a cached Sana-Video step failed to compile); patch embeddings,
# which run before any cache branch, are taken in the root graph only too.
REWRITES = ((tanh_gelu_sites, tanh_gelu_as_sigmoid, True), (patch_embedding_sites, patch_embedding_as_matmul, False),
            (onednn_convolution_sites, convolution_as_onednn, False))


def for_inductor(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A new program with the rewrites that make Inductor's code faster (the input stays as it was), edited in
    its graph: re-tracing (`run_decompositions`) would also turn every reshape into a view, and Inductor then
    lays out a concatenation of permuted tensors so that the view is impossible (Latte, CogVideoX)."""
    def sites(program):
        return [(gm, node, rewrite) for gm in program.graph_module.modules() if isinstance(gm, fx.GraphModule)
                for find, rewrite, in_branches in REWRITES if in_branches or gm is program.graph_module for node in find(gm.graph)]

    if not sites(ep):
        return ep
    rewritten = copy.deepcopy(ep)
    for gm, node, rewrite in sites(rewritten):
        rewrite(gm.graph, node)
    for gm in {gm for gm in rewritten.graph_module.modules() if isinstance(gm, fx.GraphModule)}:
        gm.graph.lint()
        gm.recompile()
    return rewritten


MODULE_MAP_SUFFIX = ".modules.json"
SOURCE_NODES = re.compile(r"^(\s*)// (?:Topologically Sorted|Unsorted) Source Nodes: \[([^\]]*)\]")
SUBGRAPH = re.compile(r"^(\s*)// subgraph: (\w+)")
KERNEL_RECORD = re.compile(r'KernelContextGuard _ctx\("([^"]+)", R"\((.*)')
STACK_END = ')");'


@dataclass(frozen=True)
class CallSite:
    kernel: str
    graph: str            # '' for the root graph, else the `torch.cond` branch (true_graph_0, ...)
    sources: tuple[str, ...]  # the root graph's nodes the kernel computes, in topological order
    stack: str            # the Python stack the kernel's nodes were traced at


def kernel_call_sites(wrapper: str) -> list[CallSite]:
    """Each kernel call of an AOTInductor wrapper, in source order. A `torch.cond` branch is inlined
    there, indented under a `// subgraph: NAME` comment, so a run's kernels are a subsequence of these."""
    sites, sources, stack, kernel = [], (), [], None
    subgraphs: list[tuple[int, str]] = []  # (indent, name) of the branches the current line is inside
    for line in wrapper.splitlines():
        if kernel is None:
            if found := SUBGRAPH.search(line):
                while subgraphs and subgraphs[-1][0] >= len(found.group(1)):
                    subgraphs.pop()
                subgraphs.append((len(found.group(1)), found.group(2)))
            elif found := SOURCE_NODES.search(line):
                while subgraphs and subgraphs[-1][0] > len(found.group(1)):
                    subgraphs.pop()
                sources = tuple(name.strip() for name in found.group(2).split(",") if name.strip())
            elif found := KERNEL_RECORD.search(line):
                kernel, stack, line = found.group(1), [], found.group(2)  # the stack literal starts after `R"(`
        if kernel is not None:  # inside a kernel's stack-trace literal, which ends with `)");`
            stack.append(line.rstrip().removesuffix(STACK_END))
            if line.rstrip().endswith(STACK_END):
                sites.append(CallSite(kernel, subgraphs[-1][1] if subgraphs else "", sources, normal_stack("\n".join(stack))))
                kernel = None
    return sites


def normal_stack(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def module_map(ep: torch.export.ExportedProgram, package: Path) -> list[dict[str, str]]:
    """Each kernel call of the package's wrapper with the module path it computes for.

    Root-graph kernels: the module of the last node the wrapper lists for the kernel (in topological
    order, so the op whose result it produces; a matmul's list also holds the views feeding it). A
    branch's kernels are listed with the root's `cond` node instead, so they are matched by the stack
    they were traced at: the k-th kernel with a stack takes the k-th module whose nodes have it, in
    graph order (the same line of code runs once per block, blocks in order). A fused kernel carries
    several stacks: it takes, of their modules, the one nearest the module of the kernel before it.
    """
    with zipfile.ZipFile(package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp"))
    root = {node.name: module_path(node) for node in ep.graph.nodes}
    by_stack = {name.rsplit(".", 1)[-1]: modules_by_stack(gm.graph) for name, gm in ep.graph_module.named_modules()
                if isinstance(gm, fx.GraphModule)}
    seen: dict[tuple[str, str], int] = {}
    previous = STEP_PROGRAM

    def branch_module(site: CallSite) -> str:
        stacks = by_stack.get(site.graph, {})
        if site.stack in stacks:
            k = seen[(site.graph, site.stack)] = seen.get((site.graph, site.stack), -1) + 1
            return stacks[site.stack][min(k, len(stacks[site.stack]) - 1)]
        candidates = [path for stack, paths in stacks.items() if site.stack and stack in site.stack for path in paths]
        return max(candidates, key=lambda path: shared_names(path, previous), default=STEP_PROGRAM)

    out = []
    for site in kernel_call_sites(wrapper):
        if site.graph:
            module = previous = branch_module(site)
        else:
            module = next((root[s] for s in reversed(site.sources) if s in root), STEP_PROGRAM)
        out.append({"kernel": site.kernel, "module": module})
    return out


def modules_by_stack(graph: fx.Graph) -> dict[str, list[str]]:
    """Stack trace -> the modules whose nodes were traced at it, in graph order."""
    stacks: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.meta.get("stack_trace"):
            paths = stacks.setdefault(normal_stack(node.meta["stack_trace"]), [])
            if module_path(node) not in paths:
                paths.append(module_path(node))
    return stacks


def shared_names(a: str, b: str) -> int:
    """How many leading names two module paths share."""
    count = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        count += 1
    return count


class AotiBackend:
    name = "aoti"
    splits_conditionals = False  # runs `torch.cond` lazily
    needs_op_library = True  # the package calls vdopt's ops by name through its proxy executor
    runtime = {"threads": "torch.get_num_threads() (OpenMP)", "inductor_configs": {"lower.kernel_profile": KERNEL_PROFILE_CONFIGS},
               "rewrites": [rewrite.__name__ for _, rewrite, _ in REWRITES]}

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.aoti.pt2"
        try:
            ep = for_inductor(program.ep)
            with cond_operands_keep_traced_strides():
                torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / name), inductor_configs=inductor_configs(program))
        except Exception as exc:  # noqa: BLE001 - inductor raises many types; report the op and module
            raise unsupported_op_error(self.name, program.ep, str(exc), first_line(exc)) from exc
        modules = f"{stem}.aoti{MODULE_MAP_SUFFIX}"
        (directory / modules).write_text(json.dumps(module_map(ep, directory / name), indent=0))
        return [name, modules]

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False):
        # The package holds native code: the Session has verified its checksum; its members are checked
        # here before AOTInductor extracts them (no absolute paths, `..` or symlinks: zip-slip).
        package = directory / files[0]
        check_zip_members(package, "AOTInductor package")
        try:
            runner = torch._inductor.aoti_load_package(str(package))
        except RuntimeError as exc:  # not an AOTInductor package (another archive, or the manifest's backend was edited)
            raise BundleError(f"{package}: not a loadable AOTInductor package ({first_line(exc)}); the file or the "
                              f"manifest's backend was edited. Recompile the bundle.") from None

        def run(*inputs):
            # The compiled code reads each input with the strides it was traced with (contiguous); a state the
            # previous step returned as a transposed view would be read in the wrong order.
            with torch.no_grad():
                return runner(*(t.contiguous() for t in inputs))

        return run
