import math

import pytest

NAME = "09_cqil_concurrent_layers"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _rows(res, table):
    return [r for r in res["rows"] if r["table"] == table]


def test_similarity_heatmaps_and_minilm(res):
    sim = _rows(res, "similarity")
    models = {r["model"] for r in sim}
    assert any(m.startswith("decoder") for m in models)
    assert any(m.startswith("encoder") for m in models)
    for r in sim:
        assert -1.0 <= r["cos(input i, input i+1)"] <= 1.0 + 1e-5
    m = res["metrics"]
    if m["minilm_adjacent_cos_mean"] is None:  # the extra is missing: said so, not hidden
        assert "pip install" in m["minilm_note"]
    else:
        assert 0.0 < m["minilm_adjacent_cos_mean"] <= 1.0


def test_distributed_equals_one_process_and_latency_is_measured(res):
    lat = _rows(res, "latency")
    assert lat, "no cross-process measurement"
    for r in lat:
        assert r["max_abs_diff_vs_one_process"] <= 1e-5
        assert r["cqil_ms"] > 0 and r["seq_1thread_ms"] > 0 and r["allreduce_ms"] > 0
        assert r["ideal_cut"] == pytest.approx((r["end"] - r["start"]) * (1 - 1 / r["P"])
                                               / res["params"]["n_layers"])
    assert res["metrics"]["max_abs_diff"] <= 1e-5


def test_quality_rows_cover_every_variant(res):
    q = _rows(res, "quality")
    start = int(res["params"]["starts"].split(",")[0])
    variants = {r["variant"] for r in q if r["start"] == start}
    assert "CQIL" in variants and "CQIL + recovery" in variants
    assert sum(v.startswith("drop") for v in variants) == 2  # from both models
    seq = next(r for r in q if r["variant"] == "sequential")
    for r in q:
        assert math.isfinite(r["eval_loss"])
        if r["variant"].startswith("drop"):
            assert len(r["keep"]) == res["params"]["n_layers"] - r["blocks_saved"]
            assert r["measured_speedup"] > 0
    cqil = next(r for r in q if r["variant"] == "CQIL" and r["start"] == start)
    assert cqil["measured_speedup"] is not None and cqil["measured_speedup"] > 0
    m = res["metrics"]
    assert m["sequential_loss"] == pytest.approx(seq["eval_loss"])
    assert m["cqil_loss"] != m["sequential_loss"]  # the group really changed the function
    assert m["recovered_loss"] is not None and math.isfinite(m["recovered_loss"])


@pytest.mark.parametrize("params,allowed", [
    ({"start": 4, "end": 4}, "less than end=4"), ({"end": 9}, "at most the number of blocks"),
    ({"P": 1}, ">= 2"), ({"start": 6, "P": 3}, "[2, end - start = 2]"), ({"D": -1}, ">= 0"),
    ({"lora_rank": 0}, "[1, 1024]"), ({"starts": "2,x"}, "comma-separated integers"),
    ({"ps": "2,9"}, "ps=9 is not allowed: expected an integer in [2, 4]"),
    ({"widths": "64,9"}, "widths=9 is not allowed: expected an integer in [32, 4096]")])
def test_bad_parameter_fails_naming_it(run_notebook, params, allowed):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **params)
    msg = str(e.value)
    assert allowed in msg
    name, value = list(params.items())[-1]
    assert f"{name}={value!r}" in msg or "start=" in msg or f"{name}=9" in msg


def test_headline_claimed_vs_measured_first(res):
    from labkit.labs.depth_summary import HEADLINE_09

    assert res["headline"] == list(HEADLINE_09) and 3 <= len(HEADLINE_09) <= 5
    assert all(res["metrics"][name] is not None for name in res["headline"])
    assert res["metrics"]["ideal_cut"] == pytest.approx(
        (res["params"]["end"] - res["params"]["start"]) * (1 - 1 / res["params"]["P"])
        / res["params"]["n_layers"])


def test_crossing_shows_where_cqil_pays(res):
    cross = _rows(res, "crossing")
    widths = sorted(int(w) for w in res["params"]["widths"].split(","))
    assert [r["d_model"] for r in cross] == widths
    for r in cross:
        assert r["block_ms"] > 0 and r["allreduce_ms"] > 0 and r["cqil_ms"] > 0
        assert r["cut_min"] <= r["measured_cut"] <= r["cut_max"]
        want = ("pays" if r["cut_min"] > 0 else "does not pay" if r["cut_max"] < 0
                else "noise: rounds straddle no change")
        assert r["verdict"] == want and (r["why"] == "") == (want == "pays")
        assert r["expected_cut"] < r["ideal_cut"]
    m = res["metrics"]
    assert m["measured_cut"] == cross[-1]["measured_cut"]
    assert m["measured_cut_d_model"] == widths[-1]
    tiny = [r for r in _rows(res, "latency") if r["start"] == res["params"]["start"]
            and r["P"] == res["params"]["P"]]
    assert m["tiny_decoder_cut"] == (tiny[0]["latency_cut"] if tiny else None)
