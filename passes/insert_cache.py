"""Cache a body of transformer blocks, with the skip decision made inside the step graph.

Every caching library (AdaCache, TeaCache, cache-dit, diffusers hooks) decides in host Python
with `.item()`, one decision for the whole batch, and none survives export. This pass rewrites the
step program so that blocks [first, num_blocks - last) — the *body* — are either computed or
replaced by their cached residual, chosen per sample and per guidance branch by a predicate that
is part of the graph (ARCHITECTURE contract 5). The body runs only on the rows that need it
(gather, body, scatter, under `torch.cond`), so a batch of different prompts gives each the result
it would get alone. Cached residuals, the previous probe and the counters are declared step
state (contract 2), so every run starts clean.

Policies (`policy=`):
  static        recompute every `interval`-th step; a fixed schedule for comparison.
  first_blocks  DBCache / first-block cache: the residual of the first `first` blocks is the
                probe; recompute a row when its relative L1 change since that row's last
                recompute reaches `threshold`.
Always computed: the first `warmup` and last `final` steps; never more than `max_reuse` reuses
in a row. A threshold of 0 never skips.
"""

from __future__ import annotations

import operator
from functools import partial

import torch
from torch import fx, nn

from vdopt.capture import export_step, symbol_names
from vdopt.errors import PassError
from vdopt.pass_manager import Pass
from vdopt.program import StateSpec, StepProgram, TensorSpec, dtype_name
from vdopt.regions import Region, block_count, extract_region, find_region, shape_of

POLICIES = ("static", "first_blocks")


def rows_of(tensor: torch.Tensor, index: torch.Tensor, samples: int) -> torch.Tensor:
    """Row indices of the samples in `index` for a tensor whose dim 0 is samples * r, sample-major."""
    per_sample = tensor.shape[0] // samples
    return (index[:, None] * per_sample + torch.arange(per_sample, device=index.device)).reshape(-1)


def flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Branch outputs of `torch.cond` as 1-D: export cannot match the two branches' symbolic
    strides of an N-D tensor whose sizes might be zero (`Max(1, ...)`), but a 1-D one has stride 1."""
    return tuple(t.reshape(-1) for t in tensors)


def row_mask(mask: torch.Tensor, tensor: torch.Tensor, samples: int) -> torch.Tensor:
    """A per-sample mask broadcastable over `tensor`'s rows (dim 0 = samples * r, sample-major)."""
    return mask.repeat_interleave(tensor.shape[0] // samples).reshape(-1, *[1] * (tensor.dim() - 1))


def relative_l1(now: torch.Tensor, before: torch.Tensor, samples: int) -> torch.Tensor:
    change = (now - before).abs().reshape(samples, -1).mean(1)
    return change / before.abs().reshape(samples, -1).mean(1).clamp(min=1e-12)


class CachedBody(nn.Module):
    """`forward(i, *probe, *inputs, *caches, prev_probe, reuse_run, computed, distance) -> same, updated`.

    Rows are (sample, guidance branch) pairs: the step's batch is [cond samples; uncond samples].
    `computed` counts body evaluations per row; `distance` is this step's probe change (for traces).
    """

    def __init__(self, body: fx.GraphModule, region: Region, batched: list[bool], samples: int, num_steps: int,
                 policy: str, params: dict):
        super().__init__()
        self.body = body
        self.streams = region.streams
        self.num_outputs = len(region.outputs)
        self.num_inputs = len(region.inputs)
        self.batched = batched
        self.is_tensor = [isinstance(n.meta.get("val"), torch.Tensor) for n in region.inputs]
        self.samples = samples
        self.num_steps = num_steps
        self.policy = policy
        self.params = params
        self.gather = True

    @property
    def num_tensor_inputs(self) -> int:
        return sum(self.is_tensor)

    def with_scalars(self, tensors, scalars) -> list:
        tensors, scalars = iter(tensors), iter(scalars)
        return [next(tensors) if is_tensor else next(scalars) for is_tensor in self.is_tensor]

    def forced(self, i: torch.Tensor) -> torch.Tensor:
        warmup, final = self.params["warmup"], self.params["final"]
        return (i < warmup) | (i >= self.num_steps - final)

    def decide(self, i, probe, prev_probe, reuse_run):
        """(recompute mask, distance) per row; the distance is 0 for the static policy."""
        forced = self.forced(i).expand(self.samples)
        if self.policy == "static":
            distance = torch.zeros(self.samples, device=reuse_run.device)
            due = ((i - self.params["warmup"]) % self.params["interval"] == 0).expand(self.samples)
        else:
            distance = relative_l1(probe, prev_probe, self.samples).float()
            due = distance >= self.params["threshold"]
        cap = self.params["max_reuse"]
        return forced | due | (reuse_run >= cap if cap >= 0 else torch.zeros_like(due)), distance

    def compute(self, scalars, mask, *tensors):
        inputs, caches = self.with_scalars(tensors[: self.num_tensor_inputs], scalars), tensors[self.num_tensor_inputs:]
        if not self.gather:
            return self.compute_all_rows(mask, inputs, caches)
        index = torch.nonzero(mask).squeeze(1)
        torch._check(index.shape[0] >= 1)  # this branch runs only when some row recomputes
        torch._check(index.shape[0] <= self.samples)
        picked = [t.index_select(0, rows_of(t, index, self.samples)) if b else t for t, b in zip(inputs, self.batched)]
        fresh = self.body(*picked)
        outputs, new_caches = [], []
        for k, (value, cache) in enumerate(zip(fresh, caches)):
            rows = rows_of(cache, index, self.samples)
            stream = self.streams.get(k)
            if stream is None:
                outputs.append(cache.index_copy(0, rows, value))
                new_caches.append(outputs[-1].clone())
            else:
                outputs.append((inputs[stream] + cache).index_copy(0, rows, value))
                new_caches.append(cache.index_copy(0, rows, value - picked[stream]))
        return flat(*outputs, *new_caches)

    def compute_all_rows(self, mask, inputs, caches):
        """For bodies traced with literal batch sizes: run every row, keep the fresh ones where due."""
        fresh = self.body(*inputs)
        outputs, new_caches = [], []
        for k, (value, cache) in enumerate(zip(fresh, caches)):
            keep = row_mask(mask, cache, self.samples)
            stream = self.streams.get(k)
            base = cache if stream is None else inputs[stream] + cache
            outputs.append(torch.where(keep, value, base))
            new_caches.append(torch.where(keep, value if stream is None else value - inputs[stream], cache))
        return flat(*outputs, *new_caches)

    def reuse(self, scalars, mask, *tensors):
        inputs, caches = self.with_scalars(tensors[: self.num_tensor_inputs], scalars), tensors[self.num_tensor_inputs:]
        outputs = [cache.clone() if self.streams.get(k) is None else inputs[self.streams[k]] + cache
                   for k, cache in enumerate(caches)]
        return flat(*outputs, *(cache.clone() for cache in caches))

    def forward(self, i, *tensors):
        has_probe = self.policy != "static"
        probe = tensors[0] - tensors[1] if has_probe else None
        rest = tensors[2:] if has_probe else tensors
        inputs = rest[: self.num_inputs]
        caches = rest[self.num_inputs: self.num_inputs + self.num_outputs]
        prev_probe, reuse_run, computed, _ = rest[self.num_inputs + self.num_outputs:]
        mask, distance = self.decide(i, probe, prev_probe, reuse_run)
        scalars = [v for v in inputs if not isinstance(v, torch.Tensor)]  # sizes: closed over, not operands
        tensor_inputs = [v for v in inputs if isinstance(v, torch.Tensor)]
        results = torch.cond(mask.any(), partial(self.compute, scalars), partial(self.reuse, scalars),
                             (mask, *tensor_inputs, *caches))
        results = [r.reshape(cache.shape) for r, cache in zip(results, (*caches, *caches))]
        new_prev = torch.where(row_mask(mask, probe, self.samples), probe, prev_probe) if has_probe else prev_probe
        reuse_run = torch.where(mask, torch.zeros_like(reuse_run), reuse_run + 1)
        return (*results, new_prev, reuse_run, computed + mask.to(computed.dtype), distance)


SIZED_OPS = {"view", "reshape", "_unsafe_view", "expand", "new_zeros", "new_empty", "new_ones", "new_full",
             "zeros", "ones", "empty", "full", "randn"}


def has_literal_rows(body: fx.GraphModule, row_counts: set[int]) -> bool:
    """Whether a shape op in the body names a batch size as a literal (traced at a static batch):
    such a body computes garbage on a gathered subset of rows, so it must run on all of them."""
    for node in body.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in SIZED_OPS:
            continue
        sizes = next((a for a in node.args if isinstance(a, (list, tuple))), None)
        if sizes and isinstance(sizes[0], int) and sizes[0] in row_counts:
            return True
    return False


def concrete(shape) -> list[int]:
    return [d if isinstance(d, int) else int(d.node.hint) for d in shape]


def default_params(policy: str, params: dict) -> dict:
    defaults = {"warmup": 1, "final": 1, "max_reuse": 4, "last": 0}
    if policy == "static":
        defaults.update(first=0, interval=2)
    else:
        defaults.update(first=1, threshold=0.08)
    unknown = set(params) - set(defaults)
    if unknown:
        raise PassError(f"insert_cache: unknown parameter(s) {sorted(unknown)} for policy {policy}; known: {sorted(defaults)}.")
    return {**defaults, **params}


def insert_cache(program: StepProgram, policy: str = "first_blocks", **params) -> StepProgram:
    if policy not in POLICIES:
        raise PassError(f"insert_cache: policy '{policy}' is not one of {', '.join(POLICIES)}.")
    if program.extras.get("cache"):
        return program
    params = default_params(policy, params)
    samples = program.example_inputs[0].shape[0] * (2 if program.guidance else 1)
    module = program.ep.module()
    module.graph._codegen = fx.graph.CodeGen()
    graph = module.graph
    blocks = block_count(graph, program.descriptor)
    first, stop = params["first"], blocks - params["last"]
    if policy != "static" and first < 1:
        raise PassError("insert_cache: first_blocks needs first >= 1: the first blocks' residual is the probe.")
    if not first < stop:
        raise PassError(f"insert_cache: the body [first={first}, {blocks}-last={stop}) is empty; the model has {blocks} blocks.")
    region = find_region(graph, program.descriptor, first, stop)
    probe_nodes: list[fx.Node] = []
    if policy != "static":
        stream = find_region(graph, program.descriptor, 0, first).main_stream()
        if stream is None:
            raise PassError("insert_cache: the first blocks have no residual stream to probe.")
        probe_nodes = list(stream)
    batched = [bool(shape_of(n)) and isinstance(shape_of(n)[0], int) and shape_of(n)[0] % samples == 0 for n in region.inputs]
    for o in region.outputs:
        if not (shape_of(o) and isinstance(shape_of(o)[0], int) and shape_of(o)[0] % samples == 0):
            raise PassError(f"insert_cache: body output '{o.name}' {shape_of(o)} has no per-sample rows; it cannot be cached per sample.")

    body = extract_region(module, region)
    cached = CachedBody(body, region, batched, samples, program.num_steps, policy, params)
    row_counts = {shape_of(n)[0] for n, b in zip([*region.inputs, *region.outputs], [*batched, *[True] * len(region.outputs)]) if b}
    cached.gather = not has_literal_rows(body, row_counts)
    module.add_submodule("vdopt_cache", cached)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    step_index = placeholders[1]
    probe_shape = shape_of(probe_nodes[0]) if probe_nodes else (1,)
    state_values = [(f"cache.{k}", shape_of(o), o.meta["val"].dtype) for k, o in enumerate(region.outputs)]
    state_values += [("prev_probe", probe_shape, probe_nodes[0].meta["val"].dtype if probe_nodes else torch.float32),
                     ("reuse_run", (samples,), torch.int64), ("computed", (samples,), torch.int64),
                     ("distance", (samples,), torch.float32)]
    with graph.inserting_after(placeholders[-1]):
        state_nodes = []
        for name, _, _ in reversed(state_values):
            state_nodes.insert(0, graph.placeholder(f"state_{name.replace('.', '_')}"))
    with graph.inserting_after(region.last):
        call = graph.call_module("vdopt_cache", (step_index, *probe_nodes, *region.inputs, *state_nodes))
    with graph.inserting_after(call):
        results = [graph.call_function(operator.getitem, (call, k))
                   for k in range(len(region.outputs) + len(state_values))]
    for k, out in enumerate(region.outputs):
        out.replace_all_uses_with(results[k], delete_user_cb=lambda user: user is not call and user not in set(region.nodes))
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((*output.args[0], *results[len(region.outputs):]),)
    for node in reversed(region.nodes):
        if not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    module = fx.GraphModule(module, graph)  # a plain module: the exported one checks calls against its old signature

    examples = [torch.zeros(concrete(shape), dtype=dtype) for _, shape, dtype in state_values]
    example_inputs = (*program.example_inputs, *examples)
    num_state = len(program.state) + len(examples)
    try:
        ep = export_step(module, example_inputs, program.dims, program.descriptor, num_state=num_state)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"insert_cache: the cached step program could not be exported: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from exc
    rename = symbol_names(ep, program.dims)
    state = tuple(StateSpec(f"state.{name}", tuple(d if isinstance(d, int) else rename(d) for d in shape), dtype_name(dtype))
                  for name, shape, dtype in state_values)
    return program.replace(
        ep=ep, example_inputs=example_inputs, state=(*program.state, *state),
        inputs=(*program.inputs, *(TensorSpec(s.name, s.shape, s.dtype) for s in state)),
        outputs=(*program.outputs, *(TensorSpec(s.name, s.shape, s.dtype) for s in state)),
        extras={**program.extras, "cache": {"policy": policy, **params, "body_blocks": [first, stop], "num_blocks": blocks,
                                            "gather_rows": cached.gather}},
    )


PASS = Pass(name="insert_cache", run=insert_cache, doc=__doc__, requires=("blocks_found",), guarantees=("cached",))
