"""The entry point torchrun runs on every rank: ``python -m labkit.dist.worker``.

It sets one thread per rank, joins the process group (gloo on CPU, nccl on GPUs, always
with a timeout), runs the experiment named by ``--experiment`` with the JSON ``--config``,
gathers every rank's returned dict on the last rank, and that rank writes ``result.json``
atomically (temp file + rename) in ``--run-dir``. Per-step lines go to stdout marked with
:data:`MARK`, one ``os.write`` per line so ranks never interleave.

An experiment is ``fn(ctx: Context) -> dict`` named in :data:`EXPERIMENTS`, or any
``"package.module:function"``; a module may define ``validate(config, world_size)`` (run by
the launcher before any process starts) next to it, named in :data:`VALIDATORS`.

Multi-node: the same command on every node, e.g.::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id job1 -m labkit.dist.worker \\
        --experiment ddp --config '{"steps": 100}' --run-dir runs/job1
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

MARK = "@@labkit "  # the line prefix of an event the launcher parses

EXPERIMENTS = {
    "selftest": "labkit.dist.worker:selftest",
    "ddp": "labkit.dist.ddp:run",
    "tensor": "labkit.dist.tensor:run",
    "pipeline": "labkit.dist.pipeline:run",
    "hybrid": "labkit.dist.pipeline:run_hybrid",
    "calibrate": "labkit.dist.simulator:calibrate",
    "memory": "labkit.dist.memory:run",
    "suite": "labkit.dist.worker:suite",
}
VALIDATORS = {
    "selftest": None,
    "ddp": "labkit.dist.ddp:validate",
    "tensor": "labkit.dist.tensor:validate",
    "pipeline": "labkit.dist.pipeline:validate",
    "hybrid": "labkit.dist.pipeline:validate_hybrid",
    "calibrate": None,
    "memory": "labkit.dist.memory:validate",
    "suite": "labkit.dist.worker:validate_suite",
}


def _resolve(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def resolve(experiment: str):
    """The experiment function for a registered name or ``"module:function"``."""
    from .. import validate as V

    if experiment in EXPERIMENTS:
        return _resolve(EXPERIMENTS[experiment])
    if ":" in experiment:
        return _resolve(experiment)
    raise V.LabkitConfigError("experiment", experiment,
                              f"one of {sorted(EXPERIMENTS)} or 'package.module:function'")


def validator(experiment: str):
    """The config check for ``experiment`` (None if it has none)."""
    from .. import validate as V

    if experiment in VALIDATORS:
        return _resolve(VALIDATORS[experiment]) if VALIDATORS[experiment] else None
    if ":" in experiment:
        mod = importlib.import_module(experiment.partition(":")[0])
        return getattr(mod, "validate", None)
    raise V.LabkitConfigError("experiment", experiment,
                              f"one of {sorted(EXPERIMENTS)} or 'package.module:function'")


@dataclass
class Context:
    """What an experiment gets on its rank."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    config: dict
    run_dir: Path
    restart: int = 0  # torchrun's restart count (0 on the first attempt)
    timeout: float = 120.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def emit(self, event: str = "step", **fields) -> None:
        """Stream one JSON line to the launcher (loss, throughput, memory, ...)."""
        line = MARK + json.dumps({"event": event, "rank": self.rank, "t": time.time(),
                                  **fields}, default=float) + "\n"
        os.write(1, line.encode())

    def fault(self, step: int) -> None:
        """Inject the fault the config asks for (tests of the launcher's fault handling):
        ``config["fault"] = {"rank": r, "step": s, "kind": "die"|"hang"|"raise",
        "attempt": a}`` fires on rank r at step s of attempt a (default 0)."""
        f = self.config.get("fault")
        if not f or f.get("rank") != self.rank or f.get("step") != step \
                or f.get("attempt", 0) != self.restart:
            return
        self.emit("fault", kind=f["kind"], step=step)
        if f["kind"] == "die":
            os.kill(os.getpid(), 9)
        elif f["kind"] == "hang":
            time.sleep(10 ** 6)
        raise RuntimeError(f"injected failure at step {step}")


def selftest(ctx: Context) -> dict:
    """All-reduce the ranks' ids a few times, emitting a step each time."""
    steps = int(ctx.config.get("steps", 3))
    total = None
    for step in range(1, steps + 1):
        ctx.fault(step)
        t = torch.full((4,), float(ctx.rank + 1))
        dist.all_reduce(t)
        total = float(t[0])
        ctx.emit(step=step, value=total)
    return {"sum_of_rank_plus_one": total, "pid": os.getpid()}


def validate_suite(config: dict, world_size: int) -> None:
    from .. import validate as V

    parts = config.get("parts")
    if not isinstance(parts, list) or not parts:
        raise V.LabkitConfigError("parts", parts, "a non-empty list of "
                                  "{'experiment': name, 'config': {...}}")
    for p in parts:
        check = validator(p.get("experiment", ""))
        if check is not None:
            check(dict(p.get("config", {})), world_size)


def suite(ctx: Context) -> dict:
    """Several experiments in one launch (start-up costs seconds): ``config["parts"]`` is a
    list of ``{"experiment": name, "config": {...}, "name": key}``; a barrier between them."""
    out = {}
    for p in ctx.config["parts"]:
        key = p.get("name", p["experiment"])
        sub = Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend,
                      dict(p.get("config", {})), ctx.run_dir, ctx.restart, ctx.timeout,
                      ctx.device)
        ctx.emit("part", name=key)
        out[key] = resolve(p["experiment"])(sub)
        dist.barrier()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="labkit.dist.worker")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--run-dir", default="runs/job")
    ap.add_argument("--launch-id", default="manual")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # one core per rank: ranks do not fight for cores
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = datetime.timedelta(seconds=args.timeout)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A store prefix per launch and attempt: after a restart, no rank may read the
    # addresses the dead attempt's ranks published (a connect to a closed port).
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         world, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"labkit/{args.launch_id}/attempt{restart}", base)
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world,
                            timeout=timeout)
    ctx = Context(dist.get_rank(), dist.get_world_size(), local_rank, args.backend,
                  json.loads(args.config), Path(args.run_dir), restart, args.timeout, device)
    ctx.emit("ready", pid=os.getpid(), attempt=ctx.restart)
    start = time.perf_counter()
    try:
        out = resolve(args.experiment)(ctx)
        last = ctx.world_size - 1
        gathered = [None] * ctx.world_size if ctx.rank == last else None
        dist.gather_object(out, gathered, dst=last)
        if ctx.rank == last:
            from ..notebook import write_json_atomic

            write_json_atomic(ctx.run_dir / "result.json", {
                "launch_id": args.launch_id, "experiment": args.experiment,
                "backend": args.backend, "world_size": ctx.world_size,
                "threads_per_rank": args.threads, "timeout_s": args.timeout,
                "restarts": ctx.restart, "seconds": time.perf_counter() - start,
                "torch": torch.__version__, "ranks": gathered})
    except BaseException as e:
        ctx.emit("error", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    raise SystemExit(record(main)())
