"""vdopt's ops in ONNX: one `trt.plugins` node each, carrying its decomposition as a model-local function.

TensorRT's ONNX parser imports a node that has a `plugin_namespace` attribute as the registered plugin of
that name (cuda/plugins) and otherwise inlines the local function; ONNX Runtime always runs the function.
So the one file runs everywhere. The exporter inlines every local function it is given
(research/cpp_cuda_profile.md), so the functions are appended after export (`attach_functions`).

Each plugin node is declared as an `onnx.defs.OpSchema` (types and attributes, which `onnx.checker`
then enforces) plus the ranks below (`check_plugin_nodes`); the function bodies are tested against the
aten decompositions (`vdopt.ops.decompositions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op

DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE = "vdopt"  # QDP registers `vdopt::cache_decision`: namespace vdopt, name cache_decision
PLUGIN_VERSION = "1"
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

plugins = onnxscript.values.Opset(DOMAIN, 1)
translations = onnxscript.values.Opset("vdopt.translate", 1)  # wrappers the exporter inlines into bare plugin nodes


@dataclass(frozen=True)
class PluginSpec:
    """A plugin node's declaration: its ONNX schema and each input's and output's rank (`same:NAME` follows
    an input's rank; `>=1` any rank of at least one)."""

    schema: OpSchema
    input_ranks: tuple[str, ...]
    output_ranks: tuple[str, ...]


def parameter(name: str, type_str: str) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str)


PLUGIN_ATTRIBUTES = [
    OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=True),
    OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version", required=True),
]

SPECS = {
    "cache_decision": PluginSpec(
        OpSchema("cache_decision", DOMAIN, 1, doc="vdopt::cache_decision (vdopt.ops.decompositions.cache_decision)",
                 inputs=[parameter("probe", "T"), parameter("prev", "T"), parameter("accumulated", "tensor(float)"),
                         parameter("forced", "tensor(bool)"), parameter("coefficients", "tensor(float)")],
                 outputs=[parameter("mask", "tensor(bool)"), parameter("any", "tensor(bool)"),
                          parameter("value", "tensor(float)"), parameter("accumulated_next", "tensor(float)"),
                          parameter("prev_next", "T")],
                 type_constraints=[("T", FLOATS, "the probe's dtype")],
                 attributes=[OpSchema.Attribute("threshold", OpSchema.AttrType.FLOAT, "recompute at value >= threshold",
                                                required=True), *PLUGIN_ATTRIBUTES]),
        input_ranks=(">=1", "same:probe", "1", "1", "1"), output_ranks=("1", "0", "1", "1", "same:probe")),
    "taylor_forecast": PluginSpec(
        OpSchema("taylor_forecast", DOMAIN, 1, doc="vdopt::taylor_forecast (vdopt.ops.decompositions.taylor_forecast)",
                 inputs=[parameter("cache", "T"), parameter("previous", "T"), parameter("weight", "tensor(float)")],
                 outputs=[parameter("forecast", "T")], type_constraints=[("T", FLOATS, "the cache's dtype")],
                 attributes=PLUGIN_ATTRIBUTES),
        input_ranks=(">=1", "same:cache", "1"), output_ranks=("same:cache",)),
    "layer_norm_modulate": PluginSpec(
        OpSchema("layer_norm_modulate", DOMAIN, 1, doc="vdopt::layer_norm_modulate (vdopt.ops.decompositions.layer_norm_modulate)",
                 inputs=[parameter("x", "T"), parameter("scale", "T"), parameter("shift", "T")],
                 outputs=[parameter("y", "T")], type_constraints=[("T", FLOATS, "the activations' dtype")],
                 attributes=[OpSchema.Attribute("eps", OpSchema.AttrType.FLOAT, "LayerNorm epsilon", required=True),
                             *PLUGIN_ATTRIBUTES]),
        input_ranks=("3", "3", "3"), output_ranks=("3",)),
}

