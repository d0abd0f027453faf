"""Pipeline parallel (the seed paper's Eq. 10) with ``torch.distributed.pipelining``, and its
hybrid with data parallel on a 2-D mesh.

S ranks each hold consecutive blocks (the layer-wise split of Eq. 8: memory per rank ~1/S
of the weights, gradients and optimizer state); a batch is cut into M micro-batches that
flow through the stages. GPipe runs every forward, then every backward; 1F1B alternates
once the pipe is full, so at most S micro-batches of activations are live on a stage
instead of M. Either way each stage idles while the pipe fills and drains, the bubble:

    bubble = (S - 1) / (M + S - 1)          (GPipe, equal stage times)

With t a stage's forward + backward time on the whole batch (t/M per micro-batch), a step
takes (M + S - 1) t / M; bubble-free would be t. The seed paper's Eq. 10, throughput =
1 / (t + (S-1)/S t), is this step at M = S: it has a bubble, (S - 1) / (2S - 1) (1/3 at
S = 2), and is right for a batch cut into as many micro-batches as stages; it over-states
the step for M > S and under-states it for M < S. Cost: one send/recv of a (B/M, N, D)
activation (and its gradient) per micro-batch per stage boundary.

Stages run the model's own modules through its block executor (the depth seam) on their
slice of blocks; pre-norm and post-norm (BERT) blocks alike, segment (token type)
embeddings on the first stage. The padding mask and the segment ids are data, not
activations: every rank builds the same global batch, so each stage sets its
micro-batch's mask (and the first stage its segment ids) itself. The decoder's tied
embedding / LM head live on the first and last stage: their gradients are all-reduced
between those two ranks after the backward, so both copies take the same step and stay
equal. Hybrid: a (data x pipeline) :func:`init_device_mesh`; each pipeline replica takes
its shard of the batch and gradients are averaged over the data dimension.

:func:`run` records, per rank, every micro-batch's forward and backward start/end (the
Gantt of what ran), the bubble per M, and checks loss and gradients against one process.
``sleep_ms = [forward, backward]`` replaces every stage's blocks by a stand-in that sleeps
that long per micro-batch (:class:`SleepExecutor`): sleeping stages overlap on any machine,
loaded or not, so they test the bubble estimator against (S-1)/(M+S-1) itself.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from .. import validate as V
from ..model import BlockContext, BlockExecutor, Transformer
from .common import all_max, check_common, compare_grads, setup, shard, state_bytes

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def validate(config: dict, world_size: int, dp: int | None = None) -> None:
    from ..model import PRESETS

    stages = V.integer("stages", config.get("stages", world_size), 1, world_size)
    if world_size % stages:
        raise V.LabkitConfigError("stages", stages, f"a divisor of the {world_size} ranks")
    dp = world_size // stages if dp is None else dp
    m = V.integer("microbatches", config.get("microbatches", 2 * stages), 1)
    check_common(config, world_size, batch_divisor=dp * m)
    layers = config.get("layers") or PRESETS[config.get("size", "tiny")]["n_layers"]
    schedule = V.choice("schedule", config.get("schedule", "gpipe"), SCHEDULES)
    virtual = 2 if schedule == "interleaved" else 1
    if stages * virtual > layers:
        raise V.LabkitConfigError("stages", stages, f"at most {layers // virtual} (the model "
                                  f"has {layers} blocks, {virtual} stage(s) per rank)")
    if layers % (stages * virtual):  # equal stages: the bubble formula assumes them
        raise V.LabkitConfigError("stages", stages, f"a divisor of the {layers} blocks "
                                  f"({virtual} stage(s) per rank)")
    if schedule in ("1f1b", "interleaved") and m < stages:
        raise V.LabkitConfigError("microbatches", m, f">= stages={stages} for {schedule}")
    sleep = config.get("sleep_ms")
    if sleep is not None:
        if not isinstance(sleep, (list, tuple)) or len(sleep) != 2:
            raise V.LabkitConfigError("sleep_ms", sleep, "[forward_ms, backward_ms]")
        for v in sleep:
            V.number("sleep_ms", v, 0.0, 10_000.0, lo_open=True)
        if config.get("check", True):
            raise V.LabkitConfigError("check", config.get("check", True), "False with "
                                      "sleep_ms (sleeping stages have no gradients to check)")
    for mm in config.get("sweep_m", []):
        V.integer("sweep_m", mm, 1)
        if schedule in ("1f1b", "interleaved") and mm < stages:
            raise V.LabkitConfigError("sweep_m", mm, f">= stages={stages} for {schedule}")


def validate_hybrid(config: dict, world_size: int) -> None:
    stages = V.integer("stages", config.get("stages", 2), 1)
    if world_size % stages or world_size // stages < 2:
        raise V.LabkitConfigError("stages", stages, f"a divisor of {world_size} ranks leaving "
                                  f"a data-parallel degree >= 2")
    validate(config, world_size)


def split_blocks(n_layers: int, parts: int) -> list[range]:
    """Consecutive, as even as possible: 5 blocks in 2 parts -> [0, 1, 2], [3, 4]."""
    base, extra = divmod(n_layers, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        out.append(range(start, end))
        start = end
    return out


class SleepExecutor(BlockExecutor):
    """A stand-in for a stage's blocks that computes nothing: its forward sleeps
    ``forward_s`` and its backward ``backward_s`` per call (one call per stage and
    micro-batch). Sleeping stages need no core, so they overlap as a schedule says they
    should even on a loaded machine: the bubble they give is the schedule's own."""

    def __init__(self, forward_s: float, backward_s: float):
        super().__init__()
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, blocks, x, ctx):
        return _Sleep.apply(x, self.forward_s, self.backward_s)  # (mb, N, D), unchanged

    def extra_repr(self) -> str:
        return f"sleeps {self.forward_s * 1e3:g} ms forward, {self.backward_s * 1e3:g} ms backward"


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class Stage(nn.Module):
    """One pipeline stage: the model's own modules for blocks ``idx`` (and the embeddings
    on the first stage, the final norm and head on the last), parameter names unchanged."""

    def __init__(self, model, idx: range, first: bool, last: bool):
        super().__init__()
        self.cfg, self.kind, self.first, self.last = model.cfg, model.cfg.kind, first, last
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in idx})
        self.executor = model.executor  # the depth seam runs this stage's slice
        self.rope = model.rope
        self.mask = None  # (mb, N) padding mask of the micro-batch being run
        self.types = None  # (mb, N) segment ids of the micro-batch (None: from [SEP])
        if first:
            self.embed, self.pos, self.embed_norm = model.embed, model.pos, model.embed_norm
            self.token_type, self.embed_drop = model.token_type, model.embed_drop
        if last:
            self.norm, self.head = model.norm, model.head
            if model.cfg.kind == "encoder":
                self.pooler = model.pooler
            elif not first:  # the tied head gets its own Parameter; kept in sync by all-reduce
                self.head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
                self.head.weight = nn.Parameter(model.embed.weight.detach().clone())

    def forward(self, x):
        if self.first:  # x: (mb, N) token ids; the embedding of Transformer.features
            n = x.shape[1]
            h = self.embed(x)  # (mb, N, D)
            if self.pos is not None:
                h = h + self.pos(torch.arange(n, device=x.device))
            if self.token_type is not None:
                # the model's own rule for segment ids from [SEP] (it reads self.cfg only)
                types = Transformer.token_types(self, x) if self.types is None else self.types
                h = h + self.token_type(types)
            x = self.embed_drop(self.embed_norm(h))
        x = self.executor(list(self.blocks.values()), x, BlockContext(self.mask, self.rope))
        if not self.last:
            return x  # (mb, N, D) to the next stage
        x = self.norm(x)
        if self.kind == "encoder":
            return self.head(torch.tanh(self.pooler(x[:, 0])))  # (mb, labels)
        return self.head(x)  # (mb, N, vocab)

    def tied(self) -> torch.Tensor | None:
        """The decoder's tied weight held here (embedding on the first, head on the last)."""
        if self.kind != "decoder":
            return None
        return self.embed.weight if self.first else self.head.weight if self.last else None


