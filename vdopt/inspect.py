"""`vdopt inspect`: what a bundle holds, or what module structure an exported graph carries."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from vdopt.bundle import read_manifest
from vdopt.errors import VdoptError


def graph_modules(ep: torch.export.ExportedProgram) -> Counter:
    """(module path, class name) pairs found in `nn_module_stack`, with their node counts."""
    found: Counter = Counter()
    for node in ep.graph.nodes:
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values():
            name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            found[(fqn, name.rsplit(".", 1)[-1])] += 1
    return found


def summarize_graph(ep: torch.export.ExportedProgram, limit: int = 25) -> str:
    from vdopt.families import registry

    found = graph_modules(ep)
    classes = Counter(cls for (_, cls) in found)
    lines = [f"{sum(1 for n in ep.graph.nodes if n.op == 'call_function')} ops; module classes: "
             + ", ".join(f"{cls} x{count}" for cls, count in classes.most_common(limit))]
    shallow = sorted({fqn for fqn, _ in found if fqn.count(".") <= 2})
    lines.append("module paths (depth <= 3): " + ", ".join(shallow[:limit]) + (" ..." if len(shallow) > limit else ""))
    matches = [d.family for d in registry().values() if d.matches_class(set(classes)) or any(d.is_block(f) for f, _ in found)]
    lines.append(f"matching families: {', '.join(matches) or 'none'}")
    return "\n".join(lines)


def describe_bundle(path: Path) -> str:
    m = read_manifest(path)
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
    lines.append("segments:")
    for segment in m["segments"]:
        dims = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in segment["dims"].items())
        lines.append(f"  {segment['name']} [{segment['backend']}] {', '.join(segment['files'])}  ({dims})")
        if segment.get("kind") == "split":
            lines.append(f"    split at the conditional; the runtime reads '{segment['flag']}' and runs compute or reuse:")
            lines += [f"    {part['name']:<8} {', '.join(part['files'])}: {len(part['inputs'])} inputs -> "
                      f"{', '.join(s['name'] for s in part['outputs'])}" for part in segment["parts"]]
        for p in segment["passes"]:
            params = f" {p['params']}" if p["params"] else ""
            lines.append(f"    pass {p['name']}{params}: {p['seconds'] * 1000:.1f} ms, {p['nodes_before']} -> {p['nodes_after']} ops")
    return "\n".join(lines)


def describe(path: Path, graph: bool = False) -> str:
    if path.is_dir():
        text = describe_bundle(path)
        if graph:
            segment = next((s for s in read_manifest(path)["segments"] if s["backend"] == "torch" and s["files"]), None)
            if segment is None:
                return text + "\n(--graph needs a torch-backend segment; AOTI and ONNX segments hold no module metadata)"
            text += "\n" + summarize_graph(torch.export.load(str(path / segment["files"][0])))
        return text
    if path.suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise VdoptError(f"{path}: not a torch.export program ({type(exc).__name__}: {str(exc)[:200]}).") from None
        return summarize_graph(ep)
    raise VdoptError(f"{path}: give a bundle directory or a torch.export .pt2 file.")
