"""labkit.report: executing a throwaway notebook, the report folder, failures, no overwrite."""
from __future__ import annotations

import json
import re

import nbformat
import pytest

from labkit import report as R
from labkit.validate import LabkitConfigError

SPEC = ('{"n": ("int", 1, 100), "scale": ("float", 0.0, None), '
        '"interactive": ("bool",), "out": ("str",)}')


def make_notebook(path, name, fast):
    """A tiny labkit notebook: parameters cell, start, a LiveBoard plot, finish."""
    nb = nbformat.v4.new_notebook()
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3",
                                       "language": "python"},
                        "labkit": {"title": f"Tiny {name}", "fast": fast}})
    params = nbformat.v4.new_code_cell(
        'n: int = 5\nscale: float = 1.0\ninteractive: bool = True\nout: str = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {name}\nA throwaway notebook for the report tests."),
        params,
        nbformat.v4.new_code_cell(
            f"import labkit.notebook\nP = labkit.notebook.start(dict(globals()), {SPEC})"),
        nbformat.v4.new_code_cell(
            "from labkit.ui import LiveBoard\n"
            "board = LiveBoard(['loss'], title='tiny')  # live=None: static when headless\n"
            "for i in range(P['n']):\n"
            "    board.log('loss', 'train', i, 1000 + 7 * i * P['scale'])\n"
            "board.show();\n"
            "from tqdm.auto import tqdm  # a widget in a kernel: its frozen first frame\n"
            "for _ in tqdm(range(2), desc='tinybar'):\n"
            "    pass"),
        nbformat.v4.new_code_cell(
            f"labkit.notebook.finish(out, {name!r}, P, "
            "{'total': P['scale'] * P['n'], 'n': P['n']}, "
            "[{'i': i, 'twice': 2 * i} for i in range(P['n'])])"),
    ]
    nbformat.write(nb, str(path / f"{name}.ipynb"))
    return path / f"{name}.ipynb"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    nbs = tmp_path_factory.mktemp("nbs")
    make_notebook(nbs, "01_tiny", {"n": 3})
    make_notebook(nbs, "02_broken", {"n": 0})  # its fast profile fails in the first cells
    return nbs


