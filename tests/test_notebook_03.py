import math

import pytest
from conftest import requires_minilm

NAME = "03_factorized_ffn_and_sharing"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _section(res, name):
    return [r for r in res["rows"] if r["section"] == name]


def test_claimed_equals_counted(res):
    m = res["metrics"]
    assert m["params_claimed_equals_counted"] is True
    assert m["bytes_claimed_equals_counted"] is True
    assert m["flops_claimed_equals_counted"] is True
    for r in _section(res, "claimed_vs_measured"):
        assert r["params_claimed"] == r["params_counted"]
        assert r["flops_claimed"] == r["flops_counted"]


def test_parameters_shrink_as_claimed(res):
    m = res["metrics"]
    assert m["fact_params"] < m["dense_params"] and m["share_params"] < m["dense_params"]
    assert m["both_params"] < min(m["fact_params"], m["share_params"])
    for k in ("fact", "share", "both"):
        assert m[f"{k}_params_ratio_claimed"] == pytest.approx(m["dense_params"] / m[f"{k}_params"])
    # sharing leaves the compute alone; factorizing cuts it, less than the FFN-only ratio
    assert m["share_flops_ratio_counted"] == 1.0
    assert 1.0 < m["fact_flops_ratio_counted"] < m["fact_ffn_flops_ratio_claimed"]
    assert m["threads"] == 1


def test_every_variant_trained(res):
    m = res["metrics"]
    train = _section(res, "train")
    assert len(train) == 4
    for r in train:
        assert r["steps"] == res["params"]["steps"]
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] < r["train_loss_first"]
    for k in ("dense", "fact", "share", "both"):
        assert math.isfinite(m[f"{k}_eval_loss"])


def test_svd_truncation(res):
    m = res["metrics"]
    assert m["svd_full_rank_loss_gap"] < 1e-3  # full rank reproduces the dense model
    assert m["svd_weight_error_monotone"] is True
    svd = [r for r in _section(res, "svd") if r["rank"] != "dense"]
    errors = [r["weight_error"] for r in sorted(svd, key=lambda r: int(r["rank"]))]
    assert errors[-1] < 1e-5 and errors[0] > errors[-1]
    assert 0 < m["svd_weight_error_at_rank"] < 1
    assert 1 <= m["rank_for_90pct_energy_mean"] <= 64


def test_size_sweep(res):
    size = _section(res, "size")
    assert {r["variant"] for r in size} == {"dense", "factorized", "shared"}
    dense = {r["size"]: r for r in size if r["variant"] == "dense"}
    for r in size:
        assert r["params"] == r["params_claimed"] and r["latency_ms"] > 0
        if r["variant"] == "shared":
            assert r["flops"] == dense[r["size"]]["flops"]
            assert r["weight_bytes"] < dense[r["size"]]["weight_bytes"]
        if r["variant"] == "factorized":
            assert r["flops"] < dense[r["size"]]["flops"]
    assert res["metrics"]["largest_fact_bytes_ratio"] > 1
    assert res["metrics"]["largest_share_bytes_ratio"] > 1


def test_svd_init_and_attention_sharing(run_notebook):
    res = run_notebook(NAME, init="svd", sharing="attn", rank=16)
    m = res["metrics"]
    assert m["params_claimed_equals_counted"] is True
    # compress-then-fine-tune starts from the trained dense model
    train = {r["variant"]: r for r in _section(res, "train")}
    assert train["factorized r=16"]["train_loss_first"] < train["dense"]["train_loss_first"]
    assert m["share_params"] < m["dense_params"] and m["share_flops_ratio_counted"] == 1.0


@pytest.mark.parametrize("param,value,allowed", [
    ("rank", 1000, "[1, 64]"), ("sharing", "both", "'attn', 'ffn'")])
def test_bad_parameter_fails_naming_it(run_notebook, param, value, allowed):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **{param: value})
    assert f"{param}={value!r}" in str(e.value) and allowed in str(e.value)


