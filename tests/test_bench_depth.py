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
    for t in (ee, cq):  # a verdict each, and a target not met says why
        assert t["verdict"] in ("met", "not met", "inconclusive")
        assert t["met"] == (t["verdict"] == "met")
        assert t["note"].startswith(t["verdict"] + ":") or t["met"]
    (choice,) = [r for r in out["rows"] if r["part"] == "early_exit_choice"]
    assert ee["verdict"] == choice["verdict"] and choice["why"] in ee["note"]
    assert choice["calib_rows"] == choice["test_rows"] == 250
    if ee["met"]:
        assert ee["measured"] >= 1.5 and choice["depth_gain"] > 2 * choice["depth_gain_se"]
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


def _cqil_row(seq_ms, allreduce_ms, cqil_ms):
    return {"P": 2, "start": 4, "end": 8, "seq_1thread_ms": seq_ms, "seq_2threads_ms": 2 * seq_ms,
            "allreduce_ms": allreduce_ms, "cqil_ms": cqil_ms}


@pytest.mark.parametrize("row,load,cores,why", [
    (_cqil_row(80.0, 0.1, 75.0), 3.5, 2, "did not get a core each (load 3.50 on 2 cores)"),
    (_cqil_row(80.0, 0.1, 75.0), 0.2, 1, "did not get a core each"),
    (_cqil_row(8.0, 1.5, 9.0), 0.2, 2, "costs as much as the block a step saves (1.000 ms)"),
    (_cqil_row(80.0, 5.0, 72.0), 0.2, 2, "the ideal cut less 2 all-reduces is 0.12"),
    (_cqil_row(80.0, 0.1, 75.0), 0.2, 2, "concurrency overhead: CQIL 75.00 ms against 60.20")])
def test_cqil_shortfall_names_the_reason(row, load, cores, why):
    from labkit.labs.depth_summary import cqil_shortfall

    assert why in cqil_shortfall(row, 8, 0.2, load, cores)
