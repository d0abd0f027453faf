"""Data parallel (the seed paper's Eq. 7) with ``DistributedDataParallel``.

Every one of N ranks holds the whole model and takes B/N rows of the global batch; after
the backward pass DDP all-reduces (averages) the gradients in buckets, overlapped with the
rest of the backward, so every rank takes the same optimizer step:

    g = (1/N) sum_r grad L_r(w),   L_r the mean loss over rank r's B/N rows      (Eq. 7)

which is the gradient of the mean loss over the concatenated batch (equal shards). It
saves compute time (each rank does 1/N of the work) and costs memory (N full copies of
weights, gradients and optimizer state: 16 bytes a parameter with fp32 AdamW; the
gradients are views into DDP's all-reduce buckets, ``gradient_as_bucket_view``, else the
buckets would be 4 bytes a parameter more) and one all-reduce of all gradients a step:
2(N-1)/N x 4P bytes per rank on a ring.

:func:`run` (experiment ``ddp``) checks the gradients after one step against one process
on the whole batch, trains through :func:`labkit.train.fit` with :class:`DDPStrategy`
(streaming loss, throughput and memory per rank), checkpoints atomically and resumes after
a restart, and measures step time, the all-reduce and 1-rank step time side by side,
with the CPU share each rank got while it was timed (whether it had a core of its own).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import measure
from .. import train as T
from .. import validate as V
from .common import (
    all_max,
    check_common,
    compare_grads,
    cores_available,
    grads,
    lockstep_timer,
    setup,
    shard,
    state_bytes,
)


def validate(config: dict, world_size: int) -> None:
    check_common(config, world_size, batch_divisor=world_size)
    V.integer("checkpoint_every", config.get("checkpoint_every", 0), 0)
    V.integer("rounds", config.get("rounds", 0), 0)


def task_loss(model, logits, batch) -> torch.Tensor:
    """The model's own loss on logits computed elsewhere (through a wrapper)."""
    if model.cfg.kind == "encoder":
        return F.cross_entropy(logits, batch["labels"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


class DDPStrategy(T.StepStrategy):
    """Forward through the DDP wrapper (its hooks all-reduce during backward)."""

    def __init__(self, ddp_model: DDP):
        self.ddp = ddp_model

    def loss(self, model, batch, state):
        return task_loss(model, forward(self.ddp, batch), batch)


def forward(module, batch: dict):
    """The model's (or its DDP wrapper's) logits on ``batch``: ids, padding mask and
    segment ids, as :meth:`labkit.model.Transformer.loss` passes them."""
    return module(batch["input_ids"], batch.get("padding_mask"), batch.get("token_type_ids"))


class StreamSteps(T.Callback):
    """Emit each step's loss, throughput and bytes held from every rank."""

    all_ranks = True

    def __init__(self, ctx, rows: int, tokens: int, model, opt, offset: int = 0):
        self.ctx, self.rows, self.tokens, self.model, self.opt = ctx, rows, tokens, model, opt
        self.offset, self.last = offset, time.perf_counter()

    def on_step(self, state):
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        mem = state_bytes(self.model, self.opt)
        self.ctx.emit(step=state.step + self.offset, loss=state.loss, step_s=dt,
                      samples_per_s=self.rows / dt, tokens_per_s=self.tokens / dt,
                      state_bytes=mem["state_bytes"], rss_bytes=mem["peak_rss_bytes"])
        self.ctx.fault(state.step + self.offset)


class Checkpoint(T.Callback):
    """Rank 0 saves model + optimizer every ``every`` steps, atomically (temp + rename)."""

    all_ranks = True

    def __init__(self, ctx, path: Path, every: int, model, opt, offset: int):
        self.ctx, self.path, self.every = ctx, path, every
        self.model, self.opt, self.offset = model, opt, offset

    def on_step(self, state):
        step = state.step + self.offset
        if self.every and step % self.every == 0 and self.ctx.rank == 0:
            tmp = self.path.with_suffix(".tmp")
            torch.save({"step": step, "model": self.model.state_dict(),
                        "opt": self.opt.state_dict()}, tmp)
            os.replace(tmp, self.path)
            self.ctx.emit("checkpoint", step=step)


def wrap(model) -> DDP:
    """DDP with the gradients as views into its all-reduce buckets: 16 B/param with AdamW
    (a separate bucket copy would be 4 more)."""
    return DDP(model, gradient_as_bucket_view=True)


def gradient_check(ctx, model, plain, ddp, batch) -> dict:
    """Max |grad_DDP - grad_one_process| after one step on the same global batch, over
    every parameter (one without a gradient on either side fails the check)."""
    ref = copy.deepcopy(plain)
    ref.loss(batch).backward()
    model.zero_grad(set_to_none=True)
    part = shard(batch, ctx.rank, ctx.world_size)
    task_loss(model, forward(ddp, part), part).backward()
    out = compare_grads(grads(model), grads(ref))
    out["grad_max_abs_diff"] = all_max(out["grad_max_abs_diff"])
    model.zero_grad(set_to_none=True)
    return out


def timings(ctx, model, plain, ddp, batch, rounds: int, reps: int) -> dict:
    """Step time of N-rank DDP (B/N rows each), the same without its all-reduce
    (``no_sync``), one rank alone on all B rows, and a bare all-reduce of every gradient,
    timed side by side in rotated rounds (:func:`labkit.measure.paired`, lock-step); and
    whether each rank had a core of its own: the same whole-batch step on every rank at
    once (``all_ranks_full_batch``; its time over rank 0's alone is the contention, 1.0
    with a core each, whatever the OS reports: a hypervisor's stolen time and shared SMT
    cores show here too) and the CPU share each rank got while timed (``cpu_share``)."""
    part = shard(batch, ctx.rank, ctx.world_size)
    single = plain
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))

    def ddp_step():
        task_loss(model, forward(ddp, part), part).backward()

    def compute_only():
        with ddp.no_sync():
            ddp_step()

    def one_rank():
        if ctx.rank == 0:
            single.loss(batch).backward()

    def every_rank():  # the same work as one_rank, on every rank at once
        single.loss(batch).backward()

    fns = {"one_rank_full_batch": one_rank, "ddp": ddp_step, "ddp_no_sync": compute_only,
           "all_reduce_grads": lambda: dist.all_reduce(flat),
           "all_ranks_full_batch": every_rank}
    cpu: dict = {}
    p = measure.paired(fns, reference="one_rank_full_batch", rounds=rounds,
                       timer=lockstep_timer(reps, cpu=cpu))
    model.zero_grad(set_to_none=True)
    single.zero_grad(set_to_none=True)
    t1, tn = p.seconds["one_rank_full_batch"], p.seconds["ddp"]
    return {"seconds": p.seconds, "spread": p.spread, "rounds": rounds, "reps": reps,
            "speedup_vs_one_rank": t1 / tn, "scaling_efficiency": t1 / (ctx.world_size * tn),
            "comm_overhead_s": tn - p.seconds["ddp_no_sync"],
            "all_reduce_bytes": flat.numel() * 4, "tokens_per_row": int(part["input_ids"].shape[1]),
            # CPU seconds per wall second in the fastest call (min over rounds); rank 1's
            # one_rank_full_batch is an empty call, so only rank 0's means anything
            "cpu_share": {k: min(v) for k, v in cpu.items()},
            "cores_available": cores_available(), "threads": torch.get_num_threads()}


