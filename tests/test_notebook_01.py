"""Notebook 01 (Linformer) with its fast parameters; metrics asserted, not just present."""
import itertools
import math

import pytest
from conftest import assert_headline, assert_minilm_swap_cost, requires_minilm

NAME = "01_low_rank_attention"


@pytest.fixture(scope="module")
def result(run_notebook):
    return run_notebook(NAME)


def test_claimed_matches_counted(result):
    m = result["metrics"]
    assert m["claimed_params_delta"] == m["counted_params_delta"] > 0
    assert m["claimed_flops_delta"] == m["counted_flops_delta"] < 0
    k, n = result["params"]["k"], 64  # fast params keep max_len=64
    assert m["claimed_attention_flops_ratio"] == pytest.approx(2 * k / n)


def test_training_ran_at_equal_steps(result):
    m = result["metrics"]
    train = [r for r in result["rows"] if r["section"] == "train"]
    assert {r["variant"] for r in train} == {"dense", f"linformer k={result['params']['k']}"}
    assert all(r["steps"] == result["params"]["steps"] for r in train)
    for key in ("dense_train_loss_last", "linformer_train_loss_last", "dense_eval_loss",
                "linformer_eval_loss"):
        assert math.isfinite(m[key]) and 0 < m[key] < 5  # 3 classes: chance is ln 3
    assert 0 <= m["linformer_eval_accuracy"] <= 1


def test_finetuning_starts_from_the_trained_baseline(result):
    m = result["metrics"]
    assert m["baseline_steps"] == result["params"]["baseline_steps"]
    # the dense copy before fine-tuning IS the baseline, on the same eval examples
    assert m["dense_before_eval_loss"] == pytest.approx(m["baseline_eval_loss"], rel=1e-5)
    assert m["dense_before_eval_accuracy"] == pytest.approx(m["baseline_eval_accuracy"])
    for key in ("linformer_before_eval_loss", "dense_before_eval_loss"):
        assert math.isfinite(m[key]) and 0 < m[key] < 5
    assert 0 <= m["linformer_before_eval_accuracy"] <= 1
    train = [r for r in result["rows"] if r["section"] == "train"]
    assert all("before_eval_accuracy" in r for r in train)


def test_spectrum_analysis(result):
    m = result["metrics"]
    assert m["analysis_model"] == "trained"
    assert 1 <= m["rank90_layer0"] <= m["mean_length"] + 1
    # Eckart-Young: truncated SVD is the best rank-k approximation
    assert m["svd_error_at_k"] <= m["random_subspace_error_at_k"] + 1e-9
    assert m["svd_error_at_k"] <= m["linformer_jl_error_at_k"] + 1e-9
    err = [r for r in result["rows"] if r["section"] == "rank_error" and r["method"] == "svd"
           and r["layer"] == 0]
    errs = [r["rel_error"] for r in sorted(err, key=lambda r: r["k"])]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errs))


def test_latency_sweep(result):
    m = result["metrics"]
    lat = [r for r in result["rows"] if r["section"] == "latency"]
    ns = sorted({r["n"] for r in lat})
    assert ns[-1] == result["params"]["seq_max"] == m["bench_n_max"]
    assert {r["method"] for r in lat} >= {"sdpa", "linformer", "linformer-core"}
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in lat)
    assert m["speedup_at_n_max"] > 0 and m["claimed_speedup_at_n_max"] == \
        pytest.approx(m["bench_n_max"] / (2 * result["params"]["bench_k"]))
    assert m["crossover_n"] is None or m["crossover_n"] in ns
    assert m["threads"] == result["params"]["threads"]


def test_bad_parameter_is_named(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match="k=0"):
        run_notebook(NAME, k=0)
    with pytest.raises(NotebookFailed, match="share"):
        run_notebook(NAME, share="headwise")


def test_headline_is_written_and_present(result):
    from labkit.labs.attention import LINFORMER_HEADLINE

    assert_headline(result, LINFORMER_HEADLINE)


def test_bad_vocab_size_is_named(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match=r"vocab_size=3 .*\[7, 1000000\]"):
        run_notebook(NAME, vocab_size=3)


@requires_minilm
def test_minilm_backbone_shows_the_swap_cost(run_notebook):
    assert_minilm_swap_cost(run_notebook, NAME, "linformer", k=8)
