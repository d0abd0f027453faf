"""A synthetic 2-rank launch result from a made-up machine whose costs are known in closed
form, for testing the simulator's calibration -> prediction chain and the benchmark's
target logic with injected timings (no launch, no real clock).

The machine: a block's forward costs ``A_F + B_F * tokens`` seconds (backward ``A_B +
B_B * tokens``), embedding + head ``E_F + EB_F * tokens`` (``E_B + EB_B * tokens``), a
ring all-reduce ``2(n-1) ALPHA + 2(n-1)/n * bytes * BETA``, a send ``P_A + P_B * bytes``,
a tensor-parallel block call ``TP_F``/``TP_B`` more than its split FLOPs and all-reduces,
the pipelining runtime ``PIPE_OP`` per micro-batch and stage and ``PIPE_STEP`` per step;
compute (blocks, embedding + head) with both ranks computing at once costs ``CONC`` times
what it costs one rank alone (its 2 cores share caches and memory bandwidth).
The "measured" step times below are these formulas written out, not the simulator."""
from __future__ import annotations

import dataclasses

from labkit.dist import simulator as SIM
from labkit.model import build, count_params, preset

A_F, B_F, A_B, B_B = 2e-4, 1e-6, 4e-4, 2e-6
E_F, EB_F, E_B, EB_B = 1e-4, 1e-7, 1.5e-4, 2e-7
ALPHA, BETA, P_A, P_B = 5e-5, 1e-9, 2e-5, 5e-10
TP_F, TP_B = 3e-4, 5e-4
PIPE_OP, PIPE_STEP = 1e-3, 2e-3
CONC = 1.3
N, SEQ_ASKED, WS = 26, 32, 2  # the batches' real length, the seq asked for, ranks
CFG = preset("tiny", vocab_size=100)
L, D = CFG.n_layers, CFG.d_model
P = count_params(build(CFG))


def block(tokens, c=1.0):
    return c * (A_F + B_F * tokens), c * (A_B + B_B * tokens)


def ends(tokens, c=1.0):
    return c * (E_F + EB_F * tokens), c * (E_B + EB_B * tokens)


def all_reduce(nbytes, n=WS):
    return 2 * (n - 1) * ALPHA + 2 * (n - 1) / n * nbytes * BETA


def send(nbytes):
    return P_A + P_B * nbytes


def one_rank_step(rows, c=1.0):
    t = rows * N
    (bf, bb), (ef, eb) = block(t, c), ends(t, c)
    return L * (bf + bb) + ef + eb


