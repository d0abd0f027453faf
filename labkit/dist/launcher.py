"""Run an experiment on several processes under ``torchrun`` and stream what it does.

``launch("ddp", config, nproc=2)`` starts ``torchrun --standalone --nproc-per-node 2 -m
labkit.dist.worker ...`` as a subprocess. Every rank prints one JSON line per event, marked
with :data:`labkit.dist.worker.MARK` (a training step: loss, throughput, memory); the launcher parses them as
they arrive and hands each to ``on_event`` (a notebook's live board), on the caller's thread.
When torchrun exits the launcher reads the result the last rank wrote atomically
(``result.json`` in the run folder, stamped with this launch's id, so a stale file from an
earlier run is never taken for this one's).

The same worker runs unchanged on a cluster: pass ``nnodes`` and ``rdzv_endpoint`` (a c10d
rendezvous on one of the hosts) and run the printed :func:`command` on every node.

Everything that can be checked before a process starts is (backend, degrees, a busy port),
so bad input is a :class:`~labkit.validate.LabkitConfigError`, not a stack of tracebacks from
N ranks. A failed job raises :class:`LaunchError` naming the rank that failed first.
Start-up costs seconds (importing torch on every rank plus the rendezvous), so one launch
should carry every measurement of a run (experiment ``suite``).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import validate as V
from .worker import MARK, validator

BACKENDS = ("auto", "gloo", "nccl")
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the labkit package


class LaunchError(RuntimeError):
    """The job failed: ``rank`` is the first rank that failed (None if unknown),
    ``exitcode`` torchrun's exit code, ``log_tail`` the end of the combined output."""

    def __init__(self, message: str, rank: int | None = None, exitcode: int | None = None,
                 log_tail: str = ""):
        self.rank, self.exitcode, self.log_tail = rank, exitcode, log_tail
        super().__init__(message + (f"\n--- last lines of the job's output ---\n{log_tail}"
                                    if log_tail else ""))


@dataclass
class LaunchResult:
    result: dict  # what the last rank wrote: {"experiment", "backend", "ranks": [...], ...}
    events: list[dict] = field(default_factory=list)  # every streamed line, in arrival order
    seconds: float = 0.0  # wall time of the whole launch, start-up included
    command: list[str] = field(default_factory=list)
    backend: str = "gloo"
    run_dir: str = ""

    def steps(self, rank: int | None = None) -> list[dict]:
        return [e for e in self.events if e.get("event") == "step"
                and (rank is None or e.get("rank") == rank)]


