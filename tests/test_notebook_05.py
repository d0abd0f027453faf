import math

import pytest

NAME = "05_sparse_structures_benchmark"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _rows(res, table):
    return [r for r in res["rows"] if r["table"] == table]


def test_sweep_covers_every_structure_and_path(res):
    sweep = _rows(res, "sweep")
    paths = {(r["structure"], r["path"]) for r in sweep}
    assert paths >= {("dense", "dense"), ("unstructured", "csr"), ("block", "bsr"),
                     ("block", "block-gathered-dense"), ("row", "compacted-dense"),
                     ("nm", "nm-simulated")}
    shapes = res["params"]["shapes"].split(",")
    assert {r["shape"] for r in sweep} == set(shapes)
    for r in sweep:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] + 1e-12 and r["median_ms"] > 0
        assert r["gflops_effective"] > 0 and r["bytes"] > 0
        if r["speed_measured"]:
            assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        else:  # N:M on a CPU: simulated, and it says so
            assert r["path"] == "nm-simulated" and r["speedup"] is None
            assert "not measured" in r["note"]


def test_bytes_count_indices(res):
    sweep = _rows(res, "sweep")
    for r in sweep:
        if r["path"] == "dense":
            assert r["bytes_vs_dense"] == 1.0
        if r["path"] == "csr":  # 4 B value + 8 B int64 column index per non-zero, + row ptrs
            nnz = round((1 - r["sparsity"]) * r["d_out"] * r["d_in"])
            assert r["bytes"] == pytest.approx(12 * nnz + 8 * (r["d_out"] + 1), rel=1e-3)
        if r["path"] == "compacted-dense":
            assert r["bytes_vs_dense"] < 1.0


def test_break_even_and_figure(res):
    be = _rows(res, "break_even")
    assert {r["path"] for r in be} >= {"csr", "bsr", "compacted-dense", "nm-simulated"}
    for r in be:
        assert r["break_even_sparsity"] is None or 0.0 <= r["break_even_sparsity"] < 1.0
    assert next(r for r in be if r["path"] == "nm-simulated")["break_even_sparsity"] is None
    fig = _rows(res, "figure")
    lines = {r["line"] for r in fig}
    assert "dense" in lines and len(lines) == 1 + len(res["params"]["fig_lines"].split(","))
    spars = {float(s) for s in res["params"]["fig_sparsities"].split(",")}
    assert {r["sparsity"] for r in fig} == spars
    for r in fig:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] + 1e-12
        if r["structure"] == "nm":
            assert not r["speed_measured"] and "not measured" in r["note"]


@pytest.mark.parametrize("param,value,shown,allowed", [
    ("sparsities", "0.5,1.0", 1.0, "[0.0, 1.0)"),
    ("structures", "unstructured,diagonal", "diagonal", "nm"),
    ("block", 48, 48, "divisor"), ("fig_preset", "huge", "huge", "'tiny'")])
def test_bad_parameter_fails_naming_it(run_notebook, param, value, shown, allowed):
    """``shown``: the bad value the error names (the bad item of a list parameter)."""
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **{param: value})
    assert f"{param}={shown!r}" in str(e.value) and allowed in str(e.value)


def test_headline_names_claim_first_and_exist(res):
    from labkit.labs.structures import HEADLINE

    assert res["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    m = res["metrics"]
    assert set(HEADLINE) <= set(m)
    # the paper's claim first: the best measured line's time at the highest figure sparsity
    # over its time at the lowest, recomputed from the figure's rows
    fig = [r for r in _rows(res, "figure") if r["line"] == m["fig_time_ratio_best_line"]]
    by = {r["sparsity"]: r["median_ms"] for r in fig}
    assert m["fig_time_ratio_best"] == pytest.approx(by[max(by)] / by[min(by)])
    assert m["nm_speed_measured"] is False
