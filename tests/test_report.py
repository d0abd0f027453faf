"""labkit.report: executing a throwaway notebook, the report folder, failures, no overwrite."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from labkit import report as R
from labkit import report_html as H
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
        nbformat.v4.new_markdown_cell(f"# {name}\nA throwaway notebook for the report tests, "
                                      "with an equation: $a^2$."),
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
    (fig,) = [o["data"][H.PLOTLY_MIME] for c in executed.cells if c.cell_type == "code"
              for o in c.outputs if H.PLOTLY_MIME in o.get("data", {})]
    assert fig["data"][0]["y"][-1] == 1010.5
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


def test_html_is_offline_with_plot_data_and_shared_plotlyjs(first_report):
    page = (first_report / "01_tiny.html").read_text()
    assert "Plotly.newPlot" in page and "1014" in page  # the figure and its data (n=3)
    assert '<script src="assets/plotly.min.js"' in page  # one shared copy, by relative path
    head = (first_report / "assets" / "plotly.min.js").read_text()[:2000]
    assert head.startswith(H._CARTESIAN_MARK) and "plotly.js (cartesian - minified) v" in head
    assert not re.findall(r"(?:src|href)=[\"']?https?://", page)  # nothing from a network
    assert "cdn" not in page.lower()
    assert '<script defer src="assets/mathjax/tex-svg.js">' in page
    assert "MathJax" in (first_report / "assets" / "mathjax" / "tex-svg.js").read_text()
    assert "$a^2$" in page  # the TeX is left for MathJax to typeset in the browser
    assert "tinybar:" not in page  # stateless widget views are dropped, not shown stale


def test_report_stores_plotlyjs_once_and_no_widget_state(first_report):
    """A notebook's page and executed copy hold its figures, not plotly.js (4.8 MB)."""
    sizes = {p.name: p.stat().st_size for p in first_report.iterdir() if p.is_file()}
    assert all(size < 100_000 for size in sizes.values()), sizes  # styles shared too
    (css,) = (first_report / "assets").glob("lab-*.css")
    assert f'href="assets/{css.name}"' in (first_report / "01_tiny.html").read_text()
    total = sum(p.stat().st_size for p in first_report.rglob("*") if p.is_file())
    # plotly.js's cartesian bundle 1.5 MB + MathJax tex-svg 2.1 MB + styles 0.3 MB, once each
    assert total < 4_200_000, total
    assert json.loads((first_report / "report.json").read_text())["notes"] == []
    for name in ("01_tiny.ipynb", "02_broken.ipynb"):
        executed = nbformat.read(str(first_report / name), as_version=4)
        assert "widgets" not in executed.metadata
        assert not any(H.is_inline_plotlyjs(o) for c in executed.cells
                       if c.cell_type == "code" for o in c.outputs)
    executed = nbformat.read(str(first_report / "01_tiny.ipynb"), as_version=4)
    kinds = {k for c in executed.cells if c.cell_type == "code" for o in c.outputs
             for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in kinds  # JupyterLab still draws the figure


def test_stored_notebook_holds_no_plotlyjs_and_no_figure_html_copy(first_report):
    """Issue 10.14: the executed notebook keeps each figure once, as plotly JSON (JupyterLab
    draws it), with template defaults only for the trace types it uses; its page (made from
    that JSON) still shows every figure with its data."""
    text = (first_report / "01_tiny.ipynb").read_text()
    assert "Plotly.newPlot" not in text and "plotly.js v" not in text and "cdn" not in text
    executed = nbformat.read(str(first_report / "01_tiny.ipynb"), as_version=4)
    figs = [o["data"] for c in executed.cells if c.cell_type == "code" for o in c.outputs
            if H.PLOTLY_MIME in o.get("data", {})]
    assert len(figs) == 1 and "text/html" not in figs[0]
    assert set(figs[0][H.PLOTLY_MIME]["layout"]["template"]["data"]) == {"scatter"}
    assert figs[0][H.PLOTLY_MIME]["data"][0]["y"] == [1000.0, 1007.0, 1014.0]  # n=3
    page = (first_report / "01_tiny.html").read_text()
    assert page.count("Plotly.newPlot(") == 1 and "1014" in page


def _figure_output(trace_type):
    fig = {"data": [{"type": trace_type, "z" if trace_type == "heatmap" else "x": [[1, 2]]}],
           "layout": {"template": {"data": {"scatter": [{}], "heatmap": [{}], "bar": [{}]},
                                   "layout": {"font": {"size": 12}}}}}
    return nbformat.v4.new_output("display_data", {H.PLOTLY_MIME: fig, "text/html": "<div/>",
                                                   "text/plain": "Figure"})


def _notebook(*outputs):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = list(outputs)
    nb.cells = [cell]
    return nb


def test_slim_notebook_keeps_figure_json_only_with_used_template_defaults():
    nb = _notebook(_figure_output("heatmap"), nbformat.v4.new_output(
        "display_data", {"text/html": "<table></table>", "text/plain": "table"}))
    assert H.slim_notebook(nb)
    fig_out, table = nb.cells[0].outputs
    assert set(fig_out["data"]) == {H.PLOTLY_MIME, "text/plain"}
    assert fig_out["data"][H.PLOTLY_MIME]["layout"]["template"] == {
        "data": {"heatmap": [{}]}, "layout": {"font": {"size": 12}}}
    assert table["data"]["text/html"] == "<table></table>"  # only figures lose their HTML
    assert not H.slim_notebook(nb)
    H.page_figures(nb)  # the page gets HTML made from the JSON
    assert "Plotly.newPlot" in nb.cells[0].outputs[0]["data"]["text/html"]


def test_cartesian_bundle_unless_a_figure_needs_more(tmp_path):
    """The small bundle stays while every figure's trace type is in it; a 3-D figure or a
    figure stored as HTML only brings the full plotly.js, with a note naming the notebook."""
    from plotly.offline import get_plotlyjs

    assert H.write_assets(tmp_path) == []
    target = tmp_path / H.PLOTLY_JS
    assert target.read_text()[:len(H._CARTESIAN_MARK)] == H._CARTESIAN_MARK
    assert 1_000_000 < target.stat().st_size < 2_000_000
    assert H.cover_figures(tmp_path, _notebook(_figure_output("heatmap"),
                                               _figure_output("bar")), "01") is None
    note = H.cover_figures(tmp_path, _notebook(_figure_output("scatter3d")), "02_three_d")
    assert "02_three_d" in note and "scatter3d" in note
    assert target.read_text() == get_plotlyjs()
    assert H.cover_figures(tmp_path, _notebook(_figure_output("scatter3d")), "03") is None
    html_only = nbformat.v4.new_output("display_data", {"text/html": "Plotly.newPlot(1)"})
    other = tmp_path / "other"
    H.write_assets(other)
    assert "HTML only" in H.cover_figures(other, _notebook(html_only), "04")


def test_full_plotlyjs_with_a_note_when_versions_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "CARTESIAN_VERSION", "0.0.1")
    (note,) = H.write_assets(tmp_path)
    assert "0.0.1" in note and "full plotly.js" in note
    assert "plotly.js v" in (tmp_path / H.PLOTLY_JS).read_text()[:3000]
    assert H.cover_figures(tmp_path, _notebook(_figure_output("scatter3d")), "x") is None


