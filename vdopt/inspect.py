"""`vdopt inspect`: what a bundle holds, or what module structure an exported graph carries.

Inspecting never loads code (ARCHITECTURE contract 7): a bundle is read through its verified
manifest, and a `.pt2` (given directly, or a bundle's torch segment for `--graph`) through the
JSON graph inside the archive, without unpickling or deserialising the program.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vdopt.bundle import bundle_file, read_manifest
from vdopt.errors import BundleError, VdoptError
from vdopt.module_stack import module_stack
from vdopt.safety import check_zip_members

MAX_GRAPH_JSON = 512 << 20


def graph_modules(ep: torch.export.ExportedProgram) -> Counter:
    """(module path, class name) pairs found in `nn_module_stack`, with their node counts."""
    found: Counter = Counter()
    for node in ep.graph.nodes:
        for fqn, name in module_stack(node):
            found[(fqn, name)] += 1
    return found


def split_stack_entry(entry: str) -> list[str]:
    """`key,path,type` as torch.export serialises an nn_module_stack item (commas inside brackets kept)."""
    out, start, depth = [], 0, 0
    for end, char in enumerate(entry):
        if char in "[(":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            out.append(entry[start:end])
            start = end + 1
    out.append(entry[start:])
    return out


def archive_graph(path: Path) -> tuple[int, Counter, list[tuple[str, list[int | None]]]]:
    """(op count, module Counter as `graph_modules`, user inputs as (name, sizes with None for a dynamic size)) read
    from the JSON graph of a torch.export archive, without deserialising the program: nothing in the file is
    unpickled or run."""
    names = check_zip_members(path, "torch.export archive")
    models = [n for n in names if n.endswith(".json") and n.split("/")[-2:-1] == ["models"]]
    if not models:
        raise VdoptError(f"{path}: not a torch.export program (no models/*.json graph in the archive); give a file written "
                         f"by torch.export.save, or a bundle directory.")
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(sorted(models)[0])
            if info.file_size > MAX_GRAPH_JSON:
                raise VdoptError(f"{path}: the graph JSON is {info.file_size} bytes; refusing to read it.")
            program = json.loads(archive.read(info))["graph_module"]
        ops, found = 0, Counter()
        for node in program["graph"]["nodes"]:
            ops += 1
            stack = (node.get("metadata") or {}).get("nn_module_stack") or ""
            for item in stack.split(";") if stack else []:
                parts = split_stack_entry(item)
                if len(parts) == 3:
                    found[(parts[1], parts[2].rsplit(".", 1)[-1])] += 1
        return ops, found, archive_inputs(program)
    except VdoptError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError, zipfile.BadZipFile, OSError) as exc:
        raise VdoptError(f"{path}: the program's graph JSON is damaged or not torch.export's ({type(exc).__name__}); "
                         f"give a file written by torch.export.save.") from None


def archive_inputs(program: dict) -> list[tuple[str, list[int | None]]]:
    """The user inputs of a serialized program: name and sizes (None where the size is symbolic). A non-tensor
    input has no sizes (an empty name tells it apart)."""
    values = program["graph"]["tensor_values"]
    inputs = []
    for spec in program["signature"]["input_specs"]:
        argument = spec.get("user_input", {}).get("arg") if "user_input" in spec else None
        if argument is None:
            continue
        name = (argument.get("as_tensor") or {}).get("name", "")
        sizes = [size.get("as_int") for size in values[name]["sizes"]] if name else []
        inputs.append((name, sizes))
    return inputs


def signature_findings(inputs: list[tuple[str, list[int | None]]], descriptor) -> list[str]:
    """What a bare program must change to be called as the descriptor's step calls it (`(x, t, *cond)`, x rank 5,
    one dynamic batch for guidance), in words; empty when nothing."""
    call = ["x", "t", *(c.name for c in descriptor.cond_inputs)]
    if len(inputs) != len(call) or not all(name for name, _ in inputs):
        return [f"takes {len(inputs)} inputs, the step calls ({', '.join(call)}), all tensors"]
    x = inputs[0][1]
    if len(x) != 5:
        return [f"x has {len(x)} dims, the step passes [batch, channels, frames, height, width]"]
    findings = []
    if any(sizes and sizes[0] is not None for _, sizes in inputs):
        findings.append("a static batch: guidance doubles the rows, so export dim 0 of x, t and every conditioning "
                        "input with one Dim")
    static = [name for name, size in zip(("frames", "height", "width"), x[2:]) if size is not None]
    if static:
        findings.append(f"static {', '.join(static)} ({', '.join(str(size) for size in x[2:] if size is not None)}): a "
                        f"recipe range on {'it' if len(static) == 1 else 'them'} is refused")
    return findings


def summarize_graph(ep: torch.export.ExportedProgram, limit: int = 25) -> str:
    return summarize_modules(sum(1 for n in ep.graph.nodes if n.op == "call_function"), graph_modules(ep), limit=limit)


def summarize_modules(ops: int, found: Counter, inputs: list[tuple[str, list[int | None]]] | None = None,
                      limit: int = 25) -> str:
    """The module structure, and for each family whose blocks it shows: whether the time embedding is there too and,
    given the program's `inputs`, what its signature lacks for that family's step."""
    from vdopt.families import registry

    classes = Counter(cls for (_, cls) in found)
    lines = [f"{ops} ops; module classes: " + ", ".join(f"{cls} x{count}" for cls, count in classes.most_common(limit))]
    if inputs is not None:
        lines.append("inputs: " + ", ".join(f"{name or '(not a tensor)'} [{', '.join('dyn' if size is None else str(size) for size in sizes)}]"
                                            for name, sizes in inputs))
    shallow = sorted({fqn for fqn, _ in found if fqn.count(".") <= 2})
    lines.append("module paths (depth <= 3): " + ", ".join(shallow[:limit]) + (" ..." if len(shallow) > limit else ""))
    matches, partial = [], []
    for name, descriptor in sorted(registry().items()):
        blocks = {f for f, _ in found if descriptor.is_block(f)}
        time_embedding = sorted(f for f, _ in found if descriptor.is_time_embedding(f))
        if not blocks and not descriptor.matches_class(set(classes)):
            continue
        if blocks and time_embedding:
            findings = signature_findings(inputs, descriptor) if inputs is not None else []
            matches.append(f"{name} ({len(blocks)} blocks, time embedding {time_embedding[0]}"
                           f"{'; to change: ' + '; '.join(findings) if findings else ''})")
        else:
            missing = [] if blocks else [f"no blocks matching '{descriptor.block_pattern}'"]
            missing += [] if time_embedding else [f"no time embedding matching '{descriptor.time_embedding_pattern}' "
                                                  f"(teacache needs it)"]
            partial.append(f"{name}: {'; '.join(missing)}")
    lines.append(f"matching families: {', '.join(matches) or 'none'}")
    if partial:
        lines.append("not matching: " + " | ".join(partial) + ". A family of your own: docs/adding_a_family.md")
    return "\n".join(lines)


def describe_verify(report: Any) -> list[str]:
    """The `verify` record `compile --verify` writes: prompts, PSNR statistics, accuracy, budget, verdict."""
    if not isinstance(report, dict):
        return [f"verify: {report}"]

    def number(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    verdict = {True: "passed", False: "FAILED"}.get(report.get("passed"), "no verdict")
    psnr = ", ".join(f"{key.removeprefix('psnr_')} {number(value)}" for key, value in report.items() if key.startswith("psnr_"))
    lines = [f"verify: {verdict} on {report.get('prompts', '?')} prompt(s)" + (f"; PSNR dB {psnr}" if psnr else "")]
    accuracy = report.get("accuracy")
    if isinstance(accuracy, dict):
        flat = {k: v for k, v in accuracy.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in accuracy.items() if isinstance(v, dict)}
        parts = [f"{k} {number(v)}" for k, v in flat.items()]
        parts += [f"{k} " + " ".join(f"{a}={number(b)}" for a, b in v.items()) for k, v in nested.items()]
        lines.append("  accuracy: " + "; ".join(parts))
    if isinstance(report.get("budget"), dict) and report["budget"]:
        lines.append("  budget: " + ", ".join(f"{k} {number(v)}" for k, v in report["budget"].items() if v is not None))
    return lines


def describe_bundle(path: Path) -> str:
    m = read_manifest(path)
    try:
        return bundle_lines(path, m)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{path}: the manifest verifies but lacks or mistypes what inspect shows ({type(exc).__name__}: "
                          f"{exc}); it was written by another vdopt version. Recompile the bundle.") from None


def bundle_lines(path: Path, m: dict[str, Any]) -> str:
    lines = [f"bundle {path}  (schema {m['schema_version']}, vdopt {m.get('vdopt_version')}, torch {m.get('torch_version')})",
             f"family: {m['family']}   parameters: {m.get('parameters', 0):,}",
             f"sampler: {m['sampler']['kind']}, {m['num_steps']} steps, shift {m['sampler']['shift']}, "
             f"guidance {'scale ' + str(m['sampler']['guidance_scale']) if m['guidance'] else 'off'}",
             "inputs:"]
    lines += [f"  {s['name']:<36} {s['dtype']:<8} {s['shape']}" for s in m["inputs"]]
    lines.append("outputs:")
    lines += [f"  {s['name']:<36} {s['dtype']:<8} {s['shape']}" for s in m["outputs"]]
    lines.append("state:" + ("" if m["state"] else " none"))
    lines += [f"  {s['name']:<36} {s['dtype']:<8} {s['shape']} init {s.get('init', 'zeros')}" for s in m["state"]]
    if m.get("cache"):
        lines.append("cache: " + ", ".join(f"{k}={v}" for k, v in m["cache"].items()))
    if m.get("custom_ops"):
        shipped = [f"{lib['file']} ({lib.get('platform')}, torch {lib.get('torch_version')})" for lib in m.get("op_libraries") or []]
        lines.append(f"custom ops: {', '.join(m['custom_ops'])}; "
                     + (f"op library {', '.join(shipped)}" if shipped else "ONNX functions (plugins for TensorRT)"))
    lines.append("segments:")
    for segment in m["segments"]:
        dims = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in segment["dims"].items())
        lines.append(f"  {segment['name']} [{segment['backend']}] {', '.join(segment['files'])}  ({dims})")
        if segment.get("build"):
            lines.append("    built for " + ", ".join(f"{k} {v}" for k, v in segment["build"].items()))
        if segment.get("kind") == "split":
            lines.append(f"    split at the conditional; the runtime reads '{segment['flag']}' and runs compute or reuse:")
            lines += [f"    {part['name']:<8} {', '.join(part['files'])}: {len(part['inputs'])} inputs -> "
                      f"{', '.join(s['name'] for s in part['outputs'])}" for part in segment["parts"]]
        for p in segment["passes"]:
            params = f" {p['params']}" if p["params"] else ""
            lines.append(f"    pass {p['name']}{params}: {p['seconds'] * 1000:.1f} ms, {p['nodes_before']} -> {p['nodes_after']} ops")
    lines += stage_lines(m)
    if "verify" in m and m["verify"] is not None:
        lines += describe_verify(m["verify"])
    return "\n".join(lines)


def stage_lines(m: dict[str, Any]) -> list[str]:
    """A staged bundle's stages in running order (the lines above describe the first)."""
    if not m.get("stages"):
        return []
    lines = [f"stages ({len(m['stages'])}, run in this order; the lines above describe the first):"]
    for stage in m["stages"]:
        fed = ", ".join(f"{k} <- {v}" for k, v in stage["feeds"].items()) or "the bundle's conditioning"
        how = (f"loop, {stage['num_steps']} steps, guidance {stage['sampler']['guidance_scale'] if stage['guidance'] else 'off'}, latent "
               f"{next(s['shape'] for s in stage['inputs'] if s['name'] == 'x')}" if stage["kind"] == "loop" else "one call")
        lines.append(f"  {stage['name']}: {how}; {stage.get('parameters', 0):,} parameters; fed {fed}; output '{stage['output']}' "
                     f"{stage['outputs'][0]['shape']}")
        lines += [f"    {seg['name']} [{seg['backend']}] {', '.join(seg['files'] or [f for p in seg.get('parts', []) for f in p['files']])}"
                  for seg in stage["segments"]]
    return lines


def describe(path: Path, graph: bool = False) -> str:
    try:
        path.stat()
    except OSError as exc:  # missing, or a name the file system cannot hold (too long, a symlink loop)
        raise VdoptError(f"{path}: {exc.strerror or 'not found'}; give a bundle directory or a torch.export .pt2 file.") from None
    if path.is_dir():
        text = describe_bundle(path)
        if graph:
            manifest = read_manifest(path)
            segment = next((s for s in manifest["segments"] if s.get("backend") == "torch" and s.get("files")), None)
            if segment is None:
                return text + "\n(--graph needs a torch-backend segment; AOTI and ONNX segments hold no module metadata)"
            ops, found, _ = archive_graph(bundle_file(path, segment["files"][0], manifest))  # a step, not a denoiser
            text += "\n" + summarize_modules(ops, found)
        return text
    if path.suffix == ".pt2" and path.is_file():
        return summarize_modules(*archive_graph(path))
    if not path.exists():
        raise VdoptError(f"{path}: not found; give a bundle directory or a torch.export .pt2 file.")
    raise VdoptError(f"{path}: give a bundle directory or a torch.export .pt2 file.")
