"""A step-time, bubble and memory simulator for DP x TP x PP at scales this machine cannot
run (1 to 1,024 devices, models up to 7B parameters), calibrated on what it can.

Calibration (experiment ``calibrate``, on the ranks of one launch): a block's forward and
backward time at several micro-batch sizes, fitted as ``t = a + tokens * flops_per_token /
rate`` (a fixed per-call cost plus an achieved FLOP rate); the embedding + head ("ends")
the same way, run through the model with an executor that skips every block (the depth
seam); the bytes a block saves for backward per token (``saved_tensors_hooks``); and the
alpha-beta cost of an all-reduce (ring: ``2(n-1) alpha + 2(n-1)/n * bytes * beta``) and of a
point-to-point send (``alpha + bytes * beta``), least-squares fitted on small and large
messages.

Prediction (:func:`simulate`): per micro-batch and stage, forward/backward compute of its
L/PP blocks at 1/TP of the FLOPs plus TP's 2 all-reduces of (mb, N, D) per block each way;
the pipeline schedule (GPipe or 1F1B) is played event by event (a stage runs its ops in
order, each waits for its input from the neighbour plus one send), which gives the step
time, the bubble and the Gantt; DP adds one all-reduce of the stage's gradients (not
overlapped: an upper bound). Memory per device: 16 bytes a parameter (fp32 weights,
gradients, AdamW's two moments) of what the device holds, plus the activations of the
micro-batches in flight (M for GPipe, S - s for 1F1B). Every number it returns is
simulated; :func:`errors` puts it next to the measured runs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import validate as V
from ..model import Block, BlockExecutor, ModelConfig, build
from .common import lockstep_timer, setup


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
        """Forward FLOPs of one block per token: 2 per weight, plus attention's
        2 x 2 N D (scores and weighted sum)."""
        return 2 * self.block_params() + 4 * self.seq * self.d_model

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
    measured: dict = dataclasses.field(default_factory=dict)  # the raw points, for plots

    def block(self, spec: Spec, tokens: int, tp: int = 1) -> tuple[float, float]:
        f = spec.block_flops_per_token() * tokens / tp
        return self.fwd_a + f / self.fwd_rate, self.bwd_a + 2 * f / self.bwd_rate

    def ends(self, spec: Spec, tokens: int) -> tuple[float, float]:
        """Embedding + head: the measured per-token cost scaled by width, plus the head
        FLOPs beyond the calibrated model's at the block's FLOP rate."""
        extra = max(0.0, spec.ends_flops_per_token() - self.ends_flops_cal) * tokens
        w = spec.d_model / self.d_cal
        return (self.ends_fwd_a + tokens * self.ends_fwd_b * w + extra / self.fwd_rate,
                self.ends_bwd_a + tokens * self.ends_bwd_b * w + 2 * extra / self.bwd_rate)

    def all_reduce(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.ar_alpha + 2 * (n - 1) / n * nbytes * self.ar_beta

    def send(self, nbytes: float) -> float:
        return self.p2p_alpha + nbytes * self.p2p_beta


def fit_line(xs, ys) -> tuple[float, float]:
    """Least squares ``y = a + b x`` with a >= 0 and b > 0 (a negative fixed cost or a
    falling slope is noise)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    if b <= 0:  # time cannot fall with size: the points are noise around a constant
        return my, 1e-18
    if a < 0:  # refit through the origin
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


def _fwd_bwd(block, x, reps: int) -> tuple[float, float]:
    """Fastest forward and fastest backward of ``reps`` (each timed on its own), one rank
    at a time while the others wait: a rank's cost on a core of its own, the premise of
    every parallel plan (on a machine shared with other jobs, concurrent ranks get less)."""
    f = b = float("inf")
    for r in range(dist.get_world_size()):
        dist.barrier()
        if dist.get_rank() != r:
            continue
        block(x).sum().backward()
        deadline = time.perf_counter() + 0.25
        n = 0
        while n < reps or (n < 50 and time.perf_counter() < deadline):  # min of many
            n += 1
            t0 = time.perf_counter()
            y = block(x)
            t1 = time.perf_counter()
            y.float().sum().backward()
            t2 = time.perf_counter()
            f, b = min(f, t1 - t0), min(b, t2 - t1)
    dist.barrier()
    return f, b


