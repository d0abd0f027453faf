import pytest

from labkit.benchmarks import depth


@pytest.fixture(scope="module")
def out():
    return depth.run(quick=True)


def test_structure_and_targets(out):
    assert out["name"] == "depth" and out["quick"] is True
    ee, cq = out["targets"]
    for t in (ee, cq):
        assert {"target", "measured", "required", "unit", "met", "note"} <= set(t)
    assert ee["required"] == 1.5 and cq["required"] == 0.2
    if ee["measured"] is not None:
        assert ee["met"] == (ee["measured"] >= 1.5)
    assert cq["met"] == (cq["measured"] >= 0.2)
    assert "ideal 0.25" in cq["note"] and "all-reduce" in cq["note"]


def test_rows_are_measured(out):
    exits = [r for r in out["rows"] if r["part"] == "early_exit"]
    assert exits and all(r["measured_blocks"] == pytest.approx(r["blocks"]) for r in exits)
    lat = [r for r in out["rows"] if r["part"] == "early_exit_latency"]
    assert {r["scope"] for r in lat} <= {"batch", "batch 1"}
    assert all(r["latency_ms"] > 0 for r in lat)
    (c,) = [r for r in out["rows"] if r["part"] == "cqil"]
    assert c["P"] == 2 and c["start"] == 4 and c["end"] == 8 and c["ideal_cut"] == 0.25
    assert c["cqil_ms"] > 0 and c["allreduce_ms"] > 0
    best_seq = min(c["seq_1thread_ms"], c["seq_2threads_ms"])
    assert c["latency_cut_min"] <= c["latency_cut"] <= c["latency_cut_max"]
    assert best_seq > 0


def test_cli_lists_depth():
    from labkit.cli import benchmark_names

    assert "depth" in benchmark_names()
