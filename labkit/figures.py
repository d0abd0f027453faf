"""One figure style for every notebook: plotly figures and pandas tables that read well in a
JupyterLab cell, in an exported HTML report and in a saved notebook.

The rules, each one a function here that notebooks call rather than re-style:

* a series keeps **one colour everywhere**: :func:`color` hands out palette entries by series
  name, in order of first use, for the whole kernel session ("dense" is the same colour in
  every panel and every figure), and :func:`style` shows each name **once in the legend**;
* figures **fill the cell**: no fixed width, ``autosize`` on, and static copies are rendered
  with plotly's ``responsive`` config;
* multi-panel boards get room for tick labels: :func:`subplots` puts up to 3 panels in a row
  and 4 or more on a grid of 2 columns, with spacing for axis titles;
* an axis whose positive data spans at least two decades is drawn on a log scale
  (:func:`log_axes`), so a 1 ms bar next to a 100 ms bar is still visible;
* tables show plain numbers (3 significant digits, no scientific notation) and an empty cell,
  not ``NaN``, where a value is missing (:func:`table`).
"""
from __future__ import annotations

import math

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.D3
PANEL_HEIGHT = 300  # px per row of panels
DECADES_FOR_LOG = 2.0  # an axis spanning >= 100x in positive values goes logarithmic
_colors: dict[str, str] = {}


def color(series: str) -> str:
    """The colour of ``series`` for this session: the same name always gets the same colour."""
    if series not in _colors:
        _colors[series] = PALETTE[len(_colors) % len(PALETTE)]
    return _colors[series]


def grid(panels: int) -> tuple[int, int]:
    """(rows, cols) for ``panels`` panels: one row up to 3, then 2 columns."""
    return (1, max(panels, 1)) if panels <= 3 else (math.ceil(panels / 2), 2)


def position(index: int, panels: int) -> tuple[int, int]:
    """1-based (row, col) of panel ``index`` (0-based) in :func:`grid`."""
    _, cols = grid(panels)
    return index // cols + 1, index % cols + 1


def subplots(titles, title: str = "", xaxis: dict | None = None,
             yaxis: dict | None = None) -> go.Figure:
    """An empty figure with one panel per title, laid out and spaced for reading."""
    titles = list(titles)
    rows, cols = grid(len(titles))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.08 if cols > 1 else 0.0,
                        vertical_spacing=min(0.3, 0.45 / rows) if rows > 1 else 0.0)
    for i, name in enumerate(titles):
        r, c = position(i, len(titles))
        fig.update_xaxes(title_text=(xaxis or {}).get(name, "step"), row=r, col=c)
        if (yaxis or {}).get(name):
            fig.update_yaxes(title_text=yaxis[name], row=r, col=c)
    return layout(fig, title=title, rows=rows)


def layout(fig, title: str | None = None, rows: int = 1):
    """Size and legend rules: fill the cell's width, one horizontal legend under the plots."""
    fig.update_layout(autosize=True, width=None, height=PANEL_HEIGHT * rows + 110,
                      margin=dict(t=70, b=60, l=60, r=20),
                      legend=dict(orientation="h", yanchor="top", y=-0.12 if rows == 1 else -0.06,
                                  x=0, xanchor="left"),
                      template="plotly_white")
    if title is not None:
        fig.update_layout(title=dict(text=title, x=0, xanchor="left"))
    return fig


def style(fig, log: bool = True):
    """Apply the house style to any plotly figure (built here or by plotly express):
    a colour per series name, each name once in the legend, width that fills the cell, and
    log axes where the data spans decades (``log=False`` to keep linear axes)."""
    seen = set()
    for trace in fig.data:
        name = trace.name
        if not name:
            continue
        paint = color(name)
        if hasattr(trace, "line") and trace.type in ("scatter", "scattergl"):
            trace.line.color = paint
            trace.marker.color = paint
        elif hasattr(trace, "marker"):
            trace.marker.color = paint
        trace.legendgroup = name
        trace.showlegend = name not in seen
        seen.add(name)
    if fig.layout.height is None:
        layout(fig)
    else:  # keep the caller's height, drop a fixed width
        fig.update_layout(autosize=True, width=None)
    if log:
        log_axes(fig)
    return fig


def _axis_values(fig, attr: str) -> dict[str, list[float]]:
    """Numeric values per axis name ('x', 'x2', 'y', ...) over all traces."""
    out: dict[str, list[float]] = {}
    for t in fig.data:
        axis = getattr(t, f"{attr}axis", None) or attr
        vals = getattr(t, attr, None)
        if vals is None:
            continue
        nums = [float(v) for v in vals if isinstance(v, (int, float, np.number))
                and not isinstance(v, bool) and math.isfinite(float(v))]
        out.setdefault(axis, []).extend(nums)
    return out


def spans_decades(values, decades: float = DECADES_FOR_LOG) -> bool:
    """True when all values are positive and max/min >= 10**decades."""
    values = [v for v in values if v is not None]
    if len(values) < 2 or min(values) <= 0:
        return False
    return math.log10(max(values) / min(values)) >= decades


def log_axes(fig, decades: float = DECADES_FOR_LOG):
    """Turn every axis whose data spans ``decades`` or more to a log scale, unless its type
    was chosen explicitly; return the names of the axes changed."""
    changed = []
    for attr in ("x", "y"):
        for axis, values in _axis_values(fig, attr).items():
            key = f"{attr}axis{axis[1:]}"  # 'y2' -> 'yaxis2', 'y' -> 'yaxis'
            if fig.layout[key].type in (None, "-") and spans_decades(values, decades):
                fig.layout[key].type = "log"
                changed.append(key)
    return changed


def number(value) -> str:
    """A number for a table: 3 significant digits, positional (never 1e-05), thousands
    separated, and '' for a missing value (None, NaN)."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "" if math.isnan(v) else str(v)
        if v == 0 or abs(v) >= 1000:
            return f"{v:,.0f}"
        return np.format_float_positional(v, precision=3, unique=False, fractional=False,
                                          trim="-")
    return str(value)


def table(df, index: bool = False):
    """A pandas ``Styler`` of ``df`` in the house format (see :func:`number`). The
    DataFrame itself is unchanged, so code and tests keep reading real numbers."""
    styler = df.style.format(number)
    return styler if index else styler.hide(axis="index")