def run(ctx) -> dict:
    cfg = ctx.config
    wl, model = setup(cfg)
    model.to(ctx.device)
    plain = copy.deepcopy(model)  # one process's model: copied before DDP hooks its params
    ddp = wrap(model)
    out: dict = {"rank": ctx.rank, "n_params": sum(p.numel() for p in model.parameters())}
    stream = wl.make_batches(cfg.get("seed", 0))
    if cfg.get("check", True):
        out.update(gradient_check(ctx, model, plain, ddp, next(stream)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.get("lr", 1e-3))
    ckpt = ctx.run_dir / "ddp_checkpoint.pt"
    start_step = 0
    if ctx.restart > 0 and ckpt.exists():  # resume: every rank loads rank 0's checkpoint
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start_step = saved["step"]
        ctx.emit("resume", step=start_step, attempt=ctx.restart)
    for _ in range(start_step):  # the data stream continues where the checkpoint was
        next(stream)
    steps = cfg.get("steps", 10) - start_step
    batch0 = next(stream)
    rows = len(batch0["input_ids"]) // ctx.world_size
    tokens = rows * batch0["input_ids"].shape[1]
    shards = (shard(b, ctx.rank, ctx.world_size) for b in _chain(batch0, stream))
    cbs = [StreamSteps(ctx, rows, tokens, model, opt, start_step),
           Checkpoint(ctx, ckpt, cfg.get("checkpoint_every", 0), model, opt, start_step)]
    if steps > 0:
        res = T.fit(model, shards, steps, lr=cfg.get("lr", 1e-3), optimizer=opt,
                    callbacks=cbs, strategy=DDPStrategy(ddp), progress=False,
                    seed=cfg.get("seed", 0) + start_step)
        out["losses"] = [h["loss"] for h in res.history if h["split"] == "train"]
        out["train_seconds"] = res.seconds
    out.update(start_step=start_step, final_step=start_step + max(steps, 0),
               memory=state_bytes(model, opt), rows_per_rank=rows)
    out["weights_checksum"] = float(sum(p.double().sum() for p in model.parameters()))
    if cfg.get("rounds", 0):
        out["timing"] = timings(ctx, model, plain, ddp, next(stream), cfg["rounds"],
                                cfg.get("reps", 3))
    return out


def _chain(first, rest):
    yield first
    yield from rest
