"""The HTML side of a report: offline pages that share one copy of their scripts.

A report folder holds ``assets/plotly.min.js`` and ``assets/mathjax/tex-svg.js``, written
once; every page refers to both by a relative path, so the folder works offline, can be
moved as a whole, and grows with its figures and text, not with a copy of the scripts per
page (a 7-notebook report was 70 MB with plotly.js in every page and executed notebook).

* plotly.js: plotly's own *cartesian* bundle (1.5 MB: bar, box, contour, heatmap, histogram,
  histogram2d(contour), image, pie, scatter, scatterternary, violin), shipped in
  ``labkit/assets`` (MIT, plotly.js-cartesian-dist-min of the same plotly.js version as the
  installed plotly package). When a figure uses another trace type, or the plotly package
  carries a different plotly.js version, the full 4.8 MB plotly.js is written instead and a
  note says why (recorded in the report, never silent).
* MathJax 3 ``tex-svg.js`` (2.1 MB; TeX input with base/ams/newcommand, SVG output), copied
  from the ``django-static-mathjax`` package, which ships MathJax's own files. SVG output
  because it needs no web fonts (some browsers refuse fonts to ``file://`` pages).

Executed notebooks are stored without widget state, without the inline plotly.js blob and
without the ``text/html`` copy of each plotly figure (it repeated the figure's JSON and
pointed at a CDN): figures keep plotly's own JSON mimetype, which JupyterLab draws, and
template defaults only for the trace types a figure uses. A page's figure HTML is made
from that JSON (:func:`page_figures`).
"""
from __future__ import annotations

import hashlib
import html
import importlib.util
import re
import shutil
from pathlib import Path

ASSETS = "assets"
PLOTLY_JS = f"{ASSETS}/plotly.min.js"
MATHJAX_JS = f"{ASSETS}/mathjax/tex-svg.js"
SHIPPED = Path(__file__).resolve().parent / "assets"
CARTESIAN_JS = SHIPPED / "plotly-cartesian.min.js"
CARTESIAN_VERSION = "4.1.1"  # the plotly.js version of CARTESIAN_JS
# trace modules of the cartesian bundle (its README; tests/test_report.py checks the bundle)
CARTESIAN_TRACES = frozenset({"bar", "box", "contour", "heatmap", "histogram", "histogram2d",
                              "histogram2dcontour", "image", "pie", "scatter",
                              "scatterternary", "violin"})
_CARTESIAN_MARK = "/* labkit: plotly.js cartesian bundle"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
INSTALL_MATHJAX = "pip install 'django-static-mathjax>=3.2' (MathJax's files, no Django needed)"
_BIG_OUTPUT = 1_000_000  # characters: no figure is this big, plotly.js (4.8 MB) is
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def mathjax_source() -> Path | None:
    """MathJax 3's single-file TeX-to-SVG build from the installed package, or None."""
    spec = importlib.util.find_spec("mathjax")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "static" / "mathjax" / "es5" / "tex-svg.js"
        if path.is_file():
            return path
    return None


def plotly_bundle() -> tuple[str, str | None]:
    """The plotly.js a report uses, and a note when it is not the small cartesian bundle."""
    import plotly
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    version = get_plotlyjs_version()
    if CARTESIAN_JS.is_file() and version == CARTESIAN_VERSION:
        return (f"{_CARTESIAN_MARK} v{CARTESIAN_VERSION}, traces: "
                f"{' '.join(sorted(CARTESIAN_TRACES))} */\n"
                + CARTESIAN_JS.read_text(encoding="utf-8")), None
    why = (f"{CARTESIAN_JS} is missing" if not CARTESIAN_JS.is_file() else
           f"the plotly package carries plotly.js {version}, labkit's cartesian bundle is "
           f"{CARTESIAN_VERSION}")
    return (f"/* plotly.js from the plotly {plotly.__version__} package */\n" + get_plotlyjs(),
            f"full plotly.js (4.8 MB) in assets/: {why}")


def write_assets(folder: Path) -> list[str]:
    """Write the shared scripts into ``folder/assets`` (once). Returns notes about anything
    missing or larger than usual (recorded in the report), e.g. MathJax not installed."""
    notes = []
    (folder / ASSETS / "mathjax").mkdir(parents=True, exist_ok=True)
    target = folder / PLOTLY_JS
    if not target.is_file():
        text, note = plotly_bundle()
        target.write_text(text, encoding="utf-8")
        notes += [note] if note else []
    source = mathjax_source()
    if source is None:
        notes.append("MathJax is not installed, so equations show as TeX: " + INSTALL_MATHJAX)
    elif not (folder / MATHJAX_JS).is_file():
        shutil.copyfile(source, folder / MATHJAX_JS)
    return notes


