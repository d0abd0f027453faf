"""The torchrun launcher: streaming, the last rank's atomic result, and bad input refused
before any process starts."""
import socket

import pytest
import torch

from labkit.dist import command, launch, pick_backend
from labkit.validate import LabkitConfigError


def test_launch_streams_steps_and_returns_last_rank_result(tmp_path):
    seen = []
    (tmp_path / "result.json").write_text('{"launch_id": "stale"}')  # never taken as ours
    r = launch("selftest", {"steps": 3}, nproc=2, timeout=30, on_event=seen.append,
               run_dir=tmp_path)
    assert r.backend == "gloo" and r.result["backend"] == "gloo"
    assert r.result["timeout_s"] == 30 and r.result["world_size"] == 2
    assert r.result["launch_id"] != "stale"
    # every rank streamed every step, the all-reduce saw both ranks (1 + 2)
    assert sorted((e["rank"], e["step"]) for e in seen if e["event"] == "step") == \
        [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [x["sum_of_rank_plus_one"] for x in r.result["ranks"]] == [3.0, 3.0]
    assert len({x["pid"] for x in r.result["ranks"]}) == 2  # two real processes
    assert r.steps(rank=1)[-1]["value"] == 3.0


def test_bad_input_is_refused_before_start():
    if not torch.cuda.is_available():
        with pytest.raises(LabkitConfigError, match="backend"):
            pick_backend("nccl", 2)
        with pytest.raises(LabkitConfigError, match="backend"):
            launch("selftest", nproc=2, backend="nccl")
    assert pick_backend("auto", 2) in ("gloo", "nccl")
    with pytest.raises(LabkitConfigError, match="backend"):
        pick_backend("mpi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(LabkitConfigError, match=f"port={busy}"):
            launch("selftest", nproc=2, port=busy)
    with pytest.raises(LabkitConfigError, match="nproc"):
        launch("selftest", nproc=0)
    with pytest.raises(LabkitConfigError, match="experiment"):
        launch("no_such_thing", nproc=2)
    with pytest.raises(LabkitConfigError, match="rdzv_endpoint"):
        launch("selftest", nproc=2, nnodes=2, rdzv_endpoint="no port")
    with pytest.raises(LabkitConfigError, match="nnodes"):
        launch("selftest", nproc=2, nnodes=2)
    with pytest.raises(LabkitConfigError, match="parts"):
        launch("suite", {"parts": []}, nproc=2)


def test_multi_node_command_uses_the_rendezvous():
    cmd = command("ddp", {"steps": 5}, 8, nnodes=2, rdzv_endpoint="node0:29500")
    assert "--standalone" not in cmd
    i = cmd.index("--rdzv-endpoint")
    assert cmd[i + 1] == "node0:29500" and cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("-m", 3) + 1] == "labkit.dist.worker"


_SUMMARY = """Failures:
[1]:
  time      : 2026-11-22_05:00:00
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 2)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_05:00:00
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 1)
"""


def test_the_killed_rank_is_named_even_when_its_peer_failed_first():
    from labkit.dist.launcher import _failure

    # torchrun saw rank 0 fail first (its peer vanished), but rank 1 was killed: rank 1
    e = _failure(1, [_SUMMARY.format(code=-9)], [], 30)
    assert e.rank == 1 and "SIGKILL" in str(e)
    # a rank the agent itself terminated (SIGTERM) is not the culprit: the root cause is
    assert _failure(1, [_SUMMARY.format(code=-15)], [], 30).rank == 0
