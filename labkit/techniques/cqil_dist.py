"""CQIL across processes: ``P`` ranks each hold their blocks of a group, one all-reduce of
the deltas per step (Zou et al., ACL 2024; see :mod:`labkit.techniques.cqil`).

Launched by :func:`labkit.dist.launch` (torchrun, gloo on CPU, one thread per rank)::

    launch("labkit.techniques.cqil_dist:run", {"model": path, "groups": [[4, 8]], ...},
           nproc=P)

Rank 0 runs the model's own forward (token, position and segment embeddings, the padding
mask, the head) with its block executor swapped (the depth seam) for
:class:`DistributedCQILExecutor`: it runs the blocks before the group, broadcasts their
output ``x``; in every step rank ``r`` runs block ``start + s P + r`` (the reference code's
dealing) on ``x`` with the same padding mask, and the ranks all-reduce ``f_r(x) - x``, so
every rank holds ``x + sum_i (f_i(x) - x)``; rank 0 runs the blocks after the group and the
head. The other ranks run the executor alone. Each rank keeps only its own group blocks (the
others are deleted), so a rank's weights are ``1/P`` of the group's. ``D = 0`` works for
pre-norm and post-norm (BERT, MiniLM) blocks alike (each block runs whole); bypass ``D > 0``
splits a pre-norm block at its MLP input and is refused for post-norm blocks. It needs the
step's attention outputs before the MLPs: one all-gather more per step.

Timing, side by side in one launch: per group, rounds in rotated order of the sequential
model on rank 0 with 1 and with 2 threads (the other ranks wait in a barrier), and CQIL on
all ranks; each the median of ``reps`` forwards; plus one all-reduce of a ``(B, N, D)``
tensor alone. Cost per step: one block + one all-reduce; per forward one broadcast.
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from .. import validate as V
from ..model import BlockContext, BlockExecutor, ModelConfig, Transformer
from .cqil import block_parts, check_group, steps_of


def save_job(path, model: Transformer, ids: torch.Tensor, padding_mask=None,
             token_type_ids=None) -> Path:
    """What the ranks load: the model's config and weights and the inputs (ids, and the
    padding mask and segment ids when there are any); the config also goes to a JSON file
    beside it, for :func:`validate`."""
    import dataclasses
    import json

    path = Path(path)
    torch.save({"config": dataclasses.asdict(model.cfg), "state": model.state_dict(),
                "ids": ids, "padding_mask": padding_mask, "token_type_ids": token_type_ids},
               path)
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
    return path


def check_block_style(norm_position: str, d: int) -> None:
    """Bypass ``D > 0`` splits a block at its MLP input the pre-norm way; post-norm (BERT)
    blocks run whole, so only ``D = 0``."""
    if d > 0 and norm_position == "post":
        raise V.LabkitConfigError("D", d, "0 for post-norm (BERT/MiniLM) blocks: the bypass "
                                  "splits a pre-norm block at its MLP input")


def validate(config: dict, world_size: int) -> None:
    """Checked by the launcher before any process starts."""
    import json

    groups = config.get("groups")
    if not isinstance(groups, list) or not groups:
        raise V.LabkitConfigError("groups", groups, "a non-empty list of [start, end(, D)]")
    n = config.get("n_layers")
    side = Path(str(config["model"])).with_suffix(".json") if config.get("model") else None
    norm = json.loads(side.read_text()).get("norm_position", "pre") \
        if side is not None and side.is_file() else config.get("norm_position", "pre")
    for g in groups:
        if not isinstance(g, (list, tuple)) or len(g) not in (2, 3):
            raise V.LabkitConfigError("groups", groups, "a list of [start, end] or "
                                                        "[start, end, D]")
        d = g[2] if len(g) == 3 else config.get("D", 0)
        check_group(g[0], g[1], world_size, n, d)
        check_block_style(norm, d)
    V.integer("reps", config.get("reps", 5), 1)
    V.integer("rounds", config.get("rounds", 3), 1)


def _step(own: dict, idx: list[int], x, ctx, rank: int, world: int, d: int):
    """One step on this rank: its block's delta, all-reduced over the ranks."""
    j = idx[rank] if rank < len(idx) else None  # a short last step leaves ranks idle
    if d == 0:
        delta = ctx.call(own[j], x) - x if j is not None else torch.zeros_like(x)
    else:
        # the attention outputs of the step, all ranks', feed the later blocks' MLPs
        if j is not None:
            b = own[j]
            a = b.drop(b.attn(b.norm1(x), key_padding_mask=ctx.key_padding_mask,
                              rope=ctx.rope))
        else:
            a = torch.zeros_like(x)
        attn = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(attn, a.contiguous())
        attn = attn[:len(idx)]
        if j is not None:
            pos = idx.index(j)
            byp = sum(attn[max(0, pos - d):pos]) if pos else None
            y, _ = block_parts(own[j], x, ctx, byp)
            delta = y - x
        else:
            delta = torch.zeros_like(x)
    dist.all_reduce(delta)
    return x + delta