def _figures(nb):
    """(output data, figure JSON or None) of every plotly output of ``nb``."""
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = o.get("data", {})
            html_ = data.get("text/html", "")
            html_ = "".join(html_) if isinstance(html_, list) else html_
            if PLOTLY_MIME in data:
                yield data, data[PLOTLY_MIME]
            elif "Plotly.newPlot" in html_:
                yield data, None


def trace_types(nb) -> set[str] | None:
    """The plotly trace types the figures of ``nb`` use; None if a figure is HTML only
    (its types cannot be read)."""
    types: set[str] = set()
    for _, fig in _figures(nb):
        if fig is None:
            return None
        types |= {t.get("type", "scatter") for t in fig.get("data", [])}
    return types


def cover_figures(folder: Path, nb, name: str) -> str | None:
    """Make sure the folder's plotly.js draws every figure of ``nb``: if it is the
    cartesian bundle and a figure needs more, write the full plotly.js (atomically) and
    return a note saying which notebook needed it."""
    from plotly.offline import get_plotlyjs

    from .notebook import atomic_write

    target = folder / PLOTLY_JS
    if not target.read_text(encoding="utf-8")[:len(_CARTESIAN_MARK)] == _CARTESIAN_MARK:
        return None
    types = trace_types(nb)
    missing = None if types is None else sorted(types - CARTESIAN_TRACES)
    if missing == []:
        return None
    atomic_write(target, lambda tmp: Path(tmp).write_text(get_plotlyjs(), encoding="utf-8"))
    what = "a figure stored as HTML only" if missing is None else \
        "trace types " + ", ".join(missing)
    return f"full plotly.js (4.8 MB) in assets/: {name} has {what}, beyond the cartesian bundle"


def prune_template(fig: dict) -> bool:
    """Keep the template's trace defaults only for trace types the figure uses (they do
    nothing for the others: ~4 KB of a ~10 KB figure). True if anything was removed."""
    template = fig.get("layout", {}).get("template")
    if not isinstance(template, dict) or not isinstance(template.get("data"), dict):
        return False
    used = {t.get("type", "scatter") for t in fig.get("data", [])}
    kept = {k: v for k, v in template["data"].items() if k in used}
    changed = len(kept) != len(template["data"])
    template["data"] = kept
    return changed


def page_figures(nb) -> None:
    """Give every figure with plotly JSON a ``text/html`` made from that JSON (what plotly's
    notebook renderer would show, without its CDN MathJax tag), for the HTML page."""
    import plotly.io as pio

    for data, fig in _figures(nb):
        if fig is not None:
            data["text/html"] = pio.to_html(
                fig, config=fig.get("config") or {"responsive": True}, include_plotlyjs=False,
                include_mathjax=False, full_html=False, default_width="100%",
                default_height=525, validate=False)


def is_inline_plotlyjs(output: dict) -> bool:
    """An output that carries the plotly.js library itself (plotly's "notebook" renderer
    emits it once per kernel)."""
    text = output.get("data", {}).get("text/html", "")
    text = "".join(text) if isinstance(text, list) else text
    return len(text) > _BIG_OUTPUT and "plotly" in text[:5000].lower()


def slim_notebook(nb) -> bool:
    """Drop inline plotly.js outputs, stored widget state, the ``text/html`` copy of every
    figure that has plotly's JSON, and template defaults of unused trace types, in place;
    True if changed."""
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        if cell.cell_type == "code":
            kept = [o for o in cell.outputs if not is_inline_plotlyjs(o)]
            changed |= len(kept) != len(cell.outputs)
            cell.outputs = kept
    for data, fig in _figures(nb):
        if fig is not None:
            changed |= data.pop("text/html", None) is not None
            changed |= prune_template(fig)
    return changed


_REMOTE_SCRIPT = re.compile(r'<script\b[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', re.IGNORECASE)
_MATHJAX_TAG = re.compile(r'<script src="' + re.escape(MATHJAX_JS) + r'">\s*</script>')
# MathJax 3 reads this object; nbconvert's own config block is MathJax 2 syntax (inert here)
_MATHJAX_CONFIG = """<script>window.MathJax = {
  tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
        processEscapes: true, processEnvironments: true, tags: 'ams'},
  svg: {fontCache: 'global'}
};</script>
"""


