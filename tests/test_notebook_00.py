import pytest

from labkit.report import NotebookFailed


def test_tour_claimed_matches_counted_and_measures(run_notebook):
    r = run_notebook("00_tour")
    m = r["metrics"]
    # the analytic parameter saving is exactly what was counted in the built model
    assert m["claimed_params_ratio"] == pytest.approx(m["measured_params_ratio"], rel=1e-9)
    assert m["claimed_ffn_flops_ratio"] > m["measured_flops_ratio"] > 1.0  # FFN is part of it
    assert m["dense_latency_ms"] > 0 and m["factorized_latency_ms"] > 0
    assert 0.0 <= m["dense_accuracy"] <= 1.0
    assert {row["variant"] for row in r["rows"]} == {"dense", f"rank {r['params']['rank']}"}
    # the whole-model FLOP claim is exact; the speedup carries its verdict (issue 10.8)
    assert m["claimed_flops_ratio"] == pytest.approx(m["measured_flops_ratio"], rel=1e-12)
    assert m["threads"] == r["params"]["threads"] == 1
    if m["measured_speedup"] > 1.1 * m["measured_flops_ratio"]:
        assert m["speedup_verdict"].startswith("noise")
    assert m["speedup_verdict"] == "measured" or m["speedup_verdict"].startswith("noise")


def test_tour_rejects_rank_above_dimension(run_notebook):
    with pytest.raises(NotebookFailed, match=r"rank=999 .*min\(d_model, d_ff\)"):
        run_notebook("00_tour", rank=999)
