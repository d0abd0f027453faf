import pytest
from conftest import requires_minilm

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
    # the whole-model FLOP claim is exact; the speedup carries its verdict
    assert m["claimed_flops_ratio"] == pytest.approx(m["measured_flops_ratio"], rel=1e-12)
    assert m["threads"] == r["params"]["threads"] == 1
    if m["measured_speedup"] > 1.1 * m["measured_flops_ratio"]:
        assert m["speedup_verdict"].startswith("noise")
    assert m["speedup_verdict"] == "measured" or m["speedup_verdict"].startswith("noise")


def test_tour_rejects_rank_above_dimension(run_notebook):
    with pytest.raises(NotebookFailed, match=r"rank=999 .*min\(d_model, d_ff\)"):
        run_notebook("00_tour", rank=999)


def test_tour_starts_from_the_trained_baseline(run_notebook):
    m = run_notebook("00_tour")["metrics"]
    assert m["model"] == "tiny" and m["baseline_steps"] == 30  # the fast parameters
    # the dense copy before fine-tuning IS the cached baseline, on the same eval rows
    assert m["dense_before_accuracy"] == pytest.approx(m["baseline_accuracy"])
    assert 0.0 <= m["factorized_before_accuracy"] <= 1.0


def test_tour_headline_is_written(run_notebook):
    from labkit.labs.ffn import TOUR_HEADLINE

    r = run_notebook("00_tour")
    # nb.finish raises on a missing name; the report's index shows exactly these, in order
    assert r["headline"] == list(TOUR_HEADLINE) and 3 <= len(TOUR_HEADLINE) <= 5
    assert all(name in r["metrics"] for name in r["headline"])
    assert r["headline"][0].startswith("claimed_")


def test_tour_rejects_a_bad_vocab_size(run_notebook):
    with pytest.raises(NotebookFailed, match=r"vocab_size=3 .*\[7, 1000000\]"):
        run_notebook("00_tour", vocab_size=3)


@requires_minilm
def test_tour_on_minilm(run_notebook):
    """model="minilm": the SVD-factorized FFN applied to the pretrained backbone (tiny step
    counts: a real fine-tune is too slow for a test)."""
    r = run_notebook("00_tour", model="minilm", lr=1e-4, baseline_steps=2, steps=2,
                     n_train=24, n_eval=16, batch_size=8, max_len=32, rank=32, rounds=2)
    m = r["metrics"]
    assert m["model"] == "minilm" and m["baseline_steps"] == 2
    assert m["dense_before_accuracy"] == pytest.approx(m["baseline_accuracy"])
    # MiniLM: d=384, d_ff=1536; rank 32 keeps 2*32*(384+1536) of 2*384*1536 FFN weights
    assert m["claimed_ffn_flops_ratio"] == pytest.approx(384 * 1536 / (32 * (384 + 1536)))
    assert m["claimed_params_ratio"] == pytest.approx(m["measured_params_ratio"], rel=1e-9)
    assert 0.0 <= m["factorized_before_accuracy"] <= 1.0
