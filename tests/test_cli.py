"""labkit.cli: errors exit 2 with ``labkit: error:``, run/report/bench outputs."""
from __future__ import annotations

import json

import pytest
from test_report import make_notebook  # tests/ is on sys.path (rootdir imports)

from labkit import cli


@pytest.fixture
def notebooks(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    make_notebook(folder, "01_tiny", {"n": 3})
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    return folder


def main(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


@pytest.mark.parametrize(("text", "value"), [
    ("32", 32), ("0.5", 0.5), ("true", True), ("True", True), ("false", False),
    ('"elu"', "elu"), ("elu", "elu"), ("[1, 2]", [1, 2]), ("null", None), ("1e-3", 1e-3)])
def test_parse_value(text, value):
    assert cli.parse_value(text) == value


def test_bench_unknown_name_lists_allowed(capsys):
    assert main(["bench", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit: error: bench='nosuch'")
    assert "'overhead'" in err and "Traceback" not in err
    assert "overhead" in cli.benchmark_names() and "__init__" not in cli.benchmark_names()


def test_run_unknown_parameter_exits_2_naming_it(notebooks, tmp_path, capsys):
    assert main(["run", "01", "-p", "rnak", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "labkit: error: rnak=4" in err and "n, scale, interactive, out" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_run_unknown_notebook_and_profile(notebooks, tmp_path, capsys):
    assert main(["run", "07", "--out", str(tmp_path)]) == 2
    assert "labkit: error: notebook='07'" in capsys.readouterr().err
    assert main(["report", "--profile", "slow", "--out", str(tmp_path)]) == 2
    assert "profile='slow'" in capsys.readouterr().err


def test_run_bad_value_fails_with_the_notebooks_message(notebooks, tmp_path, capsys):
    code = main(["run", "01_tiny", "-p", "n", "0", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2
    assert ("labkit: error: 01_tiny: LabkitConfigError: n=0 is not allowed: "
            "expected an integer in [1, 100]") in err
    assert "Traceback" not in err and "no report folder was written" in err
    assert not (tmp_path / "out").exists()  # nothing ran: no report folder is left


def test_out_pointing_at_a_file_exits_2(notebooks, tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    assert main(["report", "01", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit: error: out=") and "is a file" in err
    assert "Traceback" not in err and (tmp_path / "f").read_text() == "keep me"


def test_bad_local_data_folder_exits_2_naming_file_and_row(tmp_path, capsys, monkeypatch):
    """A notebook given a folder with a label out of range fails in its data cell, before
    any training: exit 2, the file and row named, no report folder left."""
    import json as _json

    import nbformat

    folder = tmp_path / "glue"
    folder.mkdir()
    rows = [{"premise": "a", "hypothesis": "b", "label": 0},
            {"premise": "c", "hypothesis": "d", "label": 7}]
    for split in ("train", "validation_matched"):
        (folder / f"{split}.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell('source: str = ""\ninteractive: bool = True\nout: str = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from labkit import data\ndata.load_task('mnli', source=source)")]
    nbformat.write(nb, str(nbs / "01_data.ipynb"))
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(nbs))
    assert main(["run", "01", "-p", "source", str(folder), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "labkit: error: 01_data: LabkitConfigError:" in err
    assert "train.jsonl row 2 column 'label'=7 is not allowed" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_run_with_parameters_writes_a_report(notebooks, tmp_path, capsys):
    assert main(["run", "01", "-p", "n", "2", "-p", "scale", "1.5",
                 "--out", str(tmp_path / "out")]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    rows = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    assert {r["metric"]: r["value"] for r in rows if r["kind"] == "metric"} == \
        {"total": 3.0, "n": 2}
    assert "01_tiny: ok" in capsys.readouterr().out


def test_bench_overhead_quick_json(capsys, tmp_path):
    assert main(["bench", "overhead", "--quick", "--json", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    (saved,) = tmp_path.glob("bench-overhead-*.json")  # the same result, with when and load
    record = json.loads(saved.read_text())
    assert record["result"] == json.loads(json.dumps(res)) and record["quick"] is True
    assert len(record["load_average"]) == 2 and record["date"].endswith("Z")
    assert res["name"] == "overhead" and res["env"]["torch"]
    variants = {r["variant"]: r for r in res["rows"]}
    assert set(variants) == {"plain", "noop", "liveboard", "liveboard_live"}
    assert variants["plain"]["ratio_vs_plain"] == 1.0
    assert all(r["ms_per_step"] > 0 for r in res["rows"])
    assert variants["liveboard_live"]["points"] > 2000  # the long history plus this run
    assert len(res["targets"]) == 3
    for t in res["targets"]:
        assert set(t) >= {"target", "measured", "required", "unit", "met", "note"}
        assert t["unit"] == "x" and t["required"] == 1.05 and t["measured"] > 0
        assert t["met"] == (t["measured"] <= t["required"])


def test_lab_passes_unknown_arguments_to_jupyterlab(notebooks, monkeypatch):
    calls = []
    monkeypatch.setattr("labkit.jupyterlab_app.lab",
                        lambda folder, extra: calls.append((folder, extra)) or 0)
    assert main(["lab", "--no-browser", "--port", "8890"]) == 0
    assert calls == [(notebooks, ["--no-browser", "--port", "8890"])]
    assert main(["bench", "overhead", "--no-browser"]) == 2  # only `lab` passes arguments on


def test_bench_results_are_never_overwritten_and_the_report_shows_the_newest(tmp_path):
    from labkit import report as R
    from labkit import report_html as H

    old = {"name": "x", "rows": [], "targets": [{"target": "t", "measured": 1.0,
                                                   "required": 2.0, "unit": "x", "met": False,
                                                   "note": "old"}]}
    new = {**old, "targets": [{**old["targets"][0], "measured": 3.0, "met": True,
                               "note": "new"}]}
    a = cli.save_result(old, "x", tmp_path, load=([0.5, 0.4, 0.3], [0.6, 0.5, 0.3]))
    b = cli.save_result(new, "x", tmp_path)
    assert a != b and a.is_file() and b.is_file()  # same second: a second file
    (latest,) = R.latest_benchmarks(tmp_path)
    assert latest["file"] == b.name and latest["result"]["targets"][0]["note"] == "new"
    page = H.benchmarks_html([latest])
    assert "met" in page and "new" in page and "old" not in page
    (tmp_path / "bench-broken-1.json").write_text("{")
    with pytest.warns(UserWarning, match="not JSON"):
        assert len(R.latest_benchmarks(tmp_path)) == 1
    with pytest.raises(Exception, match="bench_dir"):
        R.latest_benchmarks(tmp_path / "missing")


def test_plan_command_searches_saves_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    import toy

    from labkit import classifiers as CL

    teacher = toy.teacher()

    class Clf:
        model, workload = teacher, toy.workload(teacher.cfg)
        task = type("T", (), {"tokenizer": None})()

    monkeypatch.setattr(CL, "classifier", lambda *a, **k: Clf)
    out, target = tmp_path / "out", tmp_path / "chosen"
    assert main(["plan", "--families", "blocks,int8", "--minutes", "0.5", "--out", str(out),
                 "--save", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "chosen" in printed or "dense:" in printed
    (summary,) = out.glob("plan-*.json")
    assert json.loads(summary.read_text())["metrics"]["candidates"] >= 2
    assert (target / "recipe.json").is_file() or "no candidate" in printed
    # the save folder exists now: refused before any search
    assert main(["plan", "--minutes", "0.5", "--out", str(out), "--save", str(target)]) == 2
    assert "does not exist yet" in capsys.readouterr().err
    assert main(["plan", "--budget", "-1", "--out", str(out)]) == 2
    assert "budget" in capsys.readouterr().err
