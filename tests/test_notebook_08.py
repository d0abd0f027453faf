import pytest

NAME = "08_layerdrop_and_early_exit"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _rows(res, table):
    return [r for r in res["rows"] if r["table"] == table]


def test_layerdrop_model_degrades_less_when_pruned(res):
    prune = _rows(res, "prune")
    counts = sorted({int(s) for s in res["params"]["kept_counts"].split(",")})
    assert {(r["model"], r["blocks_kept"]) for r in prune} == {
        (m, k) for m in ("no LayerDrop", "LayerDrop") for k in counts}
    m = res["metrics"]
    # the paper's point: pruning hurts the LayerDrop-trained model less
    assert m["layerdrop_pruned_loss"] - m["layerdrop_full_loss"] < \
        m["plain_pruned_loss"] - m["plain_full_loss"]
    by_k = {r["blocks_kept"]: r for r in prune if r["model"] == "LayerDrop"}
    assert by_k[min(counts)]["params"] < by_k[max(counts)]["params"]
    assert len(by_k[min(counts)]["kept"]) == min(counts)
    assert all(r["latency_ms"] > 0 for r in prune)


def test_measured_exits_agree_with_the_simulation(res):
    exits = _rows(res, "exits")
    qs = [float(s) for s in res["params"]["qs"].split(",")]
    assert {(r["q"], r["calibrated"]) for r in exits} == {(q, c) for q in qs
                                                         for c in (True, False)}
    n = res["params"]["sdn_layers"]
    for r in exits:
        assert r["measured_blocks"] == pytest.approx(r["blocks"])
        assert r["measured_accuracy"] == pytest.approx(r["accuracy"], abs=1e-6)
        assert 1 <= r["blocks"] <= n
    for c in (True, False):  # a higher threshold never exits earlier
        blocks = [r["blocks"] for r in sorted(exits, key=lambda r: r["q"])
                  if r["calibrated"] == c]
        assert blocks == sorted(blocks)


def test_calibration_and_latency_rows(res):
    cal = _rows(res, "calibration")
    assert len(cal) == res["params"]["sdn_layers"]
    assert all(r["temperature"] > 0 and 0 <= r["ece_after"] <= 1 for r in cal)
    m = res["metrics"]
    assert m["ece_after_mean"] <= m["ece_before_mean"] + 0.02
    lat = _rows(res, "exit_latency")
    assert {r["scope"] for r in lat} == {"batch", "batch 1"}
    assert all(r["latency_ms"] > 0 and r["speedup"] > 0 for r in lat)
    if m["best_q"] is not None:
        assert m["blocks_ratio"] == pytest.approx(res["params"]["sdn_layers"]
                                                  / m["best_q_blocks"])
        assert m["exit_accuracy_loss"] == pytest.approx(m["full_accuracy"]
                                                        - m["best_q_accuracy"], abs=1e-6)


def test_exit_threshold_chosen_on_calibration_rows_and_judged(res):
    (choice,) = _rows(res, "exit_choice")
    m = res["metrics"]
    assert choice["calib_rows"] == choice["test_rows"] == 250
    assert m["exit_verdict"] == choice["verdict"] in ("met", "not met", "inconclusive")
    gain = m["full_accuracy"] - m["first_exit_accuracy"]
    assert m["depth_gain"] == pytest.approx(gain)
    if not gain > 2 * m["depth_gain_se"]:
        assert m["exit_verdict"] == "inconclusive"
    if m["exit_verdict"] == "met":
        assert m["blocks_ratio"] >= 1.5 and m["exit_accuracy_loss"] <= 0.01
    if choice["q"] is not None:  # the threshold kept accuracy on the calibration rows
        assert choice["calib_accuracy"] >= choice["calib_full_accuracy"] - 0.01
        assert choice["q"] in [float(q) for q in res["params"]["qs"].split(",")]


def test_default_sdn_needs_depth_and_early_exit_is_judged_met(run_notebook):
    """The default SDN budget (sdn_steps) on the pointer task: the final head beats the
    first exit by more than two standard errors, per hop count, and early exit is met."""
    res = run_notebook(NAME, sdn_steps=1500)
    m = res["metrics"]
    assert m["depth_gain"] > 2 * m["depth_gain_se"] and m["depth_gain"] > 0.1
    per = _rows(res, "per_exit")
    assert per[-1]["hop1 accuracy"] > per[0]["hop1 accuracy"] + 0.1
    assert per[-1]["hop2 accuracy"] > per[0]["hop2 accuracy"] + 0.1
    assert m["exit_verdict"] == "met", m["exit_why"]


@pytest.mark.parametrize("param,value,allowed", [
    ("layerdrop_p", 1.0, "[0.0, 1.0)"), ("blocks_kept", 0, "[1, 8]"),
    ("blocks_kept", 9, "[1, 8]"), ("q", 0.0, "(0.0, 1.0]"), ("q", 1.5, "(0.0, 1.0]"),
    ("kept_counts", "8,9", "[1, 8]"), ("kept_counts", "", "a non-empty comma-separated list"),
    ("qs", "0.5,x", "comma-separated numbers"), ("qs", "0.5,1.5", "(0.0, 1.0]")])
def test_bad_parameter_fails_naming_it(run_notebook, param, value, allowed):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **{param: value})
    msg = str(e.value)
    assert allowed in msg and (f"{param}={value!r}" in msg or f"{param}=9" in msg
                               or f"{param}=1.5" in msg)


def test_headline_claimed_vs_measured_first(res):
    from labkit.labs.depth_summary import HEADLINE_08

    assert res["headline"] == list(HEADLINE_08) and 3 <= len(HEADLINE_08) <= 5
    m = res["metrics"]
    assert m["pruned_speedup_claimed"] == res["params"]["n_layers"] / m["min_blocks_kept"]
    assert all(name in m for name in res["headline"])