def test_slim_notebook_drops_inline_plotlyjs_and_widget_state():
    from plotly.offline import get_plotlyjs

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    cell = nbformat.v4.new_code_cell("x")
    lib = nbformat.v4.new_output("display_data", {"text/html": f"<script>{get_plotlyjs()}</script>"})
    fig = nbformat.v4.new_output("display_data", {"text/html": "<div>Plotly.newPlot(...)</div>"})
    cell.outputs = [lib, fig]
    nb.cells = [cell]
    assert H.slim_notebook(nb) and "widgets" not in nb.metadata
    assert nb.cells[0].outputs == [fig]
    assert not H.slim_notebook(nb)


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
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_report.rglob("*")
              if p.is_file()}
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    second = R.report(["01"], out=first_report.parent, profile="fast", progress=False)
    assert second != first_report and second.parent == first_report.parent
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_report.rglob("*")
             if p.is_file()}
    assert after == before
    assert {p.name for p in second.iterdir()} >= {"01_tiny.ipynb", "index.html"}
    assert not (second / "02_broken.ipynb").exists()


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


def test_index_shows_named_headline_metrics_else_first_five_with_a_note(tmp_path):
    metrics = {f"m{i}": i for i in range(8)}
    named = {"notebook": "a", "title": "A", "ok": True, "error": "", "seconds": 1.0,
             "metrics": metrics, "headline": ["m6", "m2", "m7"], "html": "a.html"}
    unnamed = {**named, "notebook": "b", "headline": None, "html": "b.html"}
    page = H.index_html(tmp_path, [named], "fast", {})
    table = page.split("<table class='m'>")[1].split("</table>")[0]
    assert [int(x) for x in re.findall(r"<td>m(\d)</td>", table)] == [6, 2, 7]
    assert '5 more metrics in <a href="a.html">its page</a>' in page
    assert "no headline metrics named" not in page
    page = H.index_html(tmp_path, [unnamed], "fast", {})
    table = page.split("<table class='m'>")[1].split("</table>")[0]
    assert [int(x) for x in re.findall(r"<td>m(\d)</td>", table)] == [0, 1, 2, 3, 4]
    assert "no headline metrics named: the first 5 of 8 are shown" in page