def offline(page: str, mathjax: bool = True) -> str:
    """Point an nbconvert page at the shared scripts and drop every remote script
    (require.js, plotly's per-figure MathJax 2 tag, nbconvert's MathJax CDN tag)."""
    page = _REMOTE_SCRIPT.sub("", page)
    local = (_MATHJAX_CONFIG + f'<script defer src="{MATHJAX_JS}"></script>') if mathjax else ""
    page = _MATHJAX_TAG.sub(lambda m: local, page, count=1)
    head = ("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
            f'<script src="{PLOTLY_JS}" charset="utf-8"></script>\n')
    return page.replace("</head>", head + "</head>", 1)


_HEAD_STYLE = re.compile(r"<style\b[^>]*>.*?</style>\s*", re.S | re.IGNORECASE)


def share_styles(page: str, folder: Path) -> str:
    """Move the ``<style>`` blocks of the page's head (nbconvert's lab theme, ~250 KB a
    page) into one ``assets/lab-<hash>.css`` shared by every page with the same styles."""
    head, sep, body = page.partition("</head>")
    css = "\n".join(re.sub(r"^<style\b[^>]*>|</style>\s*$", "", m.group(0).strip())
                    for m in _HEAD_STYLE.finditer(head))
    if not sep or not css:
        return page
    name = f"{ASSETS}/lab-{hashlib.sha256(css.encode()).hexdigest()[:12]}.css"
    target = folder / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(css, encoding="utf-8")
    head = _HEAD_STYLE.sub("", head)
    return head + f'<link rel="stylesheet" href="{name}">\n' + sep + body


