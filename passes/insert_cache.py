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
  adacache      AdaCache with MoReg: at each recompute a codebook maps the probe's change (scaled
                by a motion score from consecutive latent frames) to how many steps to reuse.
  teacache      TeaCache: accumulate the rescaled change of the timestep embedding; recompute
                when the sum reaches `threshold`.
Gathering needs a body whose shapes follow its rows: capture with a dynamic batch
(`model.input.batch: {min, max}`), and the sizes the body reads that count rows are recounted for
the gathered subset. A body traced at a static batch bakes it into reshapes (Latte does), and a few
models' shape arithmetic defeats export on a data-dependent row count; such a body runs on all rows
whenever any row recomputes, still selecting per row (`gather_rows` in the manifest says which, and
`gather_rows_failed` why not).
Always computed: blocks before `first` (default 1) and the last `last` blocks; the first `warmup`
and last `final` steps; never more than `max_reuse` reuses in a row. A threshold of 0 never skips.
A step holds one cache: inserting a second is an error, not a no-op (it would cache the cached body).
`ops: fused` makes the decision and the forecast vdopt's custom ops (`vdopt::cache_decision`, one pass over the
probe; `vdopt::taylor_forecast`), one node each with CPU, CUDA and TensorRT kernels; `ops: aten` (the default)
inlines their aten decompositions, the reference they are tested against (docs/custom_ops.md).