for _spec in SPECS.values():
    if not onnx.defs.has(_spec.schema.name, _spec.schema.domain):
        onnx.defs.register_schema(_spec.schema)


@onnxscript.script(translations)
def translate_cache_decision(probe: FLOAT, prev: FLOAT, accumulated: FLOAT, forced: BOOL, coefficients: FLOAT,
                             threshold: float) -> tuple[BOOL, BOOL, FLOAT, FLOAT, FLOAT]:
    mask, any_due, value, accumulated_next, prev_next = plugins.cache_decision(
        probe, prev, accumulated, forced, coefficients, threshold=threshold, plugin_namespace="vdopt", plugin_version="1")
    return mask, any_due, value, accumulated_next, prev_next


@onnxscript.script(translations)
def translate_taylor_forecast(cache: FLOAT, previous: FLOAT, weight: FLOAT) -> FLOAT:
    return plugins.taylor_forecast(cache, previous, weight, plugin_namespace="vdopt", plugin_version="1")


@onnxscript.script(translations)
def translate_layer_norm_modulate(x: FLOAT, scale: FLOAT, shift: FLOAT, eps: float) -> FLOAT:
    return plugins.layer_norm_modulate(x, scale, shift, eps=eps, plugin_namespace="vdopt", plugin_version="1")


TRANSLATIONS = {"cache_decision": translate_cache_decision, "taylor_forecast": translate_taylor_forecast,
                "layer_norm_modulate": translate_layer_norm_modulate}


def translation_table() -> dict:
    """The exporter's `custom_translation_table` for the vdopt ops this process has loaded."""
    return {getattr(torch.ops.vdopt, name).default: function for name, function in TRANSLATIONS.items()
            if hasattr(torch.ops.vdopt, name)}


@onnxscript.script(plugins, default_opset=op)
def cache_decision(probe, prev, accumulated, forced, coefficients, threshold: float):
    rows = op.Shape(forced)
    by_row = op.Concat(rows, op.Constant(value_ints=[-1]), axis=0)
    now = op.Reshape(probe, by_row)
    before = op.Reshape(prev, by_row)
    now_f = op.Cast(now, to=1)
    before_f = op.Cast(before, to=1)
    changed = op.ReduceMean(op.Abs(now_f - before_f), op.Constant(value_ints=[1]), keepdims=0)
    size = op.ReduceMean(op.Abs(before_f), op.Constant(value_ints=[1]), keepdims=0)
    distance = changed / op.Max(size, op.Constant(value_float=1e-12))
    degree = op.Shape(coefficients)
    exponents = op.Cast(op.Range(op.Squeeze(degree) - 1, op.Constant(value_int=-1), op.Constant(value_int=-1)), to=1)
    powers = op.Pow(op.Unsqueeze(distance, op.Constant(value_ints=[1])), exponents)
    value = accumulated + op.ReduceSum(powers * coefficients, op.Constant(value_ints=[1]), keepdims=0)
    mask = op.Or(op.GreaterOrEqual(value, op.Constant(value_float=threshold)), forced)
    any_due = op.Greater(op.ReduceMax(op.Cast(mask, to=1), keepdims=0), op.Constant(value_float=0.0))
    accumulated_next = op.Where(mask, op.CastLike(op.Constant(value_float=0.0), value), value)
    prev_next = op.Reshape(op.Where(op.Unsqueeze(mask, op.Constant(value_ints=[1])), now, before), op.Shape(prev))
    return mask, any_due, value, accumulated_next, prev_next


@onnxscript.script(plugins, default_opset=op)
def taylor_forecast(cache, previous, weight):
    by_row = op.Concat(op.Shape(weight), op.Constant(value_ints=[-1]), axis=0)
    step = op.Reshape(cache - previous, by_row) * op.Unsqueeze(op.CastLike(weight, cache), op.Constant(value_ints=[1]))
    return cache + op.Reshape(step, op.Shape(cache))


