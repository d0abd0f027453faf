"""Faults, one launch each: a dead rank is named within 60 s, a hung rank hits the
process-group timeout, and with max_restarts the job resumes from its last atomic
checkpoint, losing only the steps since it."""
import time

import pytest

from labkit.dist import LaunchError, launch


def test_killed_rank_is_named_quickly():
    start = time.perf_counter()
    with pytest.raises(LaunchError) as e:
        launch("selftest", {"steps": 4, "fault": {"rank": 1, "step": 2, "kind": "die"}},
               nproc=2, timeout=30)
    assert time.perf_counter() - start < 60
    assert e.value.rank == 1 and "SIGKILL" in str(e.value)


def test_hung_rank_hits_the_process_group_timeout():
    start = time.perf_counter()
    with pytest.raises(LaunchError) as e:
        launch("selftest", {"steps": 4, "fault": {"rank": 1, "step": 2, "kind": "hang"}},
               nproc=2, timeout=5)
    assert time.perf_counter() - start < 60
    assert "timeout 5 s hit" in str(e.value) and e.value.rank == 0  # the rank left waiting


def test_restart_resumes_from_the_last_checkpoint(tmp_path):
    # rank 1 dies at step 5 of the first attempt; checkpoints every 3 steps
    r = launch("ddp", {"steps": 8, "checkpoint_every": 3, "check": False,
                       "fault": {"rank": 1, "step": 5, "kind": "die"}},
               nproc=2, timeout=30, max_restarts=2, run_dir=tmp_path)
    assert r.result["restarts"] >= 1
    resumes = [e for e in r.events if e["event"] == "resume"]
    assert {e["rank"] for e in resumes} == {0, 1} and all(e["step"] == 3 for e in resumes)
    for x in r.result["ranks"]:
        assert (x["start_step"], x["final_step"]) == (3, 8)  # lost steps 4-5 only
        assert len(x["losses"]) == 5
    # the replicas are still identical after the resume
    assert r.result["ranks"][0]["weights_checksum"] == r.result["ranks"][1]["weights_checksum"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no half-written checkpoint left