class DistributedCQILExecutor(BlockExecutor):
    """The block executor of one rank: the blocks before the group and after it on rank 0
    (with ``outside_threads`` threads), the group's steps on every rank (one thread)."""

    def __init__(self, own: dict, start: int, end: int, d: int = 0, outside_threads: int = 1):
        super().__init__()
        self.own, self.start, self.end, self.d = own, start, end, d
        self.outside_threads = outside_threads

    def forward(self, blocks, x, ctx: BlockContext):
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            torch.set_num_threads(self.outside_threads)
            for i in range(self.start):
                x = ctx.call(blocks[i], x)  # (B, N, D)
            torch.set_num_threads(1)
        x = x.contiguous()
        dist.broadcast(x, 0)  # the other ranks' x is a buffer of the same shape
        for idx in steps_of(self.start, self.end, world):
            x = _step(self.own, idx, x, ctx, rank, world, self.d)
        if rank == 0:
            torch.set_num_threads(self.outside_threads)
            for i in range(self.end, len(blocks)):
                x = ctx.call(blocks[i], x)
            torch.set_num_threads(1)
        return x


def cqil_forward(model: Transformer, own: dict, start: int, end: int, ids, d: int = 0,
                 outside_threads: int = 1, padding_mask=None, token_type_ids=None):
    """The distributed CQIL forward; logits on rank 0 (None on the others). Rank 0 runs
    the model's own forward (embeddings incl. segments, padding mask, head) with the
    executor swapped in; the others run only the executor, with the same mask."""
    check_block_style(model.cfg.norm_position, d)
    ex = DistributedCQILExecutor(own, start, end, d, outside_threads)
    if dist.get_rank() != 0:
        x = torch.empty(ids.shape[0], ids.shape[1], model.cfg.d_model)  # (B, N, D)
        ex(model.blocks, x, BlockContext(padding_mask, model.rope))
        return None
    before = model.set_executor(ex)
    try:
        return model(ids, padding_mask, token_type_ids)
    finally:
        model.set_executor(before)


def _allreduce_copy(x):
    dist.all_reduce(x.clone())


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(ctx) -> dict:
    """Worker entry: exactness output for each group, then side-by-side timings."""
    cfg = ctx.config
    job = torch.load(cfg["model"], weights_only=True)
    model = Transformer(ModelConfig(**job["config"]))
    model.load_state_dict(job["state"])
    model.eval()
    ids, mask, types = job["ids"], job.get("padding_mask"), job.get("token_type_ids")
    rank, world = ctx.rank, ctx.world_size
    reps, rounds = int(cfg.get("reps", 5)), int(cfg.get("rounds", 3))
    out = {"rank": rank, "groups": []}
    for g in cfg["groups"]:
        start, end = g[0], g[1]
        d = int(g[2]) if len(g) == 3 else int(cfg.get("D", 0))
        own = {j: model.blocks[j] for s in steps_of(start, end, world) for j in s
               if s.index(j) == rank}
        group_params = sum(p.numel() for j in own for p in own[j].parameters())
        with torch.inference_mode():
            logits = cqil_forward(model, own, start, end, ids, d, padding_mask=mask,
                                  token_type_ids=types)
            if rank == 0 and cfg.get("save_outputs"):
                torch.save(logits, Path(ctx.run_dir) / f"cqil-{start}-{end}-{d}.pt")
            times = {"seq_1thread": [], "seq_2threads": [], "cqil": [], "cqil_outside2": [],
                     "allreduce": []}

            def seq(threads):
                if rank == 0:
                    torch.set_num_threads(threads)
                    t = _median_time(lambda: model(ids, mask, types), reps)
                    torch.set_num_threads(1)
                else:
                    t = 0.0
                dist.barrier()
                return t

            x = torch.zeros(ids.shape[0], ids.shape[1], model.cfg.d_model)
            fwd = partial(cqil_forward, model, own, start, end, ids, d, padding_mask=mask,
                          token_type_ids=types)
            fns = {"seq_1thread": partial(seq, 1), "seq_2threads": partial(seq, 2),
                   "cqil": partial(_median_time, fwd, reps),
                   "cqil_outside2": partial(_median_time, partial(fwd, outside_threads=2),
                                            reps),
                   "allreduce": partial(_median_time, partial(_allreduce_copy, x), reps)}
            names = list(fns)
            for r in range(rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    dist.barrier()
                    times[k].append(fns[k]())
        out["groups"].append({"start": start, "end": end, "P": world, "D": d,
                              "own_blocks": sorted(own), "own_group_params": group_params,
                              "times": times})
        ctx.emit("group", start=start, end=end)
    return out


def summarize(result: dict) -> list[dict]:
    """Per group: medians over rounds (rank 0's clock), the paired speedups of CQIL over
    the sequential model, and the all-reduce cost."""
    r0 = next(r for r in result["ranks"] if r["rank"] == 0)
    rows = []
    for g in r0["groups"]:
        t = g["times"]
        n = len(t["cqil"])
        best_cqil = [min(t["cqil"][i], t["cqil_outside2"][i]) for i in range(n)]
        best_seq = [min(t["seq_1thread"][i], t["seq_2threads"][i]) for i in range(n)]
        ratio = [best_cqil[i] / best_seq[i] for i in range(n)]
        rows.append({"start": g["start"], "end": g["end"], "P": g["P"], "D": g["D"],
                     "seq_1thread_ms": 1e3 * statistics.median(t["seq_1thread"]),
                     "seq_2threads_ms": 1e3 * statistics.median(t["seq_2threads"]),
                     "cqil_ms": 1e3 * statistics.median(best_cqil),
                     "allreduce_ms": 1e3 * statistics.median(t["allreduce"]),
                     "latency_cut": 1 - statistics.median(ratio),
                     "latency_cut_min": 1 - max(ratio), "latency_cut_max": 1 - min(ratio),
                     "rounds": n})
    return rows