@onnxscript.script(plugins, default_opset=op)
def layer_norm_modulate(x, scale, shift, eps: float):
    last = op.Constant(value_ints=[-1])
    centred = x - op.ReduceMean(x, last, keepdims=1)
    variance = op.ReduceMean(centred * centred, last, keepdims=1)
    normed = centred / op.Sqrt(variance + op.CastLike(op.Constant(value_float=eps), x))
    return normed * (scale + op.CastLike(op.Constant(value_float=1.0), scale)) + shift


BODIES = {"cache_decision": cache_decision, "taylor_forecast": taylor_forecast, "layer_norm_modulate": layer_norm_modulate}


def function_proto(name: str, opset: int) -> onnx.FunctionProto:
    """The plugin's decomposition as a local function at the model's default-domain opset (the checker wants one
    version; the ops the bodies use are unchanged from opset 18 to 21), declaring the node's plugin attributes
    too (ONNX Runtime refuses a node attribute its function does not declare)."""
    function = BODIES[name].to_function_proto()
    for entry in function.opset_import:
        if entry.domain == "":
            entry.version = opset
    declared = set(function.attribute) | {a.name for a in function.attribute_proto}
    function.attribute.extend(a.name for a in PLUGIN_ATTRIBUTES if a.name not in declared)
    return function


def plugin_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        if node.domain == DOMAIN:
            yield node
        for attribute in node.attribute:  # `If` branches
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from plugin_nodes(subgraph)


def attach_functions(model: onnx.ModelProto) -> list[str]:
    """Appends the function of every plugin op the model uses (once each); returns their names."""
    used = sorted({node.op_type for node in plugin_nodes(model.graph)})
    present = {(f.domain, f.name) for f in model.functions}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model.functions.extend(function_proto(name, opset) for name in used if (DOMAIN, name) not in present)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return used


def value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.output, *graph.value_info]
            if v.type.tensor_type.HasField("shape")}


def check_plugin_nodes(model: onnx.ModelProto) -> None:
    """Every plugin node against its declaration: a known op, its domain, the plugin attributes TensorRT reads, and
    each input's and output's rank where shape inference knows it. Raises ValueError naming the node."""
    ranks = value_ranks(model)
    for node in plugin_nodes(model.graph):
        where = f"plugin node {node.name or node.op_type}"
        spec = SPECS.get(node.op_type)
        if spec is None:
            raise ValueError(f"{where}: {DOMAIN}::{node.op_type} is not a vdopt plugin ({', '.join(SPECS)})")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        declared = {a.name for a in spec.schema.attributes.values()}
        if set(attributes) - declared:
            raise ValueError(f"{where}: undeclared attribute(s) {sorted(set(attributes) - declared)}")
        if attributes.get("plugin_namespace") != PLUGIN_NAMESPACE.encode() or attributes.get("plugin_version") != PLUGIN_VERSION.encode():
            raise ValueError(f"{where}: plugin_namespace/plugin_version must be {PLUGIN_NAMESPACE}/{PLUGIN_VERSION}, got "
                             f"{attributes.get('plugin_namespace')}/{attributes.get('plugin_version')}")
        names = [p.name for p in spec.schema.inputs]
        if len(node.input) != len(names) or len(node.output) != len(spec.output_ranks):
            raise ValueError(f"{where}: {len(node.input)} inputs and {len(node.output)} outputs, declared "
                             f"{len(names)} and {len(spec.output_ranks)}")
        for values, rules in ((node.input, spec.input_ranks), (node.output, spec.output_ranks)):
            for value, rule in zip(values, rules):
                if value not in ranks:
                    continue
                rank = ranks[value]
                expected = ranks.get(node.input[names.index(rule[5:])]) if rule.startswith("same:") else None
                ok = rank >= 1 if rule == ">=1" else rank == expected if rule.startswith("same:") else rank == int(rule)
                if not ok and not (rule.startswith("same:") and expected is None):
                    raise ValueError(f"{where}: '{value}' has rank {rank}, declared {rule}")
