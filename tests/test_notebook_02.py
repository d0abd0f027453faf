"""Notebook 02 (kernel attention) with its fast parameters; metrics asserted."""
import math

import pytest
from conftest import assert_headline, assert_minilm_swap_cost, requires_minilm

NAME = "02_kernel_attention"


@pytest.fixture(scope="module")
def result(run_notebook):
    return run_notebook(NAME)


def test_claimed_matches_counted(result):
    m = result["metrics"]
    assert m["claimed_flops_delta"] == m["counted_flops_delta"]
    assert m["claimed_params_delta"] == m["counted_params_delta"] == 0
    assert m["claimed_bytes_delta"] == m["counted_bytes_delta"] > 0  # favor: feature buffers


def test_training_ran_at_equal_steps(result):
    m = result["metrics"]
    train = [r for r in result["rows"] if r["section"] == "train"]
    assert len(train) == 2 and all(r["steps"] == result["params"]["steps"] for r in train)
    for key in ("dense_train_loss_last", "kernel_train_loss_last", "kernel_eval_loss"):
        assert math.isfinite(m[key]) and 0 < m[key] < 5
    assert m["train_nonpositive_denominators"] == 0  # favor features are positive


def test_finetuning_starts_from_the_trained_baseline(result):
    m = result["metrics"]
    assert m["baseline_steps"] == result["params"]["baseline_steps"]
    # the dense copy before fine-tuning IS the baseline, on the same eval examples
    assert m["dense_before_eval_loss"] == pytest.approx(m["baseline_eval_loss"], rel=1e-5)
    assert m["dense_before_eval_accuracy"] == pytest.approx(m["baseline_eval_accuracy"])
    for key in ("kernel_before_eval_loss", "dense_before_eval_loss"):
        assert math.isfinite(m[key]) and 0 < m[key] < 5
    assert 0 <= m["kernel_before_eval_accuracy"] <= 1


def test_approximation_error_falls_with_m(result):
    m = result["metrics"]
    assert m["m_max"] > m["m_min"]
    assert m["favor_error_m_max"] < m["favor_error_m_min"]
    if m["trig_first_unstable_scale"] is not None and m["trig_first_unstable_scale"] <= 1.0:
        # the analysed q, k are already sharp enough that trig denominators hit <= 0 at their
        # own scale (the trained baseline's logits grow with training): the error is then
        # heavy-tailed and need not fall with m; the notebook must report it
        assert m["trig_nonpositive_frac_scale_1"] > 0.01
    else:
        assert m["trig_error_m_max"] < m["trig_error_m_min"]
    # sharper logits make trig denominators non-positive; favor's are positive up to float32
    # underflow at extreme scales
    assert m["favor_nonpositive_frac_scale_max"] <= m["trig_nonpositive_frac_scale_max"]
    inst = [r for r in result["rows"] if r["section"] == "instability"]
    trig = {r["scale"]: r["nonpositive_frac"] for r in inst if r["feature_map"] == "trig"}
    assert trig[max(trig)] > trig[min(trig)] and m["trig_nonpositive_frac_scale_max"] > 0.05


def test_latency_sweep(result):
    m = result["metrics"]
    lat = [r for r in result["rows"] if r["section"] == "latency"]
    assert {r["method"] for r in lat} >= {"sdpa", "kernel-favor"}
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in lat)
    assert m["speedup_at_n_max"] > 0 and m["claimed_speedup_at_n_max"] > 1
    ns = sorted({r["n"] for r in lat})
    assert m["crossover_n"] is None or m["crossover_n"] in ns


def test_bad_parameters_are_named(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match="feature_map"):
        run_notebook(NAME, feature_map="relu")
    with pytest.raises(NotebookFailed, match="num_features"):
        run_notebook(NAME, feature_map="trig", num_features=15)


def test_headline_is_written_and_present(result):
    from labkit.labs.attention import KERNEL_HEADLINE

    assert_headline(result, KERNEL_HEADLINE)


def test_bad_vocab_size_is_named(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match=r"vocab_size=3 .*\[7, 1000000\]"):
        run_notebook(NAME, vocab_size=3)


@requires_minilm
def test_minilm_backbone_shows_the_swap_cost(run_notebook):
    assert_minilm_swap_cost(run_notebook, NAME, "kernel", num_features=16)