def notebook_html(executed, mathjax: bool = True, folder: Path | None = None) -> str:
    """One offline HTML page for an executed notebook (nbconvert, lab template), using the
    report folder's shared plotly.js and MathJax (and, given ``folder``, shared styles)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    slim_notebook(nb)
    page_figures(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # widget views (e.g. tqdm.auto bars) without stored state only keep the text
            # of their first frame ("0/30"), which would misreport the run: drop them
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    # no mermaid diagrams here: nothing for its loader to fetch from a network
    exporter = HTMLExporter(template_name="lab", embed_images=True, mathjax_url=MATHJAX_JS,
                            mermaid_js_url="", mermaid_layout_elk_js_url="")
    page, _ = exporter.from_notebook_node(nb)
    page = offline(page, mathjax)
    return share_styles(page, Path(folder)) if folder is not None else page


# --------------------------------------------------------------------------- index

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def headline(metrics: dict, names) -> tuple[dict, str]:
    """The metrics to show in the index and a note: the notebook's named headline metrics
    (in its order), else the first 5 with a visible note."""
    metrics = metrics or {}
    if names:
        return {k: metrics[k] for k in names if k in metrics}, ""
    shown = dict(list(metrics.items())[:5])
    note = "" if len(metrics) <= 5 else \
        f"no headline metrics named: the first 5 of {len(metrics)} are shown"
    return shown, note


def claims_html(entries: list[dict]) -> str:
    """The one-page summary on top of the index: every claim a notebook checked (its rows
    with ``table == "claims"``: claim, verdict, evidence), linked to the notebook's page
    where its figures are."""
    e = html.escape
    rows = []
    for r in entries:
        link = f'<a href="{e(r["html"])}">{e(r["notebook"])}</a>' if r.get("html") else \
            e(r["notebook"])
        for c in r.get("claims") or []:
            v = str(c.get("verdict", ""))
            cls = "ok" if v == "holds" else "failed" if v.startswith("does not") else "partial"
            rows.append(f"<tr><td>{e(str(c.get('claim', '')))}</td><td class='{cls}'>{e(v)}"
                        f"</td><td class='small'>{e(str(c.get('evidence', '')))}</td>"
                        f"<td>{link}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Claims and verdicts</h2><p class='small'>Each claim of the papers checked "
            "on this machine; the figures are on the linked notebook page.</p><table><tr>"
            "<th>claim</th><th>verdict</th><th>evidence</th><th>notebook</th></tr>"
            + "".join(rows) + "</table>")


def benchmarks_html(benches: list[dict]) -> str:
    """Each benchmark's targets as measured in its newest results file, with the date, the
    load average and the machine it ran on."""
    if not benches:
        return ""
    e = html.escape
    parts = ["<h2>Benchmarks</h2><p class='small'>From <code>labkit bench NAME</code> "
             "results files: ratios measured side by side in one run.</p>"]
    for b in benches:
        env = b.get("env") or {}
        where = ", ".join(f"{k}={env[k]}" for k in ("cpu", "threads", "torch") if k in env)
        rows = "".join(
            f"<tr><td>{e(str(t.get('target')))}</td><td>{_fmt(t.get('required'))}</td>"
            f"<td>{_fmt(t.get('measured'))}</td><td>"
            f"{ {True: 'met', False: 'NOT met'}.get(t.get('met'), 'not measurable')}</td>"
            f"<td class='small'>{e(str(t.get('note', '')))}</td></tr>"
            for t in b["result"].get("targets", []))
        parts.append(
            f"<h3>{e(b['bench'])}{' (quick)' if b.get('quick') else ''}</h3>"
            f"<p class='small'>{e(b['date'])} &middot; load average {e(str(b.get('load_average')))}"
            f" &middot; {e(where)} &middot; {e(b['file'])}</p>"
            f"<table><tr><th>target</th><th>required</th><th>measured</th><th></th>"
            f"<th>note</th></tr>{rows}</table>")
    return "".join(parts)


def index_html(folder: Path, entries: list[dict], profile: str, env: dict,
               notes=(), benches=()) -> str:
    e = html.escape
    rows = []
    for r in entries:
        status = ('<span class="ok">ok</span>' if r["ok"] else
                  f'<span class="failed">failed</span><div class="err">{e(r["error"])}</div>')
        link = f'<a href="{e(r["html"])}">{e(r["notebook"])}</a>' if r.get("html") else \
            e(r["notebook"])
        if r.get("ipynb"):
            link += f' <a class="small" href="{e(r["ipynb"])}">ipynb</a>'
        shown, note = headline(r.get("metrics"), r.get("headline"))
        metrics = "".join(f"<tr><td>{e(str(k))}</td><td>{_fmt(v)}</td></tr>"
                          for k, v in shown.items())
        rest = len(r.get("metrics") or {}) - len(shown)
        more = []
        if note:
            more.append(f'<div class="note">{e(note)}</div>')
        if rest > 0:
            where = f'<a href="{e(r["html"])}">its page</a>' if r.get("html") else "its page"
            more.append(f'<div class="small">{rest} more metrics in {where}</div>')
        params = ", ".join(f"{e(str(k))}={_fmt(v)}" for k, v in (r.get("params") or {}).items()
                           if k not in ("out", "interactive"))
        rows.append(
            f"<tr><td>{link}<div class='small'>{e(r['title'])}</div></td>"
            f"<td>{status}</td><td>{r['seconds']:.1f}</td>"
            f"<td><table class='m'>{metrics}</table>{''.join(more)}</td>"
            f"<td class='small'>{params}</td></tr>")
    envrows = "".join(f"<tr><td>{e(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in env.items())
    notes_html = "".join(f'<p class="note">{e(n)}</p>' for n in notes)
    n_ok = sum(r["ok"] for r in entries)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>labkit report {e(folder.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px;
vertical-align: top; text-align: left; }} table.m td {{ border: none; padding: 0 8px 0 0; }}
.ok {{ color: #070; font-weight: bold; }} .failed {{ color: #b00; font-weight: bold; }}
.err {{ color: #b00; font-family: monospace; white-space: pre-wrap; max-width: 40em; }}
.small {{ font-size: 85%; color: #555; }} .note {{ font-size: 85%; color: #a60; }}
.partial {{ color: #a60; font-weight: bold; }}
</style></head><body>
<h1>labkit report</h1>
<p>{e(folder.name)} &middot; profile <b>{e(profile)}</b> &middot; {n_ok}/{len(entries)} notebooks
ok &middot; every number was measured on the machine below; tidy rows in
<a href="results.jsonl">results.jsonl</a>.</p>
{notes_html}
{claims_html(entries)}
<h2>Notebooks</h2>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>headline metrics</th>
<th>parameters</th></tr>
{''.join(rows)}
</table>
{benchmarks_html(list(benches))}
<h2>Environment</h2><table>{envrows}</table>
</body></html>
"""
