"""A step-time, bubble and memory simulator for DP x TP x PP at scales this machine cannot
run (1 to 1,024 devices, models up to 7B parameters), calibrated on what it can.

Calibration (experiment ``calibrate``, on the ranks of one launch): a block's forward and
backward time at several micro-batch sizes, fitted as ``t = a + tokens * flops_per_token /
rate`` (a fixed per-call cost plus an achieved FLOP rate); the embedding + head ("ends")
the same way, run through the model with an executor that skips every block (the depth
seam); the bytes a block saves for backward per token (``saved_tensors_hooks``); and the
alpha-beta cost of an all-reduce (ring: ``2(n-1) alpha + 2(n-1)/n * bytes * beta``) and of a
point-to-point send (``alpha + bytes * beta``), least-squares fitted on small and large
messages; and the split runtimes' own costs, each on a run of its own: tensor parallel's
per block call (one DTensor-split block, less its share of the FLOPs and its all-reduces)
and the pipelining runtime's per micro-batch and stage and per step (a GPipe pipeline
whose stages do nothing, for several M); and what ranks computing at once cost each other
on this machine (the same block timed with every rank computing at once over one rank
alone: 1.0 with a core and memory bandwidth each; on 2 virtual cores that share a physical
core's caches it is well above 1). Every block is timed on the shape the runs
have: the sequence length of the
batches as the data pads them (which can be shorter than the ``seq`` asked for) and the
padding mask when the task has one. A fit whose time does not grow with size cannot give
a rate: :func:`fit_line` raises :class:`CalibrationError`, :func:`fit` records it in
``Calibration.problems`` (with a warning) and every prediction that needs it is NaN.

Prediction (:func:`simulate`): per micro-batch and stage, forward/backward compute of its
L/PP blocks (times the concurrency factor when ``shared=True``: the devices share this
machine, as the runs :func:`errors` checks do; a device each by default)
at 1/TP of the FLOPs plus TP's 2 all-reduces of (mb, N, D) per block each way
and TP's per-call cost, plus the pipelining runtime's cost per micro-batch; the schedule
(GPipe or 1F1B) is played event by event (a stage runs its ops in order, each waits for
its input from the neighbour plus one send), which gives the step time, the bubble and
the Gantt; DP adds one all-reduce of the stage's gradients (not overlapped: an upper
bound). The step time is the whole step's: every device ends it
together (the last stage's last backward, then the gradient all-reduce). Memory is the
busiest device's (the first stage: its blocks, 1/TP of each, and the embedding), broken
down as fp32 weights (4 B a parameter), gradients (4 B), AdamW's two moments (8 B), the
activations each micro-batch in flight saves for backward (M in flight for GPipe,
min(S, M) for 1F1B) and the pipeline's receive buffers (one (mb, N, D) gradient per
micro-batch); :func:`describe` prints it so it can be checked by hand. Every number it
returns is simulated; :func:`errors` puts it next to the measured runs.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import validate as V
from ..accounting import sdpa_flops
from ..model import Block, BlockExecutor, ModelConfig, build
from .common import lockstep_timer, setup, tokens_per_row


class CalibrationError(ValueError):
    """A calibration measurement that cannot be fitted (e.g. time that does not grow
    with size, so no FLOP rate follows from it)."""


@dataclass(frozen=True)
class Spec:
    """The model sized for the simulator (no weights are built)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    d_ff: int = 14336
    vocab: int = 32000
    seq: int = 2048
    gated: bool = True
    extra_params: int = 0  # positions, pooler, head, norms, biases (kept whole here)

    def block_params(self) -> int:
        return 4 * self.d_model ** 2 + (3 if self.gated else 2) * self.d_model * self.d_ff

    def params(self) -> int:
        return self.n_layers * self.block_params() + self.vocab * self.d_model + \
            self.extra_params

    def block_flops_per_token(self) -> float:
        """Forward FLOPs of one block per token: 2 per weight, plus softmax attention's
        scores and weighted sum (:func:`labkit.accounting.sdpa_flops`, shared by the
        analytic tables)."""
        return 2 * self.block_params() + sdpa_flops(self.seq, self.seq, self.d_model) / self.seq

    def ends_flops_per_token(self) -> float:
        return 2 * self.vocab * self.d_model


