import math
import warnings

import pytest
from peak_fields import assert_peak_fields


@pytest.fixture(scope="module")
def result():
    from labkit.benchmarks import sparsity as B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return B.run(quick=True)


def test_contract_structure(result):
    assert result["name"] == "sparsity"
    assert {"torch", "threads", "cpu"} <= set(result["env"])
    assert result["rows"] and result["targets"]
    for t in result["targets"]:
        assert set(t) == {"target", "measured", "required", "unit", "met", "note"}
        assert t["unit"] == "x" and math.isfinite(t["measured"]) and t["measured"] > 0
        assert t["met"] == (t["measured"] >= t["required"]) or "memory" in t["target"]
        assert "quick mode" in t["note"]
    names = " ".join(t["target"] for t in result["targets"])
    for key in ("compacted FFN", "bsr", "block-gathered-dense", "never below 0.95x", "memory"):
        assert key in names


def test_sweep_rows_are_sane(result):
    sweep = [r for r in result["rows"] if r["table"] == "sweep"]
    assert {r["path"] for r in sweep} >= {"dense", "csr", "bsr", "block-gathered-dense",
                                         "compacted-dense", "nm-simulated"}
    for r in sweep:
        assert r["median_ms"] > 0 and r["bytes"] > 0
        # against the machine's fp32 peak, on the FLOPs the path really does (2 T nnz)
        assert_peak_fields(r, 1e9 * r["gflops_useful"] * r["median_ms"] * 1e-3,
                           with_speedup=r["path"] != "dense" and r["speed_measured"])
        if r["path"] == "dense":
            assert r["bytes_vs_dense"] == 1.0 and r["speedup"] == pytest.approx(1.0)
        if r["path"] == "nm-simulated":
            assert r["speedup"] is None and not r["speed_measured"]
            assert "not measured" in r["note"]
        if r["path"] == "csr" and r["sparsity"] >= 0.9:
            assert r["bytes_vs_dense"] < 0.5  # indices counted, still smaller
    be = [r for r in result["rows"] if r["table"] == "break_even"]
    assert {r["path"] for r in be} == {"csr", "bsr", "block-gathered-dense", "compacted-dense",
                                       "nm-simulated"}
    for r in be:
        assert r["break_even_sparsity"] is None or 0 <= r["break_even_sparsity"] < 1


def test_memory_row_counts_indices(result):
    mem = next(r for r in result["rows"] if r["table"] == "target_memory")
    assert mem["csr_total_int64"] == mem["csr_values"] + mem["csr_index_int64"]
    assert mem["csr_total_int32"] < mem["csr_total_int64"] < mem["dense_bytes"]