def pick_backend(backend: str = "auto", nproc: int = 1) -> str:
    """``gloo`` on CPU, ``nccl`` where there are GPUs (one per local rank); ``nccl`` asked
    for without GPUs is an error, not a hang at the first collective."""
    V.choice("backend", backend, BACKENDS)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus >= nproc else "gloo"
    if backend == "nccl" and gpus < nproc:
        raise V.LabkitConfigError(
            "backend", backend, f"'gloo' or 'auto' on this machine: nccl needs one GPU per "
            f"local rank ({nproc} asked, {gpus} CUDA devices found)")
    return backend


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def command(experiment: str, config: dict | None = None, nproc: int = 2, *,
            backend: str = "gloo", timeout: float = 120.0, run_dir: str = "runs/job",
            launch_id: str = "manual", nnodes: int | str = 1,
            rdzv_endpoint: str | None = None, rdzv_id: str = "labkit", port: int | None = None,
            max_restarts: int = 0, threads: int = 1) -> list[str]:
    """The torchrun command line for ``experiment`` (what :func:`launch` runs; on a cluster,
    run it on every node with the same ``rdzv_endpoint``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5"]
    if rdzv_endpoint:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    elif port is not None:
        cmd += ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", rdzv_id]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "labkit.dist.worker", "--experiment", experiment,
            "--config", json.dumps(config or {}), "--backend", backend,
            "--timeout", str(timeout), "--run-dir", str(run_dir), "--launch-id", launch_id,
            "--threads", str(threads)]
    return cmd


def _validate(nproc, timeout, max_restarts, port, nnodes, rdzv_endpoint, threads):
    V.integer("nproc", nproc, 1)
    V.number("timeout", timeout, 0.0, lo_open=True)
    V.integer("max_restarts", max_restarts, 0)
    V.integer("threads", threads, 1)
    if port is not None:
        V.integer("port", port, 1024, 65535)
        if not port_free(port):
            raise V.LabkitConfigError("port", port, "a free TCP port (this one is in use; "
                                      "leave port=None to let torchrun pick one)")
    if rdzv_endpoint is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", rdzv_endpoint):
        raise V.LabkitConfigError("rdzv_endpoint", rdzv_endpoint, "'host:port'")
    if rdzv_endpoint is None and str(nnodes) != "1":
        raise V.LabkitConfigError("nnodes", nnodes, "1 unless rdzv_endpoint is given")


_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def _reader(stream, q: queue.Queue):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def launch(experiment: str, config: dict | None = None, nproc: int = 2, *,
           backend: str = "auto", timeout: float = 120.0, wall_timeout: float | None = None,
           on_event: Callable[[dict], None] | None = None, run_dir: str | Path | None = None,
           nnodes: int | str = 1, rdzv_endpoint: str | None = None, port: int | None = None,
           max_restarts: int = 0, threads: int = 1, validate: Callable | None = None,
           startup_retries: int = 1) -> LaunchResult:
    """Run ``experiment`` on ``nproc`` ranks (per node) and return its :class:`LaunchResult`.

    ``timeout``: the process-group timeout in seconds (a collective waiting longer on a
    hung peer fails instead of waiting torch's default 30 minutes). ``wall_timeout``: the
    whole job is killed after this many seconds (default: generous, from ``timeout``).
    ``validate(config, world_size)`` checks the experiment's config before any process
    starts (the experiment modules provide one each). ``startup_retries``: a job whose
    ranks failed before any of them joined the process group (a rendezvous or connect race
    on a busy machine) is started again, with a warning; the retries are recorded in
    ``result["startup_retries"]``.
    """
    _validate(nproc, timeout, max_restarts, port, nnodes, rdzv_endpoint, threads)
    backend = pick_backend(backend, nproc)
    config = dict(config or {})
    if validate is None:
        validate = validator(experiment)
    if validate is not None:
        validate(config, nproc * (int(nnodes) if str(nnodes).isdigit() else 1))
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="labkit-dist-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(startup_retries + 1):
        try:
            out = _launch_once(experiment, config, nproc, backend, timeout, wall_timeout,
                               on_event, run_dir, nnodes, rdzv_endpoint, port, max_restarts,
                               threads)
        except _StartupFailure as e:
            if attempt == startup_retries:
                raise e.error from None
            warnings.warn(f"labkit.dist: the job failed before its ranks joined the process "
                          f"group; starting it again ({e.error.args[0][:200]})", stacklevel=2)
            continue
        out.result["startup_retries"] = attempt
        return out


class _StartupFailure(Exception):
    def __init__(self, error: LaunchError):
        self.error = error


def _launch_once(experiment, config, nproc, backend, timeout, wall_timeout, on_event, run_dir,
                 nnodes, rdzv_endpoint, port, max_restarts, threads) -> LaunchResult:
    launch_id = uuid.uuid4().hex
    cmd = command(experiment, config, nproc, backend=backend, timeout=timeout,
                  run_dir=str(run_dir), launch_id=launch_id, nnodes=nnodes,
                  rdzv_endpoint=rdzv_endpoint, port=port, max_restarts=max_restarts,
                  threads=threads)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    wall_timeout = wall_timeout or (timeout * (max_restarts + 1) + 120.0)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, bufsize=1)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    events, log = [], []
    try:
        while True:
            if time.perf_counter() - start > wall_timeout:
                raise LaunchError(f"job killed after wall_timeout={wall_timeout:.0f} s",
                                  log_tail="".join(log[-40:]))
            try:
                line = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith(MARK):
                try:
                    event = json.loads(line[len(MARK):])
                except json.JSONDecodeError:  # a line cut by a dying process
                    log.append(line)
                    continue
                events.append(event)
                if on_event is not None:
                    on_event(event)
            else:
                log.append(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # our own process group only: torchrun and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - start
    (run_dir / "launch.log").write_text("".join(log))
    if code != 0:
        error = _failure(code, log, events, timeout)
        if not any(e.get("event") == "ready" for e in events):
            raise _StartupFailure(error)
        raise error
    path = run_dir / "result.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("launch_id") != launch_id:
        raise LaunchError("the job exited cleanly but its last rank wrote no result for this "
                          "launch", exitcode=code, log_tail="".join(log[-40:]))
    return LaunchResult(result, events, seconds, cmd, backend, str(run_dir))


def _failure(code: int, log: list[str], events: list[dict], timeout: float) -> LaunchError:
    text = "".join(log)
    summary = text[text.rfind("Failures:"):] if "Failures:" in text else text
    errors = [e for e in events if e.get("event") == "error"]
    # torchrun's "root cause" is the first failure it observed, which races: a rank whose
    # peer was killed can exit (connection closed) before the kill is noticed. A rank
    # killed by a signal other than the agent's own SIGTERM is the culprit; else the root.
    failures = [(int(r), int(c)) for r, c in _FAILURE.findall(summary)]
    root = summary[summary.find("Root Cause"):] if "Root Cause" in summary else summary
    first = _FAILURE.search(root)
    killed = [f for f in failures if f[1] < 0 and f[1] != -signal.SIGTERM]
    pick = killed[0] if killed else ((int(first.group(1)), int(first.group(2))) if first
                                     else None)
    rank = pick[0] if pick else (errors[0]["rank"] if errors else None)
    what = f"exit code {pick[1]}" if pick else f"torchrun exit code {code}"
    if pick and pick[1] < 0:
        what += f" (killed by signal {signal.Signals(-pick[1]).name})"
    msg = f"rank {rank} failed first ({what})"
    mine = [e for e in errors if e.get("rank") == rank] or errors
    if mine:
        msg += f": {mine[0]['error']}"
    if "timed out" in text.lower() or "timeout" in msg.lower():
        msg += (f" [process-group timeout {timeout:g} s hit: a peer stopped answering "
                f"(hung or dead)]")
    last = {}
    for e in events:
        if e.get("event") == "step":
            last[e["rank"]] = e.get("step")
    if last:
        msg += f"; last step reported per rank: {dict(sorted(last.items()))}"
    return LaunchError(msg, rank=rank, exitcode=code, log_tail="".join(log[-25:]))