`forecast=w` (0 < w <= 1) replaces plain reuse by a damped form of TaylorSeer's first-order forecast
(cache-dit's and diffusers' TaylorSeer calibrator): a row that skips the body at step i gets its last
computed residual r_k (step k) moved along the difference to the one before it (r_j, step j),
`r_k + w * (r_k - r_j) * min(i - k, k - j) / (k - j)`. The residual drifts steadily along a
schedule, so reusing it unchanged falls further behind with every step skipped. w = 1 is
TaylorSeer's order 1; extrapolating past one gap, or at full weight after an uneven gap (adaptive
policies), overshoots: on the reference teacher the change slows as a clip converges (the sweep in
the README's caching section). Costs one more cached tensor per body output and a multiply-add.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
from torch import fx, nn

from vdopt.bundle import SHAPE_NAMES
from vdopt.capture import export_step, named_shape, symbol_names
from vdopt.errors import PassError, first_line
from vdopt.module_stack import module_stack
from vdopt.ops import decompositions, library_path
from vdopt.pass_manager import Pass, editable_module, uncached
from vdopt.program import StateSpec, StepProgram, TensorSpec, dtype_name
from vdopt.regions import Region, block_count, extract_region, find_region, shape_of
from vdopt.safety import shape_expression



def rows_of(index: torch.Tensor, per_sample: int) -> torch.Tensor:
    """Row indices of the samples in `index` for a tensor with `per_sample` rows per sample, sample-major.
    The count is an int fixed at compile time: inside a `torch.cond` branch, sizes read off tensors
    are fresh symbols that export cannot relate to each other."""
    return (index[:, None] * per_sample + torch.arange(per_sample, device=index.device)).reshape(-1)


def flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Branch outputs of `torch.cond` as 1-D: export cannot match the two branches' symbolic
    strides of an N-D tensor whose sizes might be zero (`Max(1, ...)`), but a 1-D one has stride 1."""
    return tuple(t.reshape(-1) for t in tensors)


def row_mask(mask: torch.Tensor, tensor: torch.Tensor, per_sample: int | None = None) -> torch.Tensor:
    """A per-sample mask broadcastable over `tensor`'s rows (dim 0 = samples * per_sample, sample-major)."""
    per_sample = per_sample or tensor.shape[0] // mask.shape[0]
    return mask.repeat_interleave(per_sample).reshape(-1, *[1] * (tensor.dim() - 1))


ADACACHE_CODEBOOKS = {  # distance upper bound -> steps until the next recompute (AdaCache-DiT configs)
    "fast": [(0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (1.0, 1)],   # 30-step schedules
    "slow": [(0.08, 3), (0.16, 2), (0.24, 1), (1.0, 1)],
    "100": [(0.03, 12), (0.05, 10), (0.07, 8), (0.09, 6), (0.11, 4), (1.0, 3)],  # 100-step schedules
}
MOREG_NORM, MOREG_POWER, MOREG_GRAD = 0.385, 8, 10.0
MOREG_WINDOW = (0.1, 0.9)  # fraction of the schedule where MoReg applies (AdaCache: steps 10-90 of 100)


class Policy:
    """A skip rule. `probes` names the graph values it reads; `state` the tensors it carries. The decision
    is `vdopt::cache_decision` (`ops: fused`) or its aten decomposition (`ops: aten`, the reference)."""

    name = ""
    defaults: dict = {}
    probes: tuple[str, ...] = ()

    def __init__(self, params: dict, num_steps: int, patch_frames: int):
        self.params, self.num_steps, self.patch_frames = params, num_steps, patch_frames

    def state(self, probe_shapes: list[tuple], probe_dtype: torch.dtype, samples) -> list[tuple[str, tuple, torch.dtype]]:
        return []

    def decide(self, i, x, probes, state, samples, forced):
        """-> (mask [samples], any(mask), distance [samples], update(mask) -> new state): a row recomputes when
        the rule says so or it is `forced`. `samples` is the number of rows, (sample, guidance branch) pairs:
        symbolic when the batch is."""
        raise NotImplementedError

    def cache_decision(self, probe, prev, accumulated, forced, coefficients=(1.0, 0.0), threshold=math.inf):
        """The fused decision over the probe (see `vdopt.ops.decompositions.cache_decision`); the default
        polynomial is the distance itself and the default threshold leaves the mask to `forced`."""
        op = torch.ops.vdopt.cache_decision if self.params["ops"] == "fused" else decompositions.cache_decision
        return op(probe, prev, accumulated, forced, torch.tensor(coefficients, dtype=torch.float32), float(threshold))


class StaticPolicy(Policy):
    name = "static"
    defaults = {"first": 1, "interval": 2}

    def decide(self, i, x, probes, state, samples, forced):
        mask = ((i - self.params["warmup"]) % self.params["interval"] == 0).expand(samples) | forced
        return mask, mask.any(), torch.zeros(samples, device=i.device), lambda mask: ()


class FirstBlocksPolicy(Policy):
    name = "first_blocks"
    defaults = {"first": 1, "threshold": 0.08}
    probes = ("head_out", "head_in")

    def state(self, probe_shapes, probe_dtype, samples):
        return [("prev_probe", probe_shapes[0], probe_dtype)]

    def decide(self, i, x, probes, state, samples, forced):
        probe, (prev,) = probes[0] - probes[1], state
        mask, flag, distance, _, prev_next = self.cache_decision(probe, prev, torch.zeros_like(forced, dtype=torch.float32),
                                                                 forced, threshold=self.params["threshold"])
        return mask, flag, distance, lambda mask: (prev_next,)


class AdaCachePolicy(Policy):
    """AdaCache: at each recompute, the probe's change since the last recompute (divided by the rate
    that was used) picks from a codebook how many steps to reuse next; MoReg scales that distance by
    a motion score from consecutive latent frames of the probe, so fast motion recomputes more often.
    The probe is the residual of the first `first` blocks (AdaCache reads a middle block's residual,
    which is only known on recompute steps; the first blocks run every step)."""

    name = "adacache"
    defaults = {"first": 1, "codebook": "fast", "codebook_scale": 1.0, "moreg": True}
    probes = ("head_out", "head_in")

    def codebook(self) -> list[tuple[float, int]]:
        book = self.params["codebook"]
        book = ADACACHE_CODEBOOKS[book] if isinstance(book, str) else [tuple(pair) for pair in book]
        return [(bound * self.params["codebook_scale"], rate) for bound, rate in book]

    def state(self, probe_shapes, probe_dtype, samples):
        return [("prev_probe", probe_shapes[0], probe_dtype), ("next_step", (samples,), torch.int64),
                ("rate", (samples,), torch.float32), ("motion", (samples,), torch.float32)]

    def motion(self, probe, x, samples):
        """AdaCache's MoReg score per sample: L1 change between consecutive latent frames of the probe."""
        frames = x.shape[2] // self.patch_frames
        if probe.shape[0] == samples:  # [samples, frames * tokens, ...]: frame-major tokens (Wan, CogVideoX, ...)
            per_frame = probe.unflatten(1, (frames, -1))
        else:  # [samples * frames, tokens, ...]: frames folded into the batch (Latte's spatial blocks)
            per_frame = probe.unflatten(0, (samples, -1))
        # Sums over consecutive frame pairs, written with roll and the two end frames rather than
        # [1:] and [:-1] slices: a (frames - 1)-sized dim makes export guard frames != 2.
        per_frame = per_frame.flatten(2).float()
        first, last = per_frame.select(1, 0), per_frame.select(1, -1)
        change = (per_frame - per_frame.roll(1, dims=1)).abs().sum((1, 2)) - (first - last).abs().sum(1)
        size = 2 * per_frame.abs().sum((1, 2)) - first.abs().sum(1) - last.abs().sum(1)
        return (change / size.clamp(min=1e-12) / MOREG_NORM) ** MOREG_POWER

    def decide(self, i, x, probes, state, samples, forced):
        probe = probes[0] - probes[1]
        prev, next_step, rate, prev_motion = state
        mask, flag, distance, _, prev_next = self.cache_decision(probe, prev, torch.zeros_like(rate), (i >= next_step) | forced)
        distance = distance / rate.clamp(min=1.0)
        motion = prev_motion
        if self.params["moreg"]:
            lo, hi = (int(f * self.num_steps) for f in MOREG_WINDOW)
            motion = self.motion(probe, x, samples)
            gradient = MOREG_GRAD * (motion - prev_motion) / rate.clamp(min=1.0)
            in_window = (i >= lo) & (i < hi)
            distance = torch.where(in_window, distance * (motion + gradient.abs()), distance)
        book = self.codebook()
        bounds = torch.tensor([b for b, _ in book], device=distance.device)
        rates = torch.tensor([r for _, r in book], device=distance.device, dtype=torch.int64)
        new_rate = rates[torch.bucketize(distance, bounds).clamp(max=len(book) - 1)]

        def update(mask):
            return (prev_next, torch.where(mask, i + new_rate, next_step), torch.where(mask, new_rate.float(), rate),
                    torch.where(mask, motion, prev_motion))

        return mask, flag, distance, update


class TeaCachePolicy(Policy):
    """TeaCache: accumulate the polynomially rescaled relative L1 change of the timestep embedding
    (the modulation every block reads) from step to step; recompute and reset once it reaches the
    threshold. The coefficients are fitted per model (numpy.poly1d order, highest degree first)."""

    name = "teacache"
    defaults = {"first": 1, "threshold": 0.1, "coefficients": [1.0, 0.0]}
    probes = ("time_embedding",)

    def state(self, probe_shapes, probe_dtype, samples):
        return [("prev_probe", probe_shapes[0], probe_dtype), ("accumulated", (samples,), torch.float32)]

    def decide(self, i, x, probes, state, samples, forced):
        (embedding,), (prev, accumulated) = probes, state
        mask, flag, total, accumulated_next, _ = self.cache_decision(embedding, prev, accumulated, forced,
                                                                     self.params["coefficients"], self.params["threshold"])
        return mask, flag, total, lambda mask: (embedding, accumulated_next)


POLICIES = {p.name: p for p in (StaticPolicy, FirstBlocksPolicy, AdaCachePolicy, TeaCachePolicy)}
COMMON_DEFAULTS = {"warmup": 1, "final": 1, "max_reuse": 4, "last": 0, "forecast": 0, "ops": "aten"}


class CachedBody(nn.Module):
    """`forward(i, x, *probes, *inputs, *caches, *forecast_state, *policy_state, reuse_run, computed, distance)`
    `-> (*outputs, *caches', *forecast_state', *policy_state', reuse_run', computed', distance')`.

    Rows are (sample, guidance branch) pairs: the step's batch is [cond samples; uncond samples].
    `computed` counts body evaluations per row; `distance` is this step's decision value (for traces).
    With `forecast`, `forecast_state` is the residuals computed before the cached ones and `gap`, the
    steps between those two computations per row (0 until a row has computed twice).
    """

    def __init__(self, body: fx.GraphModule, region: Region, input_rows: list[int], output_rows: list[int],
                 row_scalars: list[int], policy: Policy, num_policy_state: int, copies: int, gather: bool):
        super().__init__()
        self.body = body
        self.streams = region.streams
        self.num_outputs = len(region.outputs)
        self.num_inputs = len(region.inputs)
        self.input_rows = input_rows  # per body input: rows per sample (0: not per sample, e.g. weights)
        self.output_rows = output_rows  # per body output (and cache): rows per sample
        self.is_tensor = [isinstance(n.meta.get("val"), torch.Tensor) for n in region.inputs]
        self.row_scalars = row_scalars  # per scalar input: rows per sample it counts (0: none), recounted for a gathered body
        self.policy = policy
        self.num_policy_state = num_policy_state
        self.copies = copies  # rows per sample of the latent: 2 under guidance (cond, uncond)
        self.forecast = policy.params["forecast"]
        self.gather = gather

    @property
    def num_tensor_inputs(self) -> int:
        return sum(self.is_tensor)

    def reading_sizes(self, branch):
        """`branch(scalars, mask, *tensors)` as a torch.cond branch whose last operands carry the scalar sizes."""
        count = len(self.is_tensor) - self.num_tensor_inputs

        def call(mask, *tensors):
            tensors, carriers = tensors[: len(tensors) - count], tensors[len(tensors) - count:]
            return branch([carrier.shape[1] for carrier in carriers], mask, *tensors)

        return call

    def with_scalars(self, tensors, scalars) -> list:
        tensors, scalars = iter(tensors), iter(scalars)
        return [next(tensors) if is_tensor else next(scalars) for is_tensor in self.is_tensor]

    def forced(self, i: torch.Tensor, reuse_run: torch.Tensor) -> torch.Tensor:
        params = self.policy.params
        edge = (i < params["warmup"]) | (i >= self.policy.num_steps - params["final"])
        capped = reuse_run >= params["max_reuse"] if params["max_reuse"] >= 0 else torch.zeros_like(reuse_run, dtype=torch.bool)
        return edge.expand(reuse_run.shape[0]) | capped

    def split_operands(self, tensors, scalars):
        """Branch operands -> (inputs, caches, bases): `bases` are what a skipping row's body outputs
        are built from, the forecast residuals when forecasting, otherwise the cached ones."""
        inputs = self.with_scalars(tensors[: self.num_tensor_inputs], scalars)
        caches = tensors[self.num_tensor_inputs: self.num_tensor_inputs + self.num_outputs]
        bases = tensors[self.num_tensor_inputs + self.num_outputs:] or caches
        return inputs, caches, bases

    def compute(self, scalars, mask, *tensors):
        samples = mask.shape[0]
        if not self.gather:
            return self.compute_all_rows(mask, *self.split_operands(tensors, scalars))
        index = torch.nonzero(mask).squeeze(1)
        torch._check(index.shape[0] >= 1)  # this branch runs only when some row recomputes
        torch._check(index.shape[0] <= samples)
        scalars = [index.shape[0] * rows if rows else s for s, rows in zip(scalars, self.row_scalars)]
        inputs, caches, bases = self.split_operands(tensors, scalars)
        picked = [t.index_select(0, rows_of(index, rows)) if rows else t for t, rows in zip(inputs, self.input_rows)]
        fresh = self.body(*picked)
        outputs, new_caches = [], []
        for k, (value, cache, base) in enumerate(zip(fresh, caches, bases)):
            rows = rows_of(index, self.output_rows[k])
            stream = self.streams.get(k)
            if stream is None:
                outputs.append(base.index_copy(0, rows, value))
                new_caches.append(cache.index_copy(0, rows, value))
            else:
                outputs.append((inputs[stream] + base).index_copy(0, rows, value))
                new_caches.append(cache.index_copy(0, rows, value - picked[stream]))
        return flat(*outputs, *new_caches)

    def compute_all_rows(self, mask, inputs, caches, bases):
        """For bodies traced with literal batch sizes: run every row, keep the fresh ones where due."""
        fresh = self.body(*inputs)
        outputs, new_caches = [], []
        for k, (value, cache, base) in enumerate(zip(fresh, caches, bases)):
            keep = row_mask(mask, cache, self.output_rows[k])
            stream = self.streams.get(k)
            outputs.append(torch.where(keep, value, base if stream is None else inputs[stream] + base))
            new_caches.append(torch.where(keep, value if stream is None else value - inputs[stream], cache))
        return flat(*outputs, *new_caches)

    def reuse(self, scalars, mask, *tensors):
        inputs, caches, bases = self.split_operands(tensors, scalars)
        outputs = [base.clone() if self.streams.get(k) is None else inputs[self.streams[k]] + base
                   for k, base in enumerate(bases)]
        return flat(*outputs, *(cache.clone() for cache in caches))

    def forecast_bases(self, caches, previous, gap, reuse_run) -> list[torch.Tensor]:
        """Each cached residual moved `forecast` of the way along its first-order Taylor forecast to this
        step, extrapolating at most one gap ahead (plain reuse for rows that have computed only once)."""
        steps_ahead = ((reuse_run + 1).float() / gap.clamp(min=1.0)).clamp(max=1.0)
        weight = torch.where(gap > 0, self.forecast * steps_ahead, torch.zeros_like(gap))
        op = torch.ops.vdopt.taylor_forecast if self.policy.params["ops"] == "fused" else decompositions.taylor_forecast
        return [op(cache, prev, weight) for cache, prev in zip(caches, previous)]

    def forward(self, i, x, *tensors):
        probes = tensors[: len(self.policy.probes)]
        rest = tensors[len(self.policy.probes):]
        inputs = rest[: self.num_inputs]
        caches_end = self.num_inputs + self.num_outputs
        caches = rest[self.num_inputs: caches_end]
        forecast_in = rest[caches_end: caches_end + (self.num_outputs + 1 if self.forecast else 0)]
        policy_state = rest[caches_end + len(forecast_in): len(rest) - 3]
        reuse_run, computed, _ = rest[len(rest) - 3:]
        samples = x.shape[0] * self.copies
        mask, any_due, distance, update = self.policy.decide(i, x, probes, policy_state, samples, self.forced(i, reuse_run))
        # Sizes the body reads (SymInts) ride into the branches as the width of empty tensors: torch.cond takes
        # tensor operands only, and its tracer cannot lift every closed-over size expression (HunyuanVideo's
        # product of two latent dims fails with a LazyProxy error).
        carriers = [x.new_empty((0, v)) for v in inputs if not isinstance(v, torch.Tensor)]
        tensor_inputs = [v for v in inputs if isinstance(v, torch.Tensor)]
        forecast_state, bases = (), ()
        if self.forecast:
            *previous, gap = forecast_in
            bases = self.forecast_bases(caches, previous, gap, reuse_run)
            recomputed_again = mask & (computed > 0)
            forecast_state = (*(torch.where(row_mask(mask, cache), cache, prev) for cache, prev in zip(caches, previous)),
                              torch.where(recomputed_again, (reuse_run + 1).float(), gap))
        results = torch.cond(any_due, self.reading_sizes(self.compute), self.reading_sizes(self.reuse),
                             (mask, *tensor_inputs, *caches, *bases, *carriers))
        results = [r.reshape(cache.shape) for r, cache in zip(results, (*caches, *caches))]
        reuse_run = torch.where(mask, torch.zeros_like(reuse_run), reuse_run + 1)
        return (*results, *forecast_state, *update(mask), reuse_run, computed + mask.to(computed.dtype), distance)


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


def is_number(value, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def is_codebook(book) -> bool:
    return (isinstance(book, str) and book in ADACACHE_CODEBOOKS) or (isinstance(book, list) and bool(book) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and is_number(pair[0]) and is_number(pair[1], integer=True)
        and pair[0] > 0 and pair[1] >= 1 for pair in book))


# name -> (valid?, what is expected): a bad value is refused at compile time, not found at run time
PARAM_CHECKS = {
    "first": (lambda v: is_number(v, True) and v >= 0, "a block count >= 0"),
    "last": (lambda v: is_number(v, True) and v >= 0, "a block count >= 0"),
    "warmup": (lambda v: is_number(v, True) and v >= 0, "a step count >= 0"),
    "final": (lambda v: is_number(v, True) and v >= 0, "a step count >= 0"),
    "interval": (lambda v: is_number(v, True) and v >= 1, "a step interval >= 1"),
    "max_reuse": (lambda v: is_number(v, True) and v >= -1, "a step count >= 0, or -1 for no cap"),
    "threshold": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "forecast": (lambda v: is_number(v) and 0 <= v <= 1,
                 "a weight in [0, 1] (0: reuse the cached residual, 1: TaylorSeer's full first-order forecast)"),
    "codebook_scale": (lambda v: is_number(v) and v > 0, "a finite number > 0"),
    "moreg": (lambda v: isinstance(v, bool), "true or false"),
    "coefficients": (lambda v: isinstance(v, list) and bool(v) and all(is_number(c) for c in v), "a non-empty list of finite numbers"),
    "ops": (lambda v: v in ("aten", "fused"), "aten (the decision and forecast as aten ops, the reference) or fused "
                                              "(vdopt's custom ops: one node each, a CPU/CUDA kernel and a TensorRT plugin)"),
    "codebook": (is_codebook, f"one of {sorted(ADACACHE_CODEBOOKS)} or a list of [distance bound > 0, steps >= 1] pairs"),
}


def resolve_params(policy: str, params: dict) -> dict:
    defaults = {**COMMON_DEFAULTS, **POLICIES[policy].defaults}
    unknown = set(params) - set(defaults)
    if unknown:
        raise PassError(f"insert_cache: unknown parameter(s) {sorted(unknown)} for policy {policy}; known: {sorted(defaults)}.")
    for name, value in params.items():
        valid, expected = PARAM_CHECKS[name]
        if not valid(value):
            raise PassError(f"insert_cache: {name}={value!r}; expected {expected}.")
    return {**defaults, **params}


def time_embedding_output(graph: fx.Graph, program: StepProgram, before: fx.Node) -> fx.Node:
    """The last value computed inside the time-embedding module ahead of the body: its output."""
    found = None
    for node in graph.nodes:
        if node is before:
            break
        if node.op == "call_function" and any(program.descriptor.is_time_embedding(fqn) for fqn, _ in module_stack(node)):
            found = node
    if found is None:
        raise PassError(f"insert_cache: teacache needs the time embedding ('{program.descriptor.time_embedding_pattern}'), "
                        f"which is not in the graph's metadata.")
    return found


def probe_nodes(policy: Policy, graph: fx.Graph, program: StepProgram, first: int, region: Region) -> list[fx.Node]:
    if not policy.probes:
        return []
    if policy.probes == ("time_embedding",):
        # export hoists a block's size reads (sym_size) far ahead of it: the body starts at its first tensor op
        start = next(n for n in region.nodes if isinstance(n.meta.get("val"), torch.Tensor))
        return [time_embedding_output(graph, program, start)]
    if first < 1:
        raise PassError(f"insert_cache: {policy.name} needs first >= 1: the first blocks' residual is the probe.")
    stream = find_region(graph, program.descriptor, 0, first).main_stream()
    if stream is None:
        raise PassError("insert_cache: the first blocks have no residual stream to probe.")
    return list(stream)


def size_expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def rows_per_sample(size, samples) -> int | None:
    """`size / samples` when `size` counts a fixed number of rows per sample for every batch (`16*batch`
    of `2*batch` samples: 8), else None. With a static batch both are ints."""
    ratio = sympy.simplify(size_expr(size) / size_expr(samples))
    return int(ratio) if ratio.is_Integer and ratio > 0 else None


def rows_of_node(node: fx.Node, samples) -> int | None:
    shape = shape_of(node)
    return rows_per_sample(shape[0], samples) if shape else None


def rows_scalar(node: fx.Node, samples) -> int | None:
    """For a size the body reads: how many rows per sample it counts (a body run on a subset of the
    samples must read the subset's count), 0 when it does not depend on the batch, None when it
    depends on it otherwise (or per sample on another dynamic size)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.SymInt) or not size_expr(value).free_symbols & size_expr(samples).free_symbols:
        return 0
    return rows_per_sample(value, samples)


def export_cached(module: fx.GraphModule, cached: CachedBody, example_inputs: tuple, program: StepProgram,
                  state_shapes: list) -> tuple[torch.export.ExportedProgram, str | None]:
    """Exports the cached step, gathering rows if it can. Some models' shape arithmetic does not survive a
    data-dependent row count (export cannot prove its guards): their body then runs on every row when
    any recomputes, still selecting per row, and the reason is returned."""
    try:
        return export_step(module, example_inputs, program.dims, program.multiples, state_shapes), None
    except Exception as exc:  # noqa: BLE001
        if not cached.gather:
            batch = program.dims["batch"]
            hint = (f" A static batch often exports where a dynamic one ({batch[0]}..{batch[1]}) does not: try an int "
                    f"model.input.batch." if batch[0] != batch[1] else "")
            raise PassError(f"insert_cache: the cached step program could not be exported: {type(exc).__name__}: "
                            f"{first_line(exc)}.{hint}") from exc
        reason = f"{type(exc).__name__}: {first_line(exc)[:300]}"
    cached.gather = False
    return export_cached(module, cached, example_inputs, program, state_shapes)[0], reason


def check_named(state: tuple[StateSpec, ...]) -> None:
    """Every state size is an expression of the step dims, or the runtime could not allocate it."""
    for spec in state:
        for size in spec.shape:
            if type(size) is not int:
                try:
                    shape_expression(size, SHAPE_NAMES)
                except ValueError:
                    raise PassError(f"insert_cache: the size {size!r} of {spec.name} {list(spec.shape)} is not an expression "
                                    f"of the step dims (batch, frames, height, width), so a run could not allocate it. "
                                    f"Make the dynamic dims static (model.input or lower.profiles).") from None


def insert_cache(program: StepProgram, policy: str = "first_blocks", **params) -> StepProgram:
    with program.tracing():
        return insert_cache_traced(program, policy, **params)


def insert_cache_traced(program: StepProgram, policy: str, **params) -> StepProgram:
    if not uncached(program):
        existing = program.extras.get("cache", {})
        raise PassError(f"insert_cache: the program already has a cache (policy {existing.get('policy', '?')}, body blocks "
                        f"{existing.get('body_blocks', '?')}); a second one would cache the cached body and the first "
                        f"cache's state. List insert_cache once in the recipe's passes.")
    if policy not in POLICIES:
        raise PassError(f"insert_cache: policy '{policy}' is not one of {', '.join(POLICIES)}.")
    params = resolve_params(policy, params)
    if params["ops"] == "fused":
        library_path()  # the op library, built on first use
    rule = POLICIES[policy](params, program.num_steps, program.multiples[0])
    module = editable_module(program)
    module.graph._codegen = fx.graph.CodeGen()
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    latent, step_index = placeholders[:2]
    copies = 2 if program.guidance else 1
    samples = shape_of(latent)[0] * copies  # symbolic when the batch is dynamic
    blocks = block_count(graph, program.descriptor)
    first, stop = params["first"], blocks - params["last"]
    if not first < stop:
        raise PassError(f"insert_cache: the body [first={first}, {blocks}-last={stop}) is empty; the model has {blocks} blocks.")
    region = find_region(graph, program.descriptor, first, stop)
    probes = probe_nodes(rule, graph, program, first, region)
    for node in [*region.outputs, *probes]:
        if rows_of_node(node, samples) is None:
            raise PassError(f"insert_cache: '{node.name}' {shape_of(node)} has no fixed number of rows per sample; it "
                            f"cannot be cached per sample.")
    input_rows = [rows_of_node(n, samples) or 0 if isinstance(n.meta.get("val"), torch.Tensor) else 0 for n in region.inputs]
    output_rows = [rows_of_node(n, samples) for n in region.outputs]

    probe_dtype = probes[0].meta["val"].dtype if probes else torch.float32
    policy_state = rule.state([shape_of(n) for n in probes], probe_dtype, samples)
    body = extract_region(module, region)
    row_scalars = [rows_scalar(n, samples) for n in region.inputs if not isinstance(n.meta.get("val"), torch.Tensor)]
    row_counts = {c for c in [*(shape_of(n)[0] for n in region.outputs),
                              *(shape_of(n)[0] for n, rows in zip(region.inputs, input_rows) if rows)] if isinstance(c, int)}
    not_gathered = ("a size the body reads depends on the batch other than per sample" if None in row_scalars else
                    "the body names a batch size as a literal (a static model.input.batch, or a model that bakes it "
                    "into a reshape)" if has_literal_rows(body, row_counts) else None)
    cached = CachedBody(body, region, input_rows, output_rows, [r or 0 for r in row_scalars], rule, len(policy_state),
                        copies, not_gathered is None)
    module.add_submodule("vdopt_cache", cached)

    state_values = [(f"cache.{k}", shape_of(o), o.meta["val"].dtype) for k, o in enumerate(region.outputs)]
    if params["forecast"]:
        state_values += [(f"cache_before.{k}", shape, dtype) for k, (_, shape, dtype) in enumerate(state_values)]
        state_values.append(("gap", (samples,), torch.float32))
    state_values += [*policy_state, ("reuse_run", (samples,), torch.int64), ("computed", (samples,), torch.int64),
                     ("distance", (samples,), torch.float32)]
    with graph.inserting_after(placeholders[-1]):
        state_nodes = []
        for name, _, _ in reversed(state_values):
            state_nodes.insert(0, graph.placeholder(f"state_{name.replace('.', '_')}"))
    with graph.inserting_after(region.last):
        call = graph.call_module("vdopt_cache", (step_index, latent, *probes, *region.inputs, *state_nodes))
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
    rename = symbol_names(program.ep, program.dims)
    state_shapes = [*(s.shape for s in program.state), *(named_shape(shape, rename) for _, shape, _ in state_values)]
    ep, export_refused = export_cached(module, cached, example_inputs, program, state_shapes)
    why_not_gathered = not_gathered or export_refused
    state = tuple(StateSpec(f"state.{name}", shape, dtype_name(dtype))
                  for (name, _, dtype), shape in zip(state_values, state_shapes[len(program.state):]))
    check_named(state)
    return program.replace(
        ep=ep, example_inputs=example_inputs, state=(*program.state, *state),
        inputs=(*program.inputs, *(TensorSpec(s.name, s.shape, s.dtype) for s in state)),
        outputs=(*program.outputs, *(TensorSpec(s.name, s.shape, s.dtype) for s in state)),
        extras={**program.extras, "cache": {"policy": policy, **params, "body_blocks": [first, stop], "num_blocks": blocks,
                                            "gather_rows": cached.gather,
                                            **({"gather_rows_failed": why_not_gathered} if why_not_gathered else {})}},
    )


PASS = Pass(name="insert_cache", run=insert_cache, doc=__doc__, requires=("blocks_found", "uncached"), guarantees=("cached",),
            invalidates=("uncached",))
