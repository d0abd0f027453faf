"""The ``labkit`` command line.

    labkit report [NOTEBOOK ...] [--out DIR] [--profile fast|full] [-p NAME VALUE ...]
    labkit run NOTEBOOK [-p NAME VALUE ...] [--out DIR] [--profile fast|full]
    labkit bench NAME [--json] [--quick] [--out DIR]
    labkit plan --task TASK [--source DIR] [--model tiny|minilm] [--budget POINTS] ...
    labkit lab [JUPYTERLAB ARGS ...]

Notebook names are stems of ``notebooks/*.ipynb`` (``01_low_rank_attention``) or a unique
prefix (``01``); ``$LABKIT_NOTEBOOKS`` points at another folder. Benchmarks are the modules
``labkit/benchmarks/<name>.py`` (``labkit bench peak`` measures the machine's GEMM peaks and
memory bandwidth that the other benchmarks' rows are put against); each run is also written
to ``DIR/bench-<name>-<UTC>.json`` with the date and the load average, which ``labkit
report`` renders. ``labkit plan`` runs :func:`labkit.plan.plan` on a trained classifier and
saves its choice. Bad input prints ``labkit: error: ...`` and exits 2.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
from pathlib import Path

from . import report as R
from . import validate as V

_LITERALS = {"true": True, "false": False, "null": None, "none": None}


def parse_value(text: str):
    """A parameter value from the command line: a Python/JSON literal (``32``, ``0.5``,
    ``True``/``true``, ``"elu"``, ``[1, 2]``), else the text itself as a string (``elu``)."""
    if text.lower() in _LITERALS:
        return _LITERALS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            return json.loads(text)
        except ValueError:
            return text


def benchmark_names() -> list[str]:
    folder = Path(__file__).resolve().parent / "benchmarks"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _params(pairs) -> dict:
    return {name: parse_value(value) for name, value in (pairs or [])}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="labkit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def params_opt(p):
        p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                       help="set a notebook parameter (a Python/JSON literal)")

    def real_text_opts(p):  # the real-text profile (labkit.classifiers.real_text_params)
        p.add_argument("--source-dir", default=None, metavar="DIR",
                       help="real text: a folder with mnli/ and qnli/ in GLUE's schema, "
                            "passed as source= to every notebook that trains a classifier")
        p.add_argument("--model", default=None, choices=["tiny", "minilm"],
                       help="backbone of those notebooks (default with --source-dir: minilm)")

    def report_opts(p):  # what `report` and `run` share: where, which profile, parameters
        p.add_argument("--out", default="reports", help="parent folder of report folders")
        p.add_argument("--profile", default="full", help="fast (test parameters) or full")
        real_text_opts(p)
        params_opt(p)
        p.add_argument("--bench-dir", default="results", metavar="DIR",
                       help="render the newest labkit bench results found here (if any)")

    p = sub.add_parser("report", help="execute notebooks into a new HTML report folder")
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                   help="notebook names or prefixes (default: all)")
    report_opts(p)

    p = sub.add_parser("run", help="execute one notebook with parameters into a report folder")
    p.add_argument("notebook", metavar="NOTEBOOK")
    report_opts(p)

    p = sub.add_parser("bench", help="run a benchmark: labkit/benchmarks/<NAME>.py")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quick", action="store_true", help="a few-seconds smoke run")
    p.add_argument("--out", default="results", help="folder for the results file "
                   "(bench-<name>-<UTC>.json; never overwritten)")

    p = sub.add_parser("plan", help="search the fastest (or smallest) compressed model within "
                                    "an accuracy budget, and save it")
    p.add_argument("--task", default="qnli", help="nli (MNLI) or qnli")
    p.add_argument("--source", default="synthetic", help="synthetic, hub, or a GLUE folder")
    p.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
    p.add_argument("--budget", type=float, default=1.0, help="accuracy points to give up")
    p.add_argument("--objective", default="latency", help="latency or bytes")
    p.add_argument("--minutes", type=float, default=10.0, help="search time")
    p.add_argument("--families", default=None, help="comma-separated technique families")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of training rows held out to choose on")
    p.add_argument("--save", default=None, metavar="DIR", help="save the chosen model here")
    p.add_argument("--out", default="results", help="folder for the rows and the summary")

    sub.add_parser("lab", help="start JupyterLab on the notebooks folder; other arguments "
                               "go to JupyterLab (--no-browser --port 8890)")
    return ap


def _report(args, notebooks) -> int:
    V.choice("profile", args.profile, ["full", "fast"])
    folder = R.report(notebooks, out=args.out, profile=args.profile, params=_params(args.param),
                      source_dir=args.source_dir, model=args.model,
                      bench_dir=args.bench_dir if Path(args.bench_dir).is_dir() else None)
    summary = json.loads((folder / "report.json").read_text())["notebooks"]
    failed = [n for n in summary if not n["ok"]]
    for n in summary:
        status = "ok" if n["ok"] else f"FAILED: {n['error']}"
        print(f"{n['notebook']}: {status}")
    print(f"report: {folder / 'index.html'}")
    if failed:
        config = all(n["error"].startswith("LabkitConfigError") for n in failed)
        for n in failed:
            print(f"labkit: error: {n['notebook']} failed: {n['error']}", file=sys.stderr)
        return 2 if config else 1
    return 0


def _bench(args) -> int:
    import pandas as pd

    name = V.choice("bench", args.name, benchmark_names())
    load_before = _load_average()
    result = importlib.import_module(f"labkit.benchmarks.{name}").run(quick=args.quick)
    saved = save_result(result, name, args.out, quick=args.quick,
                        load=(load_before, _load_average()))
    print(f"results: {saved}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(f"== {result['name']} ({'quick' if args.quick else 'full'})")
        print(pd.DataFrame(result["rows"]).to_string(index=False))
        targets = pd.DataFrame(result["targets"])
        if not targets.empty:
            targets["met"] = targets["met"].map(  # None: the benchmark says why in its note
                lambda m: {True: "met", False: "NOT met"}.get(m, "not measurable"))
            print("\ntargets")
            print(targets.to_string(index=False))
        env = result.get("env", {})
        print("\n" + ", ".join(f"{k}={v}" for k, v in env.items()))
    return 0


def _load_average():
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _stamp() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def save_result(result: dict, name: str, out, quick: bool = False, load=None) -> Path:
    """Write a benchmark's result with when, where and under what load it ran, to a new
    file ``out/bench-<name>-<UTC>.json`` (a second run in the same second gets ``-2``)."""
    from .measure import environment
    from .notebook import write_json_atomic

    folder = Path(out)
    stamp = _stamp()
    path = folder / f"bench-{name}-{stamp}.json"
    k = 2
    while path.exists():
        path = folder / f"bench-{name}-{stamp}-{k}.json"
        k += 1
    payload = {"bench": name, "quick": quick, "date": stamp, "load_average": load,
               "env": result.get("env") or environment(), "result": result}
    return write_json_atomic(path, payload)


def _plan(args) -> int:
    from . import classifiers as CL
    from . import plan as PL

    config = PL.PlanConfig(budget=args.budget, objective=args.objective,
                           search_minutes=args.minutes,
                           **({"families": args.families} if args.families else {}),
                           recover_lr=CL.DEFAULTS[V.choice("model", args.model, CL.MODELS)]
                           ["finetune_lr"])
    if args.save:
        from .saving import check_target

        check_target(args.save)
    folder = Path(args.out)
    stamp = _stamp()
    clf = CL.classifier(args.model, args.task, args.source, holdout=args.holdout)
    log = folder / f"plan-{args.model}-{args.task}-{stamp}.jsonl"
    result = PL.plan(clf.model, clf.workload, config, log=log,
                     on_row=lambda r: print(f"rung {r['rung']} {r['candidate']}: "
                                            f"{r['dev_drop_points']:+.1f} points, "
                                            f"{r['speedup']:.2f}x, bytes x{r['bytes_ratio']:.2f}"))
    from .notebook import write_json_atomic

    summary = folder / f"plan-{args.model}-{args.task}-{stamp}.json"
    write_json_atomic(summary, {"config": config.__dict__, "final": result.final,
                                "metrics": result.metrics, "load_average": _load_average()})
    for row in result.final:
        print(f"{row['model']}: {row['candidate']}: eval {row['eval_accuracy']:.4f} "
              f"(drop {row['drop_points']:+.2f} +- {row['drop_se_points']:.2f} points), "
              f"{row['speedup']:.2f}x, bytes x{row['bytes_ratio']:.3f}")
    if args.save:
        from .saving import save

        save(result.simulated, args.save, acceleration=result.acceleration,
             tokenizer=clf.task.tokenizer)
        print(f"saved: {args.save}")
    print(f"rows: {log}\nsummary: {summary}")
    return 0


def main(argv=None) -> int:
    ap = _parser()
    args, extra = ap.parse_known_args(argv)
    if extra and args.command != "lab":  # only `lab` passes arguments on (to JupyterLab)
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "report":
            return _report(args, args.notebooks or None)
        if args.command == "run":
            return _report(args, [args.notebook])
        if args.command == "bench":
            return _bench(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "lab":
            from .jupyterlab_app import lab

            return lab(R.notebooks_dir(), extra)
    except V.LabkitConfigError as e:
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