def calibrate(ctx) -> dict:
    """Experiment ``calibrate``: the raw measurements :func:`fit` turns into a
    :class:`Calibration` (every rank measures; :func:`fit` takes the median)."""
    cfg = ctx.config
    seq, reps = cfg.get("seq", 32), cfg.get("reps", 5)
    _, model = setup({**cfg, "n_train": 64})  # the very model the other experiments run
    mc = model.cfg
    torch.manual_seed(0)
    block = Block(mc)
    model.set_executor(_NoBlocks())
    out = {"rank": ctx.rank, "seq": seq, "cfg": dataclasses.asdict(mc), "block": [],
           "ends": [], "all_reduce": [], "p2p": []}
    for rows in cfg.get("rows", [1, 2, 4, 8]):
        x = torch.randn(rows, seq, mc.d_model, requires_grad=True)
        ids = torch.randint(0, mc.vocab_size, (rows, seq))
        out["block"].append((rows * seq, *_fwd_bwd(block, x, reps)))
        out["ends"].append((rows * seq, *_fwd_bwd(model, ids, reps)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        block(torch.randn(4, seq, mc.d_model, requires_grad=True))
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
    return out


def fit(raw: list[dict], world_size: int) -> Calibration:
    """A :class:`Calibration` from the ranks' ``calibrate`` results (median over ranks)."""
    r0 = raw[0]
    mc = ModelConfig(**r0["cfg"])
    spec = spec_of(mc, r0["seq"])
    med = lambda xs: sorted(xs)[len(xs) // 2]

    def pts(key, i):
        return [(p[0], med([r[key][j][i] for r in raw])) for j, p in enumerate(r0[key])]

    fa, fb = fit_line(*zip(*pts("block", 1)))
    ba, bb = fit_line(*zip(*pts("block", 2)))
    efa, efb = fit_line(*zip(*pts("ends", 1)))
    eba, ebb = fit_line(*zip(*pts("ends", 2)))
    fpt, ept = spec.block_flops_per_token(), spec.ends_flops_per_token()
    ar = [(b, t) for b, t in zip([p[0] for p in r0["all_reduce"]],
                                 [med([r["all_reduce"][j][1] for r in raw])
                                  for j in range(len(r0["all_reduce"]))])]
    n = world_size
    # ring all-reduce: t = 2(n-1) alpha + 2(n-1)/n bytes beta -> fit t/(2(n-1)) = a + b x/n
    if ar:
        a_ar, b_ar = fit_line([b / n for b, _ in ar], [t / (2 * (n - 1)) for _, t in ar])
    else:
        a_ar = b_ar = 0.0
    p2p = raw[0]["p2p"]
    a_p, b_p = fit_line(*zip(*p2p)) if p2p else (0.0, 0.0)
    d, dff = mc.d_model, mc.d_ff
    return Calibration(fa, fpt / fb, ba, 2 * fpt / bb, efa, efb, eba, ebb, d, ept,
                       med([r["act_bytes_per_token"] for r in raw]) / (10 * d + 2 * dff),
                       a_ar, b_ar, a_p, b_p,
                       measured={"block": pts("block", 1), "block_bwd": pts("block", 2),
                                 "all_reduce": ar, "p2p": p2p})


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
             microbatches: int = 1, batch: int = 8, schedule: str = "gpipe") -> dict:
    """Simulated fwd+bwd step time, bubble and memory per device of ``spec`` on
    dp x tp x pp devices, global ``batch`` sequences in ``microbatches`` per replica."""
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
    bf, bb = cal.block(spec, tokens, tp)
    tp_comm = 2 * cal.all_reduce(act, tp)  # two all-reduces per block, each direction
    ef, eb = cal.ends(spec, tokens)
    base, extra = divmod(spec.n_layers, pp)
    times = []
    for s in range(pp):
        L = base + (s < extra)
        f, b = L * (bf + tp_comm), L * (bb + tp_comm)
        if s == 0:
            f, b = f + ef / 2, b + eb / 2  # embedding on the first stage, head on the last
        if s == pp - 1:
            f, b = f + ef / 2, b + eb / 2
        times.append((f, b))
    run = play(times, microbatches, schedule, cal.send(act / tp) if pp > 1 else 0.0)
    block_p = spec.block_params()
    # the busiest device: the first stage's blocks (1/tp of them) and the embedding
    held = (base + (extra > 0)) * block_p / tp + spec.vocab * spec.d_model + spec.extra_params
    grad_ar = cal.all_reduce(4 * held, dp)
    in_flight = microbatches if schedule == "gpipe" else min(pp, microbatches)
    act_bytes = (in_flight * (base + (extra > 0)) * tokens * cal.act_bytes_per_token_dim
                 * (10 * spec.d_model + 2 * spec.d_ff) / tp)
    step = run["step_s"] + grad_ar
    return {"simulated": True, "dp": dp, "tp": tp, "pp": pp, "devices": dp * tp * pp,
            "microbatches": microbatches, "batch": batch, "schedule": schedule,
            "step_s": step, "bubble": run["bubble"], "grad_all_reduce_s": grad_ar,
            "tp_comm_s": tp_comm * spec.n_layers / pp * 2 * microbatches,
            "samples_per_s": batch / step, "state_bytes_per_device": 16 * held,
            "activation_bytes_per_device": act_bytes,
            "memory_bytes_per_device": 16 * held + act_bytes, "events": run["events"]}


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
    """Simulated vs measured for each run this machine did: ``measured`` rows carry the
    simulate() arguments and ``measured_s``; the error is relative to the measurement."""
    out = []
    for m in measured:
        args = {k: m[k] for k in ("dp", "tp", "pp", "microbatches", "batch", "schedule")
                if k in m}
        sim = simulate(spec, cal, **args)
        err = (sim["step_s"] - m["measured_s"]) / m["measured_s"]
        out.append({**args, "label": m.get("label", ""), "measured_s": m["measured_s"],
                    "simulated_s": sim["step_s"], "relative_error": err,
                    "simulated_bubble": sim["bubble"], "measured_bubble": m.get("bubble")})
    return out