def loss_fn(kind: str):
    if kind == "encoder":
        return lambda out, target: F.cross_entropy(out, target)
    return lambda out, target: F.cross_entropy(out.flatten(0, 1), target.flatten(),
                                               ignore_index=-100)


class Trace:
    """Per micro-batch forward/backward start and end on this rank (the Gantt that ran);
    sets each stage's padding mask and segment ids from the current step's micro-batches."""

    def __init__(self):
        self.events: list[tuple] = []  # (kind "F"/"B", stage, microbatch, start, end)
        self.masks = self.types = None
        self.t0 = 0.0
        self.cpu = self.span = 0.0  # CPU seconds the process got inside compute spans

    def instrument(self, stage: PipelineStage, index: int):
        fwd, bwd = stage.forward_one_chunk, stage.backward_one_chunk

        def forward_one_chunk(fwd_chunk_id, *a, **k):
            stage.submod.mask = None if self.masks is None else self.masks[fwd_chunk_id]
            stage.submod.types = None if self.types is None else self.types[fwd_chunk_id]
            t, c = time.perf_counter(), time.process_time()
            out = fwd(fwd_chunk_id, *a, **k)
            self._add("F", index, fwd_chunk_id, t, c)
            return out

        def backward_one_chunk(bwd_chunk_id, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = bwd(bwd_chunk_id, *a, **k)
            self._add("B", index, bwd_chunk_id, t, c)
            return out

        stage.forward_one_chunk, stage.backward_one_chunk = forward_one_chunk, backward_one_chunk

    def _add(self, kind, stage, mb, t, c):
        end = time.perf_counter()
        self.cpu += time.process_time() - c
        self.span += end - t
        self.events.append((kind, stage, mb, t - self.t0, end - self.t0))


class Pipe:
    """This rank's stage(s), schedule and groups for S stages x D data-parallel replicas."""

    def __init__(self, ctx, model, stages: int, microbatches: int, schedule: str):
        ws, S = ctx.world_size, stages
        self.dp = ws // S
        self.S, self.M, self.kind = S, microbatches, model.cfg.kind
        if self.dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (self.dp, S), mesh_dim_names=("dp", "pp"))
            self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
            self.pp_rank, self.dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        else:
            self.pp_group, self.dp_group, self.pp_rank, self.dp_rank = None, None, ctx.rank, 0
        # ranks holding the tied weight of each replica: first and last stage
        self.tied_group = None
        for d in range(self.dp):
            g = dist.new_group([d * S, d * S + S - 1]) if S > 1 else None
            if d == self.dp_rank:
                self.tied_group = g
        virtual = 2 if schedule == "interleaved" else 1
        n = S * virtual
        parts = split_blocks(model.cfg.n_layers, n)
        ids = [self.pp_rank + v * S for v in range(virtual)]  # looped placement
        self.modules = [Stage(model, parts[i], i == 0, i == n - 1) for i in ids]
        self.stages = [PipelineStage(m, i, n, ctx.device, group=self.pp_group)
                       for m, i in zip(self.modules, ids)]
        self.trace = Trace()
        for st, i in zip(self.stages, ids):
            self.trace.instrument(st, i)
        self.first = 0 in ids
        self.last = n - 1 in ids
        self.schedule_name = schedule
        self.schedule = self.make_schedule(microbatches)

    def make_schedule(self, m: int):
        fn = loss_fn(self.kind)
        if self.schedule_name == "interleaved":
            return ScheduleInterleaved1F1B(self.stages, m, loss_fn=fn)
        cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
        return cls(self.stages[0], m, loss_fn=fn)

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def step(self, batch: dict, schedule=None) -> float | None:
        """Forward + backward of the global ``batch`` (this replica's shard), then the tied
        and data-parallel gradient all-reduces. Returns the mean loss on the last stage."""
        sched = schedule or self.schedule
        part = shard(batch, self.dp_rank, self.dp)
        m = sched._n_microbatches
        mask, types = part.get("padding_mask"), part.get("token_type_ids")
        self.trace.masks = None if mask is None else mask.tensor_split(m)
        self.trace.types = None if types is None else types.tensor_split(m)
        losses = []
        args = (part["input_ids"],) if self.first else ()
        kwargs = {"target": part["labels"], "losses": losses} if self.last else {}
        sched.step(*args, **kwargs)
        self.sync_grads()
        return float(torch.stack(losses).mean()) if self.last else None

    def sync_grads(self):
        for m in self.modules:
            w = m.tied()
            if w is not None and self.tied_group is not None and w.grad is not None:
                dist.all_reduce(w.grad, group=self.tied_group)  # sum of both uses
        if self.dp > 1:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad /= self.dp
                    dist.all_reduce(p.grad, group=self.dp_group)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def named_grads(self) -> dict:
        """Every parameter this rank holds, by its name in the whole model (the decoder's
        tied head is the embedding), its gradient or None."""
        out = {}
        for m in self.modules:
            for name, p in m.named_parameters():
                key = name.replace("head.weight", "embed.weight") if self.kind == "decoder" \
                    else name
                out[key] = None if p.grad is None else p.grad.detach().clone()
        return out


