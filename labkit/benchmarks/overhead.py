"""Training-step overhead of labkit's callbacks and live plotting.

Question: does watching a run (``labkit.ui.LiveBoard`` logging every step through a
:class:`labkit.train.Callback`) slow training down? Target: less than 5% over the plain loop.

Three variants of the same :func:`labkit.train.fit` call on the same model and batches:

* ``plain``: no callbacks;
* ``noop``: one callback that does nothing (the cost of the hook itself);
* ``liveboard``: ``LiveBoard(live=False).callback()`` logging the loss every step (the
  static board of headless runs and reports);
* ``liveboard_live``: the same callback on a live ``FigureWidget`` board (the widget update
  path of an interactive session, built here without a frontend, so messages go nowhere
  but are serialised) whose series already hold a long run's history, so every update
  re-sends many points and the adaptive throttle has to keep it cheap.

Each round times every variant once with :func:`labkit.measure.time_fn` (median of
``torch.utils.benchmark``), in a rotated order so drift and other processes hit all
variants alike. The overhead is the median over rounds of the paired per-round ratio
``variant / plain``. Progress bars are off in all variants (tqdm is the same in each).
The live board's target adds the share of wall time its figure updates took, which the
median over rounds would otherwise hide (updates are rare and amortised).

What this benchmark can and cannot measure: it runs without a browser, so it measures the
*kernel's* side of a live board (appending points, thinning series to ``max_points``,
serialising a ``batch_update`` and sending it on a comm that nobody reads). It cannot see
the *browser* redrawing plotly on the same cores, which is what made a visible board cost
+35-46% of wall time before updates were limited to a few a second. That
cost is measured by tests/test_browser.py, which trains the same steps in JupyterLab in
headless Chromium with no board, a live board never displayed, and a displayed board, in
rotated rounds, and reports the median per-round ratios of wall time and kernel CPU time.
"""
from __future__ import annotations

import itertools
import time
from unittest import mock

import torch

from .. import measure, ui
from ..model import build
from ..train import Callback, fit
from ..ui import LiveBoard

REQUIRED = 1.05  # at most 5% slower than the plain loop
BROWSER_NOTE = ("; kernel side only: no browser here, so the redraw cost of a visible board "
                "is not included (tests/test_browser.py measures it in headless Chromium)")


def _setup(batch: int, seq: int, preset: str):
    model = build(preset, kind="encoder", seed=0)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g)  # (B, N)
    data = {"input_ids": ids, "padding_mask": torch.zeros(batch, seq, dtype=torch.bool),
            "labels": torch.randint(0, cfg.num_labels, (batch,), generator=g)}
    return model, itertools.repeat(data)


def _points(board) -> int:
    return sum(len(xs) for xs, _ in board.data.values())


def run(quick: bool = False) -> dict:
    batch, seq, preset = (8, 16, "tiny") if quick else (32, 64, "tiny")
    steps = 2 if quick else 20
    rounds = 3 if quick else 7
    min_run_time = 0.01 if quick else 0.4
    # quick is a smoke test on shared machines: one thread avoids oversubscription stalls
    threads = 1 if quick else torch.get_num_threads()
    model, data = _setup(batch, seq, preset)
    history = 2000 if quick else 20000
    board = LiveBoard(["loss"], title="overhead", live=False)
    with mock.patch.object(ui, "has_frontend", lambda: True):
        live = LiveBoard(["loss"], title="overhead (live)", live=True)
    for i in range(history):  # an earlier long run on the live board
        live.log("loss", "train", -history + i, 1.0)
    live.flush()
    updates = {"n": 0, "seconds": 0.0}
    flush = live.flush

    def counted_flush():
        t0 = time.perf_counter()
        flush()
        updates["n"] += 1
        updates["seconds"] += time.perf_counter() - t0

    live.flush = counted_flush
    variants = {
        "plain": [],
        "noop": [Callback()],
        "liveboard": [board.callback()],
        "liveboard_live": [live.callback()],
    }

    def make(cbs):
        return lambda: fit(model, data, steps, lr=1e-4, callbacks=cbs, progress=False)

    fns = {k: make(v) for k, v in variants.items()}
    shapes = f"B={batch} N={seq} preset={preset} steps/call={steps}"
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    wall = {k: 0.0 for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            t = measure.time_fn(fns[name], label=name, min_run_time=min_run_time, shapes=shapes,
                                dtype="torch.float32", threads=threads)
            wall[name] += time.perf_counter() - t0
            per_round[name].append(t.median_s / steps)

    def median(xs):
        return float(torch.tensor(xs).median())

    rows, ratios = [], {}
    for name in names:
        paired = [v / p for v, p in zip(per_round[name], per_round["plain"])]
        ratios[name] = median(paired)
        rows.append({"variant": name, "ms_per_step": median(per_round[name]) * 1e3,
                     "min_ms_per_step": min(per_round[name]) * 1e3,
                     "max_ms_per_step": max(per_round[name]) * 1e3,
                     "ratio_vs_plain": ratios[name], "rounds": rounds, "shapes": shapes,
                     "points": _points(board if name == "liveboard" else live)
                     if name.startswith("liveboard") else 0,
                     "figure_updates": updates["n"] if name == "liveboard_live" else 0,
                     "update_share": updates["seconds"] / wall[name]
                     if name == "liveboard_live" else 0.0})
    # the median hides rare live updates; add their share of the wall time (conservative:
    # an update that fell inside a median round is counted twice)
    share = updates["seconds"] / wall["liveboard_live"]
    measured = {"noop": ratios["noop"], "liveboard": ratios["liveboard"],
                "liveboard_live": ratios["liveboard_live"] + share}
    how = {"liveboard_live": f" + figure update share {share:.3f} "
                             f"({updates['n']} updates, {history}-point history)"}
    targets = [
        {"target": f"{name} callback: time per step / plain loop", "measured": measured[name],
         "required": REQUIRED, "unit": "x", "met": measured[name] <= REQUIRED,
         "note": f"median of {rounds} paired rounds{how.get(name, '')}, {shapes}, threads "
                 f"{threads}" + (" (quick: smoke run, noisy)" if quick else "")
                 + (BROWSER_NOTE if name == "liveboard_live" else "")}
        for name in measured]
    return {"name": "overhead", "rows": rows, "targets": targets, "env": measure.environment()}
