"""The HTML side of a report: offline pages that share one copy of their scripts.

A report folder holds ``assets/plotly.min.js`` (plotly.js, ~4.8 MB, written once) and
``assets/mathjax/tex-svg-full.js`` (MathJax 3 with SVG output, ~2.3 MB, copied once from
the ``django-static-mathjax`` package, which ships MathJax's own files). Every page refers
to both by a relative path, so the folder works offline, can be moved as a whole, and the
size of a report grows with its figures and text, not with 5 MB of plotly.js per page
(a 7-notebook report was 70 MB). SVG output because browsers refuse web fonts from
``file://`` pages, and MathJax's SVG output needs no fonts.

Executed notebooks are stored without the inline plotly.js blob and without widget state;
figures keep plotly's own JSON mimetype, so JupyterLab still draws them.
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
MATHJAX_JS = f"{ASSETS}/mathjax/tex-svg-full.js"
INSTALL_MATHJAX = "pip install 'django-static-mathjax>=3.2' (MathJax's files, no Django needed)"
_BIG_OUTPUT = 1_000_000  # characters: no figure is this big, plotly.js (4.8 MB) is
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def mathjax_source() -> Path | None:
    """MathJax 3's single-file SVG build from the installed package, or None."""
    spec = importlib.util.find_spec("mathjax")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "static" / "mathjax" / "es5" / "tex-svg-full.js"
        if path.is_file():
            return path
    return None


def write_assets(folder: Path) -> list[str]:
    """Write the shared scripts into ``folder/assets`` (once). Returns notes about anything
    missing (recorded in the report), e.g. MathJax not installed."""
    import plotly
    from plotly.offline import get_plotlyjs

    notes = []
    (folder / ASSETS / "mathjax").mkdir(parents=True, exist_ok=True)
    target = folder / PLOTLY_JS
    if not target.is_file():
        target.write_text(f"/* plotly.js from the plotly {plotly.__version__} package */\n"
                          + get_plotlyjs(), encoding="utf-8")
    source = mathjax_source()
    if source is None:
        notes.append("MathJax is not installed, so equations show as TeX: " + INSTALL_MATHJAX)
    elif not (folder / MATHJAX_JS).is_file():
        shutil.copyfile(source, folder / MATHJAX_JS)
    return notes


def is_inline_plotlyjs(output: dict) -> bool:
    """An output that carries the plotly.js library itself (plotly's "notebook" renderer
    emits it once per kernel)."""
    text = output.get("data", {}).get("text/html", "")
    text = "".join(text) if isinstance(text, list) else text
    return len(text) > _BIG_OUTPUT and "plotly" in text[:5000].lower()


def slim_notebook(nb) -> bool:
    """Drop inline plotly.js outputs and stored widget state in place; True if changed."""
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        if cell.cell_type == "code":
            kept = [o for o in cell.outputs if not is_inline_plotlyjs(o)]
            changed |= len(kept) != len(cell.outputs)
            cell.outputs = kept
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


def index_html(folder: Path, entries: list[dict], profile: str, env: dict,
               notes=()) -> str:
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
<h2>Environment</h2><table>{envrows}</table>
</body></html>
"""