def gradient_check(ctx, pipe: Pipe, model, batch) -> dict:
    """Loss and gradients of one pipelined step vs one process on the whole batch, over
    every parameter this rank holds (one without a gradient on either side fails)."""
    import copy

    ref = copy.deepcopy(model)
    ref_loss = ref.loss(batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    pipe.zero_grad()
    loss = pipe.step(batch)
    if pipe.dp > 1 and loss is not None:  # the replicas' mean losses, averaged
        t = torch.tensor([loss])
        dist.all_reduce(t, group=pipe.dp_group)
        loss = float(t) / pipe.dp
    got = pipe.named_grads()
    out = compare_grads(got, ref_grads, names=sorted(got))
    out.update(grad_max_abs_diff=all_max(out["grad_max_abs_diff"]), grads_held=sorted(got),
               loss_abs_diff=abs(loss - float(ref_loss)) if loss is not None else 0.0)
    out["loss_abs_diff"] = all_max(out["loss_abs_diff"])
    pipe.zero_grad()
    return out


def measure_bubble(ctx, pipe: Pipe, wl, ms: list[int], mb_rows: int, reps: int) -> list[dict]:
    """For each M: ``reps`` steps of M micro-batches of ``mb_rows`` rows (fixed), wall time
    between barriers and this rank's busy time (sum of its forward and backward spans),
    after one warm-up step (a new schedule's first step runs the stages outside the
    traced spans: shape inference, allocations)."""
    rows = []
    for m in ms:
        sched = pipe.make_schedule(m)
        stream = wl.make_batches(1000 + m)
        per = []
        for r in range(reps + 1):
            batch = _take(stream, m * mb_rows * pipe.dp)
            pipe.trace.events.clear()
            pipe.trace.cpu = pipe.trace.span = 0.0
            dist.barrier()
            pipe.trace.t0 = t0 = time.perf_counter()
            pipe.step(batch, sched)
            # the step ends when the last rank ends: its span, agreed outside the timing
            wall = all_max(time.perf_counter() - t0)
            busy = sum(e[4] - e[3] for e in pipe.trace.events)
            if r:
                per.append((wall, busy, list(pipe.trace.events), t0,
                            pipe.trace.cpu / max(pipe.trace.span, 1e-12)))
            pipe.zero_grad()
        per.sort(key=lambda x: x[0])
        wall, busy, events, t0, cpu_share = per[0]  # the least-disturbed step
        # t0: perf_counter is CLOCK_MONOTONIC, one clock for every process on this machine
        rows.append({"M": m, "S": pipe.S, "rank": ctx.rank, "mb_rows": mb_rows, "dp": pipe.dp,
                     "tokens_per_row": int(batch["input_ids"].shape[1]),
                     "wall_s": wall, "busy_s": busy, "t0": t0,
                     # CPU time / wall time inside compute: < 1 means the rank was
                     # waiting for a core (a machine shared with other jobs)
                     "cpu_share": cpu_share,
                     "bubble": 1 - busy / wall, "claimed_bubble": (pipe.S - 1) / (m + pipe.S - 1),
                     "samples_per_s": m * mb_rows * pipe.dp / wall, "events": events})
    return rows


def _take(stream, rows: int) -> dict:
    """``rows`` rows from a batch stream (concatenating batches as needed)."""
    parts, n = [], 0
    while n < rows:
        b = next(stream)
        parts.append(b)
        n += len(b["input_ids"])
    return {k: torch.cat([p[k] for p in parts])[:rows] for k in parts[0]}


def run(ctx) -> dict:
    cfg = ctx.config
    wl, model = setup(cfg)
    if cfg.get("sleep_ms"):  # stand-in stages that sleep: the schedule's own bubble
        f, b = cfg["sleep_ms"]
        model.set_executor(SleepExecutor(f / 1e3, b / 1e3))
    S = cfg.get("stages", ctx.world_size)
    M = cfg.get("microbatches", 2 * S)
    pipe = Pipe(ctx, model, S, M, cfg.get("schedule", "gpipe"))
    out = {"rank": ctx.rank, "pp_rank": pipe.pp_rank, "dp_rank": pipe.dp_rank,
           "stages": S, "dp": pipe.dp, "microbatches": M, "schedule": pipe.schedule_name,
           "blocks": [list(m.blocks) for m in pipe.modules]}
    stream = wl.make_batches(cfg.get("seed", 0))
    batch = next(stream)
    if cfg.get("check", True):
        out.update(gradient_check(ctx, pipe, model, batch))
    opt = torch.optim.AdamW(pipe.parameters(), lr=cfg.get("lr", 1e-3))
    losses = []
    for step in range(1, cfg.get("steps", 0) + 1):
        t = time.perf_counter()
        loss = pipe.step(next(stream))
        opt.step()
        dt = time.perf_counter() - t
        mem = state_bytes(nn.ModuleList(pipe.modules), opt)  # gradients still live
        pipe.zero_grad()
        losses.append(loss)
        ctx.emit(step=step, loss=loss, step_s=dt, stage=pipe.pp_rank,
                 samples_per_s=len(batch["input_ids"]) / dt, state_bytes=mem["state_bytes"])
    out["losses"] = losses
    for m in pipe.modules:  # the tied copies must still be equal after training
        w = m.tied()
        if w is not None:
            out.setdefault("tied_checksums", []).append(float(w.double().sum()))
    full = sum(p.numel() for p in model.parameters())
    out["memory"] = mem if losses else state_bytes(nn.ModuleList(pipe.modules))
    out["params_held"] = sum(p.numel() for p in pipe.parameters())
    out["claimed_params_per_rank"] = full / S  # Eq. 8: 1/S of the weights each
    if cfg.get("sweep_m"):
        out["bubble"] = measure_bubble(ctx, pipe, wl, cfg["sweep_m"], cfg.get("mb_rows", 4),
                                       cfg.get("reps", 2))
    return out


def run_hybrid(ctx) -> dict:
    """Experiment ``hybrid``: the same as :func:`run` on a (data x pipeline) mesh."""
    return run(ctx)