def spec_of(cfg: ModelConfig, seq: int) -> Spec:
    """The :class:`Spec` of a labkit model, its small parameters counted (meta tensors)."""
    from ..model import count_params

    with torch.device("meta"):
        total = count_params(build(cfg, seed=None))
    spec = Spec(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.vocab_size, seq,
                cfg.kind == "decoder")
    return dataclasses.replace(spec, extra_params=total - spec.params())


def spec_from(raw: dict) -> Spec:
    """The :class:`Spec` of the model a ``calibrate`` result measured."""
    return spec_of(ModelConfig(**raw["cfg"]), raw["seq"])


# Named sizes for the scaling curves (LLaMA/Mistral-like shapes).
SIZES = {
    "125M": Spec(768, 12, 12, 3072, 32000, 2048),
    "1.3B": Spec(2048, 24, 16, 5504, 32000, 2048),
    "7B": Spec(4096, 32, 32, 11008, 32000, 2048),
}


@dataclass
class Calibration:
    fwd_a: float  # seconds per block forward call (fixed part)
    fwd_rate: float  # achieved FLOP/s of the block forward
    bwd_a: float
    bwd_rate: float
    ends_fwd_a: float  # embedding + head + loss: fixed part, seconds per token (measured
    ends_fwd_b: float  # at d_cal and ends_flops_cal FLOPs/token)
    ends_bwd_a: float
    ends_bwd_b: float
    d_cal: int
    ends_flops_cal: float
    act_bytes_per_token_dim: float  # saved bytes per token per (10 d + 2 d_ff)
    ar_alpha: float  # all-reduce latency term (s) and per-byte term (s/B)
    ar_beta: float
    p2p_alpha: float
    p2p_beta: float
    # software costs of the split runtimes, calibrated on their own (0: none measured)
    tp_fwd_overhead: float = 0.0  # s per block call under tensor parallel (DTensor)
    tp_bwd_overhead: float = 0.0
    pipe_op_overhead: float = 0.0  # s per micro-batch and stage (F and B together)
    pipe_step_overhead: float = 0.0  # s per pipelined step
    # compute time with every rank computing at once / one rank alone (1.0: not measured,
    # or a core each); applied only to devices that share this machine (simulate(shared=))
    concurrency: float = 1.0
    measured: dict = dataclasses.field(default_factory=dict)  # the raw points, for plots
    problems: list = dataclasses.field(default_factory=list)  # fits that failed (NaN terms)

    def block(self, spec: Spec, tokens: int, tp: int = 1) -> tuple[float, float]:
        f = spec.block_flops_per_token() * tokens / tp
        return self.fwd_a + f / self.fwd_rate, self.bwd_a + 2 * f / self.bwd_rate

    def ends(self, spec: Spec, tokens: int) -> tuple[float, float, float, float]:
        """Embedding + head as measured, per token scaled by width (forward, backward; half
        goes to the first stage, half to the last), and the head FLOPs beyond the
        calibrated model's at the block's FLOP rate (forward, backward; the last stage's)."""
        extra = max(0.0, spec.ends_flops_per_token() - self.ends_flops_cal) * tokens
        w = spec.d_model / self.d_cal
        return (self.ends_fwd_a + tokens * self.ends_fwd_b * w,
                self.ends_bwd_a + tokens * self.ends_bwd_b * w,
                extra / self.fwd_rate, 2 * extra / self.bwd_rate)

    def all_reduce(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.ar_alpha + 2 * (n - 1) / n * nbytes * self.ar_beta

    def send(self, nbytes: float) -> float:
        return self.p2p_alpha + nbytes * self.p2p_beta


def fit_line(xs, ys, what: str = "calibration") -> tuple[float, float]:
    """Least squares ``y = a + b x`` with a >= 0 (a negative fixed cost is refitted through
    the origin, the constrained optimum). A slope that is not positive (times that do not
    grow with size: noise swamped the points, or the sizes were too close) gives no rate:
    :class:`CalibrationError`, never a number."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    n = len(xs)
    if n < 2 or len(set(xs)) < 2 or not all(map(math.isfinite, xs + ys)):
        raise CalibrationError(f"{what}: need finite times at two or more sizes, got "
                               f"{list(zip(xs, ys))}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if b <= 0:
        pts = ", ".join(f"{x:g}: {y:.3g}" for x, y in zip(xs, ys))
        raise CalibrationError(f"{what}: time does not grow with size ({pts}), so no rate "
                               f"can be fitted; re-calibrate on a quieter machine or over a "
                               f"wider range of sizes")
    if a < 0:
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return a, b


# ------------------------------------------------------------------ calibration (on ranks)

class _NoBlocks(BlockExecutor):
    """Runs no block: the model minus its blocks, to time the embedding and head."""

    def forward(self, blocks, x, ctx):
        return x


def _time(fn, reps: int) -> float:
    """Fastest of ``reps`` calls, every rank computing at once (as in a running pipeline):
    the same estimator as the measured runs (common.lockstep_timer)."""
    return lockstep_timer(reps)("", fn, 0)


def _fwd_bwd(fn, reps: int) -> tuple[float, float]:
    """Fastest forward ``fn()`` and fastest backward of ``reps`` (each timed on its own),
    one rank at a time while the others wait: a rank's cost on a core of its own, the
    premise of every parallel plan (on a machine shared with other jobs, concurrent ranks
    get less)."""
    f = b = float("inf")
    for r in range(dist.get_world_size()):
        dist.barrier()
        if dist.get_rank() != r:
            continue
        fn().sum().backward()
        deadline = time.perf_counter() + 0.25
        n = 0
        while n < reps or (n < 50 and time.perf_counter() < deadline):  # min of many
            n += 1
            t0 = time.perf_counter()
            y = fn()
            t1 = time.perf_counter()
            y.float().sum().backward()
            t2 = time.perf_counter()
            f, b = min(f, t1 - t0), min(b, t2 - t1)
    dist.barrier()
    return f, b


def calibrate(ctx) -> dict:
    """Experiment ``calibrate``: the raw measurements :func:`fit` turns into a
    :class:`Calibration` (every rank measures; :func:`fit` takes the median), on the
    shape the other experiments run: the batches' real sequence length and, when the task
    pads, a padding mask."""
    cfg = ctx.config
    reps = cfg.get("reps", 5)
    wl, model = setup(cfg)  # the very model and data the other experiments run
    seq = tokens_per_row(wl, cfg.get("seed", 0))
    masked = wl.sample[1] is not None
    mc = model.cfg
    torch.manual_seed(0)
    block = Block(mc)
    model.set_executor(_NoBlocks())
    out = {"rank": ctx.rank, "seq": seq, "seq_asked": cfg.get("seq", 32), "masked": masked,
           "cfg": dataclasses.asdict(mc), "block": [], "ends": [], "all_reduce": [],
           "p2p": []}
    for rows in cfg.get("rows", [1, 2, 4, 8, 16]):
        x = torch.randn(rows, seq, mc.d_model, requires_grad=True)
        ids = torch.randint(0, mc.vocab_size, (rows, seq))
        mask = torch.zeros(rows, seq, dtype=torch.bool) if masked else None
        out["block"].append((rows * seq, *_fwd_bwd(
            lambda x=x, m=mask: block(x, key_padding_mask=m, rope=model.rope), reps)))
        out["ends"].append((rows * seq, *_fwd_bwd(lambda i=ids, m=mask: model(i, m), reps)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        block(torch.randn(4, seq, mc.d_model, requires_grad=True),
              key_padding_mask=torch.zeros(4, seq, dtype=torch.bool) if masked else None,
              rope=model.rope)
    out["act_bytes_per_token"] = sum(saved) / (4 * seq)
    if ctx.world_size > 1:
        for n in cfg.get("sizes", [256, 4096, 65536, 1 << 20]):
            t = torch.zeros(n)
            out["all_reduce"].append((4 * n, _time(lambda t=t: dist.all_reduce(t), reps)))
            if ctx.rank < 2:  # ping-pong between ranks 0 and 1: two one-way sends
                def ping(t=t):
                    if ctx.rank == 0:
                        dist.send(t, 1)
                        dist.recv(t, 1)
                    else:
                        dist.recv(t, 0)
                        dist.send(t, 0)
                g = dist.new_group([0, 1])
                out["p2p"].append((4 * n, lockstep_timer(reps, g)("", ping, 0) / 2))
            else:
                dist.new_group([0, 1])
        out["concurrent_block"] = [
            (rows * seq, *_lockstep_fwd_bwd(
                lambda x=torch.randn(rows, seq, mc.d_model, requires_grad=True),
                m=(torch.zeros(rows, seq, dtype=torch.bool) if masked else None):
                block(x, key_padding_mask=m, rope=model.rope), max(reps, 10)))
            for rows in cfg.get("concurrent_rows", [4, 16])]
        out["tp_block"] = _tp_block(ctx, mc, seq, masked, cfg.get("tp_rows", [1, 4, 16]), reps)
        out["pipe_empty"] = _empty_pipeline(ctx, wl, model, cfg.get("pipe_m", [1, 2, 4, 8]),
                                            reps)
    return out


def _lockstep_fwd_bwd(fn, reps: int) -> tuple[float, float]:
    """Fastest forward and backward of ``reps`` on every rank at once (collectives inside
    keep them in step); the slowest rank's."""
    from .common import all_max

    dist.barrier()
    fn().sum().backward()
    f = b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fn()
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        f, b = min(f, t1 - t0), min(b, t2 - t1)
    return all_max(f), all_max(b)


def _tp_block(ctx, mc: ModelConfig, seq: int, masked: bool, rows_list, reps: int) -> list:
    """A block split over every rank (tensor parallel, DTensor): its forward and backward
    at several sizes; :func:`fit` takes what is left after the split FLOPs and the two
    all-reduces as the split's per-call cost (DTensor dispatch, layouts)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .tensor import parallelize_block

    if mc.n_heads % ctx.world_size or mc.d_ff % ctx.world_size:
        return []
    torch.manual_seed(0)
    block = Block(mc)
    parallelize_block(block, init_device_mesh("cpu", (ctx.world_size,)))
    pts = []
    for rows in rows_list:
        x = torch.randn(rows, seq, mc.d_model, requires_grad=True)
        mask = torch.zeros(rows, seq, dtype=torch.bool) if masked else None
        pts.append((rows * seq, *_lockstep_fwd_bwd(
            lambda x=x, m=mask: block(x, key_padding_mask=m), reps)))
    return pts


def _empty_pipeline(ctx, wl, model, ms, reps: int) -> list:
    """GPipe over every rank with stages whose blocks do nothing (the model's embedding on
    the first, its head on the last; one row a micro-batch): the step time for several M,
    from which :func:`fit` takes the pipelining runtime's cost per micro-batch and stage
    (scheduling, send/recv bookkeeping) and per step."""
    from .common import all_max
    from .pipeline import Pipe, _take

    pipe = Pipe(ctx, model, ctx.world_size, ms[0], "gpipe")  # model runs _NoBlocks here
    stream = wl.make_batches(7)
    pts = []
    for m in ms:
        sched = pipe.make_schedule(m)
        best = float("inf")
        for r in range(reps + 1):  # the first is warm-up (shape inference)
            batch = _take(stream, m)
            dist.barrier()
            t0 = time.perf_counter()
            pipe.step(batch, sched)
            wall = all_max(time.perf_counter() - t0)
            pipe.zero_grad()
            if r:
                best = min(best, wall)
        pts.append((m, int(batch["input_ids"].shape[1]), best))
    return pts


def fit(raw: list[dict], world_size: int) -> Calibration:
    """A :class:`Calibration` from the ranks' ``calibrate`` results (median over ranks).
    A quantity that cannot be fitted is NaN, named in ``problems``, with a warning."""
    r0 = raw[0]
    mc = ModelConfig(**r0["cfg"])
    spec = spec_of(mc, r0["seq"])
    med = statistics.median
    problems: list[str] = []

    def pts(key, i):
        return [(p[0], med([r[key][j][i] for r in raw])) for j, p in enumerate(r0[key])]

    def line(what, points):
        if not points:
            problems.append(f"{what}: not measured (one rank: no communication)")
            return math.nan, math.nan
        try:
            return fit_line(*zip(*points), what=what)
        except CalibrationError as e:
            problems.append(str(e))
            return math.nan, math.nan

    fa, fb = line("block forward", pts("block", 1))
    ba, bb = line("block backward", pts("block", 2))
    efa, efb = line("embedding + head forward", pts("ends", 1))
    eba, ebb = line("embedding + head backward", pts("ends", 2))
    fpt, ept = spec.block_flops_per_token(), spec.ends_flops_per_token()
    ar = [(b, med([r["all_reduce"][j][1] for r in raw]))
          for j, (b, _) in enumerate(r0["all_reduce"])]
    n = world_size
    # ring all-reduce: t = 2(n-1) alpha + 2(n-1)/n bytes beta -> fit t/(2(n-1)) = a + b x/n
    a_ar, b_ar = line("all-reduce", [(b / n, t / (2 * (n - 1))) for b, t in ar])
    p2p = r0["p2p"]
    a_p, b_p = line("send", [tuple(p) for p in p2p])
    d, dff = mc.d_model, mc.d_ff
    cal = Calibration(fa, fpt / fb, ba, 2 * fpt / bb, efa, efb, eba, ebb, d, ept,
                      med([r["act_bytes_per_token"] for r in raw]) / (10 * d + 2 * dff),
                      a_ar, b_ar, a_p, b_p,
                      measured={"block": pts("block", 1), "block_bwd": pts("block", 2),
                                "ends": pts("ends", 1), "ends_bwd": pts("ends", 2),
                                "all_reduce": ar, "p2p": p2p, "seq": r0["seq"],
                                "tp_block": r0.get("tp_block", []),
                                "concurrent_block": r0.get("concurrent_block", []),
                                "pipe_empty": r0.get("pipe_empty", [])})
    if world_size > 1:
        _fit_concurrency(cal, spec, raw)
        _fit_overheads(cal, spec, r0, world_size, problems)
    cal.problems = problems
    if problems:
        warnings.warn("labkit.dist.simulator: calibration incomplete, the predictions that "
                      "need these are NaN: " + "; ".join(problems), stacklevel=2)
    return cal


def _fit_concurrency(cal: Calibration, spec: Spec, raw: list[dict]) -> None:
    """The concurrency factor: the block's forward + backward with every rank computing at
    once (the slowest rank's) over the fitted one-rank-alone time, median over sizes."""
    pts = raw[0].get("concurrent_block") or []
    ratios = []
    for j, (tokens, _, _) in enumerate(pts):
        both = statistics.median([sum(r["concurrent_block"][j][1:]) for r in raw])
        ratios.append(both / sum(cal.block(spec, tokens)))
    if ratios:
        cal.concurrency = statistics.median(ratios)


def _fit_overheads(cal: Calibration, spec: Spec, r0: dict, n: int, problems: list) -> None:
    """The split runtimes' own costs, from runs that are not the ones :func:`errors`
    checks: tensor parallel's per-block-call cost (a split block's time minus its 1/n of
    the FLOPs and its two all-reduces: the median over sizes) and the pipelining runtime's
    cost per micro-batch and stage and per step (an empty pipeline's step minus what the
    schedule of its embedding and head predicts, fitted against M + S - 1)."""
    tp = r0.get("tp_block") or []
    if tp:
        d = spec.d_model
        res_f, res_b = [], []
        for tokens, f, b in tp:
            pf, pb = (t * cal.concurrency for t in cal.block(spec, tokens, n))
            comm = 2 * cal.all_reduce(tokens * d * 4, n)
            res_f.append(f - pf - comm)
            res_b.append(b - pb - comm)
        cal.tp_fwd_overhead, cal.tp_bwd_overhead = statistics.median(res_f), \
            statistics.median(res_b)
    else:
        problems.append("tensor-parallel block: not measured (heads or d_ff do not split "
                        f"over {n} ranks)")
        cal.tp_fwd_overhead = cal.tp_bwd_overhead = math.nan
    pe = r0.get("pipe_empty") or []
    xs, ys = [], []
    for m, seq, wall in pe:
        ef, eb, _, _ = (t * cal.concurrency
                        for t in cal.ends(dataclasses.replace(spec, seq=seq), seq))
        act = seq * spec.d_model * 4  # one row a micro-batch
        pred = play([(ef / 2, eb / 2)] * n, m, "gpipe", cal.send(act))["step_s"]
        xs.append(m + n - 1)
        ys.append(wall - pred)
    try:
        cal.pipe_step_overhead, cal.pipe_op_overhead = fit_line(
            xs, ys, what="pipeline runtime cost per micro-batch")
    except CalibrationError as e:
        problems.append(str(e))
        cal.pipe_step_overhead = cal.pipe_op_overhead = math.nan


# ------------------------------------------------------------------ prediction

def _order(schedule: str, s: int, S: int, M: int) -> list[tuple[str, int]]:
    """The op order of stage ``s``: GPipe all forwards then all backwards; 1F1B warms up
    with S - s forwards (at most M), then alternates one backward, one forward."""
    if schedule == "gpipe":
        return [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
    warm = min(S - s, M)
    ops = [("F", m) for m in range(warm)]
    f, b = warm, 0
    while b < M:
        ops.append(("B", b))
        b += 1
        if f < M:
            ops.append(("F", f))
            f += 1
    return ops


def play(times: list[tuple[float, float]], M: int, schedule: str, send: float) -> dict:
    """Play a pipeline schedule: ``times[s] = (fwd, bwd)`` of one micro-batch on stage s;
    ``send`` the one-way cost of an activation (or its gradient) between stages. Returns
    the step time, the bubble (idle share of stage-time) and the Gantt events."""
    S = len(times)
    done: dict = {}
    free = [0.0] * S
    ops = [_order(schedule, s, S, M) for s in range(S)]
    pos = [0] * S
    events = []
    while any(pos[s] < len(ops[s]) for s in range(S)):
        progressed = False
        for s in range(S):
            if pos[s] >= len(ops[s]):
                continue
            kind, m = ops[s][pos[s]]
            if kind == "F":
                dep = 0.0 if s == 0 else done.get(("F", s - 1, m))
            else:
                dep = done.get(("F", S - 1, m)) if s == S - 1 else done.get(("B", s + 1, m))
            if dep is None:
                continue
            ready = dep + (send if (kind == "F" and s > 0) or (kind == "B" and s < S - 1)
                           else 0.0)
            start = max(free[s], ready)
            end = start + times[s][0 if kind == "F" else 1]
            done[(kind, s, m)] = free[s] = end
            events.append((kind, s, m, start, end))
            pos[s] += 1
            progressed = True
        if not progressed:  # pragma: no cover - a schedule bug, not an input error
            raise RuntimeError("pipeline schedule deadlocked")
    step = max(free)
    busy = sum(M * (f + b) for f, b in times)
    return {"step_s": step, "bubble": 1 - busy / (S * step), "events": events}


def simulate(spec: Spec, cal: Calibration, dp: int = 1, tp: int = 1, pp: int = 1,
             microbatches: int = 1, batch: int = 8, schedule: str = "gpipe",
             shared: bool = False) -> dict:
    """Simulated fwd+bwd step time, bubble and memory per device of ``spec`` on
    dp x tp x pp devices, global ``batch`` sequences in ``microbatches`` per replica.
    ``shared``: the devices are ranks sharing the calibrated machine, so compute runs at
    ``cal.concurrency`` times its one-rank-alone time when there is more than one."""
    for name, v in (("dp", dp), ("tp", tp), ("pp", pp), ("microbatches", microbatches),
                    ("batch", batch)):
        V.integer(name, v, 1)
    if pp > spec.n_layers:
        raise V.LabkitConfigError("pp", pp, f"at most n_layers={spec.n_layers}")
    if spec.n_heads % tp or spec.d_ff % tp:
        raise V.LabkitConfigError("tp", tp, f"a divisor of n_heads={spec.n_heads} and "
                                  f"d_ff={spec.d_ff}")
    if batch % (dp * microbatches):
        raise V.LabkitConfigError("batch", batch, f"a multiple of dp x microbatches = "
                                  f"{dp * microbatches}")
    V.choice("schedule", schedule, ("gpipe", "1f1b"))
    rows = batch // (dp * microbatches)
    tokens = rows * spec.seq
    act = tokens * spec.d_model * 4  # one (mb, N, D) fp32 activation
    slow = cal.concurrency if shared and dp * tp * pp > 1 else 1.0
    bf, bb = (t * slow for t in cal.block(spec, tokens, tp))
    tp_comm = 2 * cal.all_reduce(act, tp)  # two all-reduces per block, each direction
    if tp > 1:  # the split's per-call software cost
        bf, bb = bf + cal.tp_fwd_overhead, bb + cal.tp_bwd_overhead
    ef, eb, head_f, head_b = (t * slow for t in cal.ends(spec, tokens))
    base, extra = divmod(spec.n_layers, pp)
    op = cal.pipe_op_overhead / 2 if pp > 1 else 0.0  # the pipelining runtime, per op
    times = []
    for s in range(pp):
        L = base + (s < extra)
        f, b = L * (bf + tp_comm) + op, L * (bb + tp_comm) + op
        if s == 0:
            f, b = f + ef / 2, b + eb / 2  # embedding on the first stage, head on the last
        if s == pp - 1:
            f, b = f + ef / 2 + head_f, b + eb / 2 + head_b
        times.append((f, b))
    run = play(times, microbatches, schedule, cal.send(act / tp) if pp > 1 else 0.0)
    if pp > 1:
        run["step_s"] += cal.pipe_step_overhead
    # the busiest device: the first stage's blocks (1/tp of them) and the embedding; the
    # positions, norms and head are counted there whole (an over-count for pp > 1)
    first_blocks = base + (extra > 0)
    held = first_blocks * spec.block_params() / tp + spec.vocab * spec.d_model + \
        spec.extra_params
    grad_ar = cal.all_reduce(4 * held, dp)
    in_flight = microbatches if schedule == "gpipe" else min(pp, microbatches)
    act_mb = (first_blocks * tokens * cal.act_bytes_per_token_dim
              * (10 * spec.d_model + 2 * spec.d_ff) / tp)  # saved for backward, one mb
    buffers = microbatches * act / tp if pp > 1 else 0.0  # received gradients, one per mb
    mem = {"weight_bytes": 4 * held, "grad_bytes": 4 * held, "optimizer_bytes": 8 * held,
           "activation_bytes_per_microbatch": act_mb, "microbatches_in_flight": in_flight,
           "activation_bytes_per_device": in_flight * act_mb,
           "pipeline_buffer_bytes": buffers}
    state = 16 * held
    step = run["step_s"] + grad_ar
    return {"simulated": True, "dp": dp, "tp": tp, "pp": pp, "devices": dp * tp * pp,
            "microbatches": microbatches, "batch": batch, "schedule": schedule,
            "tokens_per_row": spec.seq, "params_per_device": held,
            "step_s": step, "bubble": run["bubble"], "grad_all_reduce_s": grad_ar,
            "tp_comm_s": tp_comm * spec.n_layers / pp * 2 * microbatches,
            "samples_per_s": batch / step, "state_bytes_per_device": state, **mem,
            "compute_slowdown": slow,
            "memory_bytes_per_device": state + mem["activation_bytes_per_device"] + buffers,
            "valid": math.isfinite(step), "calibration_problems": list(cal.problems),
            "events": run["events"]}


def describe(res: dict) -> str:
    """What :func:`simulate` predicted, with the memory broken down so it can be checked
    by hand, and what device each number is for."""
    def gb(b):
        return f"{b / 1e9:.2f} GB"

    r = res
    lines = [
        (f"SIMULATED dp={r['dp']} tp={r['tp']} pp={r['pp']} ({r['devices']} devices), "
         f"{r['schedule']} M={r['microbatches']}, batch {r['batch']} x {r['tokens_per_row']} "
         f"tokens: step {r['step_s']:.3f} s (the whole step: every device ends it together), "
         f"bubble {r['bubble']:.2f} (idle share of stage-time), "
         f"{r['samples_per_s']:.2f} samples/s"),
        (f"  memory on the busiest device (the first stage, "
         f"{r['params_per_device'] / 1e9:.3f}B parameters): "
         f"{gb(r['memory_bytes_per_device'])} ="),
        (f"    weights {gb(r['weight_bytes'])} (4 B/param) + gradients "
         f"{gb(r['grad_bytes'])} (4 B/param) + AdamW moments {gb(r['optimizer_bytes'])} "
         f"(8 B/param)"),
        (f"    + activations saved for backward {gb(r['activation_bytes_per_microbatch'])} "
         f"per micro-batch x {r['microbatches_in_flight']} in flight "
         f"= {gb(r['activation_bytes_per_device'])}"),
        f"    + pipeline receive buffers {gb(r['pipeline_buffer_bytes'])}"]
    if not r["valid"]:
        lines.append("  INVALID: the calibration could not be fitted: "
                     + "; ".join(r["calibration_problems"]))
    return "\n".join(lines)


def scaling(spec: Spec, cal: Calibration, devices=(1, 2, 4, 8, 16, 64, 256, 1024),
            per_device_batch: int = 8, microbatches: int = 8, tp_max: int = 8) -> list[dict]:
    """Simulated weak scaling of ``spec``: pure DP, and TP (<= tp_max) x PP x DP hybrids,
    at each device count (rows for the notebook's scaling curves)."""
    rows = []
    for n in devices:
        plans = {"DP": (n, 1, 1)}
        tp = min(tp_max, n, spec.n_heads)
        while spec.n_heads % tp or spec.d_ff % tp:
            tp -= 1
        rest = n // tp
        pp = min(rest, 4, spec.n_layers)
        if tp * pp <= n:
            plans["TPxPPxDP"] = (n // (tp * pp), tp, pp)
        for name, (d, t, p) in plans.items():
            m = microbatches if p > 1 else 1
            replica = -(-per_device_batch * t * p // m) * m  # a replica spans t x p devices
            r = simulate(spec, cal, d, t, p, m, d * replica, "1f1b" if p > 1 else "gpipe")
            r.pop("events")
            rows.append({"plan": name, "model_params": spec.params(), **r})
    return rows


def errors(cal: Calibration, spec: Spec, measured: list[dict]) -> list[dict]:
    """Simulated vs measured for each run this machine did (``shared=True``: its ranks
    shared this machine's cores): ``measured`` rows carry the
    simulate() arguments, ``measured_s`` and ``tokens_per_row`` (the sequence length the
    run had; default ``spec.seq``); the error is relative to the measurement."""
    out = []
    for m in measured:
        args = {k: m[k] for k in ("dp", "tp", "pp", "microbatches", "batch", "schedule")
                if k in m}
        run_spec = dataclasses.replace(spec, seq=m.get("tokens_per_row", spec.seq))
        sim = simulate(run_spec, cal, **args, shared=True)
        err = (sim["step_s"] - m["measured_s"]) / m["measured_s"]
        out.append({**args, "label": m.get("label", ""), "tokens_per_row": run_spec.seq,
                    "measured_s": m["measured_s"],
                    "simulated_s": sim["step_s"], "relative_error": err,
                    "simulated_bubble": sim["bubble"], "measured_bubble": m.get("bubble")})
    return out