def test_encoder_on_synthetic_nli(run_notebook):
    res = run_notebook(NAME, task="nli")
    m = res["metrics"]
    assert m["params_claimed_equals_counted"] is True and m["flops_claimed_equals_counted"] is True
    for k in ("dense", "fact", "share", "both"):
        assert 0.0 <= m[f"{k}_eval_accuracy"] <= 1.0  # compared at equal steps, no target
    assert m["svd_full_rank_loss_gap"] < 1e-3
    assert {r["variant"] for r in _section(res, "size")} == {"dense", "factorized", "shared"}


def test_headline_is_written(res):
    from labkit.labs.ffn import HEADLINE

    # nb.finish raises on a missing name; the report's index shows exactly these, in order
    assert res["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    assert all(name in res["metrics"] for name in res["headline"])


def test_nli_starts_from_the_trained_classifier(run_notebook):
    from labkit.labs.ffn import HEADLINE

    res = run_notebook(NAME, task="nli")
    m = res["metrics"]
    assert m["model"] == "tiny" and m["baseline_steps"] == res["params"]["baseline_steps"]
    # the dense copy before fine-tuning IS the cached baseline, on the same eval rows
    assert m["dense_before_eval_loss"] == pytest.approx(m["baseline_eval_loss"], rel=1e-5)
    # sharing swaps every layer's FFN and attention for the first one's: it costs something
    assert m["share_before_eval_loss"] != pytest.approx(m["dense_before_eval_loss"])
    assert res["headline"] == list(HEADLINE)  # the same names under both tasks


@pytest.mark.parametrize("param,value,extra", [("vocab_size", 3, {}),
                                               ("model", "minilm", {"task": "lm"}),
                                               ("baseline_steps", -1, {})])
def test_bad_backbone_parameters_are_named(run_notebook, param, value, extra):
    """A bad vocabulary size, or a MiniLM backbone asked for the LM task explicitly, fails
    naming it (model="minilm" alone takes the nli workload: task="" is the recipe's)."""
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match=f"{param}={value!r}"):
        run_notebook(NAME, **{param: value}, **extra)


@requires_minilm
def test_nli_on_minilm(run_notebook):
    """task="nli", model="minilm": factorized (SVD) and shared copies of the pretrained
    backbone (tiny step counts: a real fine-tune is too slow for a test)."""
    res = run_notebook(NAME, task="nli", model="minilm", lr=1e-4, baseline_steps=2, steps=2,
                       eval_every=2, batch_size=8, seq_len=32, n_eval=16, rank=32, init="svd")
    m = res["metrics"]
    assert m["model"] == "minilm" and m["baseline_steps"] == 2
    assert m["params_claimed_equals_counted"] is True
    assert m["flops_claimed_equals_counted"] is True
    assert m["dense_params"] > 20_000_000  # the real MiniLM, not the tiny encoder
    assert m["share_params"] < m["dense_params"] and m["fact_params"] < m["dense_params"]
    assert m["svd_full_rank_loss_gap"] < 1e-3  # full-rank SVD of MiniLM's FFN: same model
    for k in ("dense", "fact", "share", "both"):
        assert 0.0 <= m[f"{k}_eval_accuracy"] <= 1.0


def test_real_text_profile_runs_the_classifier_workload(tmp_path):
    """`labkit report --source-dir DIR`: 03 defaults to the LM, which has no real-text path;
    the profile switches it to its nli classifier workload (MiniLM, the backbone's lr)."""
    from conftest import NOTEBOOKS

    from labkit import classifiers as CL
    from labkit.report import notebook_parameters

    (tmp_path / "mnli").mkdir()
    defined = notebook_parameters(NOTEBOOKS / f"{NAME}.ipynb")
    params = CL.real_text_params(defined, str(tmp_path), None)
    assert params["model"] == "minilm" and params["source"] == str(tmp_path.resolve())
    # task="" and lr=0 resolve in the notebook: MiniLM's classifier workload and recipe
    p = CL.with_recipe({"task": "", "lr": 0.0, "seq_len": 0, **params}, "lr", "seq_len",
                       lm_task=True)
    assert p["task"] == "nli" and p["lr"] == CL.DEFAULTS["minilm"]["lr"] <= CL.MAX_LR["minilm"]