@pytest.fixture(scope="module")
def first_report(folder, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LABKIT_NOTEBOOKS", str(folder))
    out = tmp_path_factory.mktemp("reports")
    try:
        yield R.report(out=out, profile="fast")
    finally:
        mp.undo()


def test_execute_notebook_returns_metrics_and_writes_executed(folder, tmp_path):
    res = R.execute_notebook(folder / "01_tiny.ipynb", tmp_path, {"n": 4, "scale": 0.5})
    assert res["metrics"] == {"total": 2.0, "n": 4}
    assert res["params"]["interactive"] is False
    assert res["params"]["out"].endswith("01_tiny.metrics.json")
    assert [r["twice"] for r in res["rows"]] == [0, 2, 4, 6]
    executed = nbformat.read(res["_executed"], as_version=4)
    assert executed.metadata["papermill"]["parameters"]["n"] == 4
    # no widget state stored, and the headless board is a static plotly figure in the output
    assert "widgets" not in executed.metadata
    html = "".join(o.get("data", {}).get("text/html", "") for c in executed.cells
                   if c.cell_type == "code" for o in c.outputs)
    assert "Plotly.newPlot" in html and "1010.5" in html
    views = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views and "tinybar:" in views[0]["data"]["text/plain"]  # the HTML drops these


def test_unknown_parameter_is_rejected_naming_it(folder, tmp_path):
    with pytest.raises(LabkitConfigError, match=r"nn=3.*one of n, scale, interactive, out"):
        R.execute_notebook(folder / "01_tiny.ipynb", tmp_path, {"nn": 3})
    assert not any(tmp_path.iterdir())  # rejected before anything ran


def test_unknown_notebook_is_rejected_listing_names(folder, monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    with pytest.raises(LabkitConfigError, match="01_tiny, 02_broken"):
        R.resolve(["03"])
    assert [p.name for p in R.resolve(["01"])] == ["01_tiny.ipynb"]
    with pytest.raises(LabkitConfigError, match="notebook="):
        R.execute_notebook(folder / "nope.ipynb", folder, {})


def test_failure_carries_the_notebooks_error(folder, tmp_path):
    res = R.execute_notebook(folder / "01_tiny.ipynb", tmp_path, {"n": 0}, raise_on_error=False)
    assert res["ok"] is False and res["notebook"] == "01_tiny"
    assert "LabkitConfigError" in res["error"] and "n=0" in res["error"]
    with pytest.raises(R.NotebookFailed, match=r"n=0 is not allowed"):
        R.execute_notebook(folder / "01_tiny.ipynb", tmp_path, {"n": 0})


def test_report_folder_contents(first_report):
    names = {p.name for p in first_report.iterdir()}
    assert {"01_tiny.ipynb", "01_tiny.html", "02_broken.ipynb", "02_broken.html",
            "index.html", "results.jsonl", "report.json"} <= names
    assert first_report.name.startswith("report-")


def test_html_is_offline_with_plot_data_and_plotlyjs(first_report):
    page = (first_report / "01_tiny.html").read_text()
    assert "plotly.js v" in page  # the library itself, inline
    assert "Plotly.newPlot" in page and "1014" in page  # the figure and its data (n=3)
    remote = re.findall(r"<script\b[^>]*\bsrc=\"https?://[^>]*>", page)
    assert all(" async " in tag and "mathjax" in tag for tag in remote), remote
    assert "tinybar:" not in page  # stateless widget views are dropped, not shown stale


def test_index_links_and_status(first_report):
    index = (first_report / "index.html").read_text()
    assert 'href="01_tiny.html"' in index and 'href="02_broken.html"' in index
    assert 'href="results.jsonl"' in index
    ok_row, bad_row = index.split("01_tiny.html", 1)[1].split("02_broken.html", 1)
    assert '"ok"' in ok_row and "total" in ok_row
    assert "failed" in bad_row and "n=0 is not allowed" in bad_row


def test_results_jsonl_rows(first_report):
    rows = [json.loads(x) for x in (first_report / "results.jsonl").read_text().splitlines()]
    metrics = {(r["notebook"], r["metric"]): r["value"] for r in rows if r["kind"] == "metric"}
    assert metrics == {("01_tiny", "total"): 3.0, ("01_tiny", "n"): 3}
    data = [r for r in rows if r["kind"] == "row"]
    assert [r["twice"] for r in data] == [0, 2, 4] and {r["notebook"] for r in data} == {"01_tiny"}
    status = {r["notebook"]: r for r in rows if r["kind"] == "status"}
    assert status["01_tiny"]["ok"] is True
    assert status["02_broken"]["ok"] is False and "n=0" in status["02_broken"]["error"]
    assert all(r["report"] == first_report.name and r["profile"] == "fast" for r in rows)


def test_second_report_leaves_the_first_untouched(first_report, folder, monkeypatch):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_report.iterdir()}
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    second = R.report(["02"], out=first_report.parent, profile="fast")
    assert second != first_report and second.parent == first_report.parent
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_report.iterdir()}
    assert after == before
    assert {p.name for p in second.iterdir()} >= {"02_broken.ipynb", "index.html"}
    assert not (second / "01_tiny.ipynb").exists()


def test_new_folder_never_reuses_a_name(tmp_path):
    a, b = R._new_folder(tmp_path), R._new_folder(tmp_path)
    assert a != b and a.is_dir() and b.is_dir()


def test_report_checks_parameters_and_profile_before_running(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    with pytest.raises(LabkitConfigError, match="profile='quick'"):
        R.report(out=tmp_path, profile="quick")
    with pytest.raises(LabkitConfigError, match="rank=4"):
        R.report(out=tmp_path, params={"rank": 4})
    assert not any(tmp_path.iterdir())