def ddp_step(rows):  # each rank rows / 2 (both computing), then one all-reduce
    return one_rank_step(rows // WS, CONC) + all_reduce(4 * P)


def tp_block(tokens):
    bf, bb = CONC * (A_F + B_F * tokens / WS), CONC * (A_B + B_B * tokens / WS)
    comm = 2 * all_reduce(tokens * D * 4)
    return bf + comm + TP_F, bb + comm + TP_B


def tp_step(rows):
    t = rows * N
    f, b = tp_block(t)
    ef, eb = ends(t, CONC)
    return L * (f + b) + ef + eb


def gpipe_stage(mb_rows):
    """Forward and backward of one micro-batch on either of the 2 equal stages (a block
    each, half the embedding + head each, the runtime's cost split over F and B)."""
    t = mb_rows * N
    (bf, bb), (ef, eb) = block(t, CONC), ends(t, CONC)
    return bf + ef / 2 + PIPE_OP / 2, bb + eb / 2 + PIPE_OP / 2


def gpipe_step(m, mb_rows):
    """2 equal stages under GPipe: (M + 1)(f + b), two sends on the critical path (the
    first forward's and the last backward's), the runtime's per-step cost."""
    f, b = gpipe_stage(mb_rows)
    return (m + 1) * (f + b) + 2 * send(mb_rows * N * D * 4) + PIPE_STEP


def calibrate_raw(rank: int, flat: bool = False) -> dict:
    rows = [1, 2, 4, 8, 16]
    pts = [(r * N, *((A_F, A_B) if flat else block(r * N))) for r in rows]
    empty = []
    for m in (1, 2, 4, 8):
        ef, eb = ends(N, CONC)
        f, b = ef / 2 + PIPE_OP / 2, eb / 2 + PIPE_OP / 2  # one row a micro-batch
        empty.append((m, N, (m + 1) * (f + b) + 2 * send(N * D * 4) + PIPE_STEP))
    sizes = [1024, 16384, 262144, 4 << 20]
    return {"rank": rank, "seq": N, "seq_asked": SEQ_ASKED, "masked": True,
            "cfg": dataclasses.asdict(CFG), "block": pts,
            "ends": [(r * N, *ends(r * N)) for r in rows],
            "act_bytes_per_token": 6.0 * (10 * D + 2 * CFG.d_ff),
            "all_reduce": [(b, all_reduce(b)) for b in sizes],
            "p2p": [(b, send(b)) for b in sizes],
            "tp_block": [(r * N, *tp_block(r * N)) for r in (1, 4, 16)],
            "concurrent_block": [(r * N, *block(r * N, CONC)) for r in (4, 16)],
            "pipe_empty": empty}


def sweep_rows(rank: int, ms, mb_rows: int, bubble_error: float | None = None,
               cpu_share: float = 1.0) -> list[dict]:
    """Per-rank rows as pipeline.measure_bubble writes them. The step's wall: the
    machine's GPipe step (``bubble_error`` None: stages that compute), or (sleeping
    stages) the one whose bubble is (S-1)/(M+S-1) off by ``bubble_error`` (relative)."""
    out = []
    for m in ms:
        f, b = gpipe_stage(mb_rows)
        busy = m * (f + b)
        if bubble_error is None:
            wall = gpipe_step(m, mb_rows)
        else:
            wall = busy / (1 - gpipe_formula(m) * (1 + bubble_error))
        run = SIM.play([(f, b)] * 2, m, "gpipe", 0.0)
        out.append({"M": m, "S": 2, "rank": rank, "mb_rows": mb_rows, "dp": 1,
                    "tokens_per_row": N, "wall_s": wall, "busy_s": busy, "t0": 0.0,
                    "cpu_share": cpu_share, "bubble": 1 - busy / wall,
                    "samples_per_s": m * mb_rows / wall,
                    "events": [e for e in run["events"] if e[1] == rank]})
    return out


def gpipe_formula(m, s=2):
    return (s - 1) / (m + s - 1)


def result(batch: int = 8, mb_rows: int = 4, ms=(1, 2, 4, 8), ddp_ratio: float | None = None,
           contention: float = 1.0, cpu_share: float = 1.0, sleep_error: float = 0.0,
           flat: bool = False, alloc_factor: float = 1.02, cores: int = 2) -> dict:
    """The launch result ``lab`` and the benchmark read. ``ddp_ratio``: force the 2-rank
    over 1-rank DDP step ratio (default: what the machine gives); ``contention``: the
    same step on every rank at once over one rank alone."""
    one = one_rank_step(batch)
    ddp = ddp_step(batch) if ddp_ratio is None else ddp_ratio * one
    state = 16 * P
    ranks = []
    for r in range(WS):
        timing = {"seconds": {"one_rank_full_batch": one, "ddp": ddp,
                              "ddp_no_sync": one_rank_step(batch // WS, CONC),
                              "all_reduce_grads": all_reduce(4 * P),
                              "all_ranks_full_batch": one * contention},
                  "speedup_vs_one_rank": one / ddp, "scaling_efficiency": one / (WS * ddp),
                  "all_reduce_bytes": 4 * P, "tokens_per_row": N,
                  "cpu_share": {"one_rank_full_batch": cpu_share if r == 0 else 0.0,
                                "ddp_no_sync": cpu_share},
                  "cores_available": cores, "threads": 1}
        ok = {"grad_max_abs_diff": 1e-8, "grads_compared": 42, "grads_missing": []}
        mem = {"param_bytes": 4 * P, "grad_bytes": 4 * P, "optimizer_bytes": 8 * P,
               "state_bytes": state}
        ranks.append({
            "calibrate": calibrate_raw(r, flat),
            "ddp": {"rank": r, "rows_per_rank": batch // WS, "n_params": P, "memory": mem,
                    "timing": timing, **ok},
            "tensor": {"rank": r, "output_max_abs_diff": 1e-8, "memory": mem,
                       "claimed_param_bytes": 4 * P / WS, "step_s": tp_step(batch),
                       "tokens_per_row": N, **ok},
            "sweep": {"bubble": sweep_rows(r, ms, mb_rows, None, cpu_share)},
            "sleep_sweep": {"bubble": sweep_rows(r, ms, mb_rows, sleep_error)},
            "memory": {"rank": r, "batch": batch, "microbatches": 2, "tokens_per_row": N,
                       "ddp": {"allocated_bytes": int(state * alloc_factor),
                               "allocated_by": "mallinfo2", "state_bytes": state}}})
    return {"world_size": WS, "ranks": ranks, "loadavg": (0.1, 0.1, 0.1)}
