"""Notebook 11, the compression planner, on its fast parameters: the search runs end to end,
the metrics the report and the independent checks read are there and mean what they say."""
import pytest

from labkit.report import NotebookFailed

NAMES = ("chosen_speedup", "best_single_speedup", "chosen_bytes_ratio", "chosen_accuracy_drop",
         "dense_accuracy", "search_seconds", "candidates")


def test_planner_notebook_writes_its_report_names(run_notebook):
    r = run_notebook("11_compression_planner")
    m = r["metrics"]
    for name in NAMES:
        assert name in m, name
    assert m["candidates"] >= 3 and m["search_seconds"] > 0
    assert 0.0 <= m["dense_accuracy"] <= 1.0 and m["chosen_bytes_ratio"] > 0
    assert r["headline"][0] == "claimed_flops_ratio"
    rungs = {row["rung"] for row in r["rows"]}
    assert rungs == set(range(r["params"]["rungs"] + 1))  # screened, then recovered
    # every row is measured against dense in the same rounds
    assert all(row["dense_latency_ms"] > 0 and row["speedup"] > 0 for row in r["rows"])


@pytest.mark.parametrize("param,value,allowed", [("budget", -1.0, "budget"),
                                                 ("objective", "energy", "objective"),
                                                 ("search_minutes", 0.0, "search_minutes"),
                                                 ("families", "blocks,magic", "families")])
def test_bad_parameters_fail_in_the_first_cells(run_notebook, param, value, allowed):
    with pytest.raises(NotebookFailed, match=allowed):
        run_notebook("11_compression_planner", **{param: value})


def test_the_chosen_model_is_saved_and_never_clobbers(run_notebook, tmp_path):
    import labkit

    target = tmp_path / "chosen"
    run_notebook("11_compression_planner", save=str(target))
    model = labkit.load(target)
    assert model.cfg.kind == "encoder" and (target / "recipe.json").is_file()
    with pytest.raises(NotebookFailed, match="does not exist yet"):
        run_notebook("11_compression_planner", save=str(target), seed=1)