def test_finish_stores_and_checks_headline(tmp_path):
    from labkit import notebook

    out = tmp_path / "m.json"
    notebook.finish(str(out), "nb", {}, {"claimed": 2.0, "measured": 1.5, "x": 1},
                    headline=["claimed", "measured"])
    assert json.loads(out.read_text())["headline"] == ["claimed", "measured"]
    with pytest.raises(LabkitConfigError, match="headline='nope'.*claimed, measured, x"):
        notebook.finish("", "nb", {}, {"claimed": 2.0, "measured": 1.5, "x": 1},
                        headline=["nope"])
    with pytest.raises(LabkitConfigError, match="1 to 5 distinct"):
        notebook.finish("", "nb", {}, {f"m{i}": i for i in range(9)},
                        headline=[f"m{i}" for i in range(6)])


def test_progress_names_the_notebook_and_kernel_noise_goes_to_a_log(folder, tmp_path,
                                                                    monkeypatch, capfd):
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    done = R.report(["01"], out=tmp_path, profile="fast")
    out, err = capfd.readouterr()
    assert "[1/1] 01_tiny" in err and "cell" in err  # the running notebook, cells done
    assert re.search(r"\[1/1\] 01_tiny: ok in \d+\.\d s", out + err)
    assert "TCP" not in err and "KeyboardInterrupt" not in err
    log = (done / "kernels.log").read_text()
    assert "TCP" in log or log == ""  # ipykernel >= 7.3 warns there, older ones do not


def test_config_failure_of_every_notebook_leaves_no_report_folder(folder, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    earlier = R._new_folder(tmp_path)
    (earlier / "index.html").write_text("an earlier report")
    with pytest.raises(R.NothingRan, match=r"02_broken: LabkitConfigError: n=0 is not allowed"
                                           r".*no report folder was written"):
        R.report(["02"], out=tmp_path, profile="fast", progress=False)
    assert list(tmp_path.iterdir()) == [earlier]  # the earlier one is untouched
    assert (earlier / "index.html").read_text() == "an earlier report"
    with pytest.raises(R.NothingRan):
        R.report(["02"], out=tmp_path / "new", profile="fast", progress=False)
    assert not (tmp_path / "new").exists()


def test_out_must_be_a_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(folder))
    (tmp_path / "file.txt").write_text("x")
    for out in (tmp_path / "file.txt", tmp_path / "file.txt" / "sub"):
        with pytest.raises(LabkitConfigError, match="out=.*file"):
            R.report(out=out, profile="fast")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_equations_and_plots_render_offline_in_a_browser(first_report):
    """Headless chromium, every request outside the report folder recorded: MathJax
    typesets the TeX into SVG and plotly draws the figure, with no network."""
    import shutil

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(chromium).exists():
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            remote = []
            page.on("request", lambda r: r.url.startswith(("file:", "data:"))
                    or remote.append(r.url))
            page.goto((first_report / "01_tiny.html").as_uri())
            page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise",
                                   timeout=60_000)
            page.evaluate("MathJax.startup.promise")
            assert page.locator("mjx-container svg").count() >= 1
            assert page.locator(".js-plotly-plot .main-svg").count() >= 1
            assert "$a^2$" not in page.inner_text("body")  # typeset, not raw TeX
            assert page.locator("mjx-merror").count() == 0
            assert remote == [] and errors == []
            # the shipped bundle holds exactly the trace modules labkit relies on
            traces = page.evaluate("Object.keys(Plotly.PlotSchema.get().traces)")
            assert set(traces) == H.CARTESIAN_TRACES
        finally:
            browser.close()
