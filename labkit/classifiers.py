"""The classifier every notebook starts from: ``model="tiny" | "minilm"`` on any source.

:func:`classifier` is what notebooks call. It returns a *trained* dense sentence-pair
classifier and the :class:`~labkit.labs.workloads.Workload` to fine-tune, evaluate and time it
on, cached once per machine (:func:`labkit.cache.cached`: keyed by the data's content, the
training arguments, labkit's code and torch; an unreadable file retrains with a
``CacheWarning``):

* ``model="tiny"``, ``source="synthetic"``: the tiny pre-norm encoder trained from scratch
  (:func:`labkit.zoo.trained_encoder`, the lab's offline default).
* ``model="tiny"`` on real text (a GLUE folder or the hub): the honest recipe for a model
  with no pretraining: dropout 0.1, weight decay 0.1, a vocabulary from the training text,
  and early stopping on the loss of a held-out tenth of the training rows (the reported
  accuracy is on the validation split, never the one training stopped on). On a few
  thousand real pairs it stays near chance: it has no language to start from.
* ``model="minilm"``: all-MiniLM-L6-v2 inside labkit's Transformer, fine-tuned with BERT's
  recipe (:func:`labkit.baselines.finetune`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import baselines as B
from . import data as D
from . import glue_files as G
from . import model as M
from . import train as T
from . import validate as V
from . import zoo
from .cache import cached
from .labs.workloads import Workload

MODELS = ("tiny", "minilm")
TASKS = ("nli", "qnli")

# Fine-tuning defaults per backbone (steps, lr, batch size, max_len). MiniLM: BERT's recipe,
# sized for a shared CPU (see the README for the accuracy it reaches and the cost).
DEFAULTS = {
    # finetune_lr: fine-tuning a compressed copy of the trained model (recovery, QAT)
    "tiny": {"steps": 3000, "lr": 1e-3, "batch_size": 32, "max_len": 64, "finetune_lr": 3e-4},
    # MiniLM: the best recipe measured on the development sample (README): 300 steps at
    # 1e-4 on every training row. Choosing the weights on a held-out tenth of train
    # (dev_fraction=0.1: eval every eval_fraction*steps, stop after `patience` evaluations
    # without a better held-out accuracy) is available; at 400 steps x 2e-4 it reached less.
    # Recovery fine-tuning uses the rate MiniLM was fine-tuned with.
    "minilm": {"steps": 300, "lr": 1e-4, "batch_size": 32, "max_len": 128,
               "dev_fraction": 0.0, "eval_fraction": 0.1, "patience": 3,
               "finetune_lr": 1e-4},
}
MAX_LR = {"tiny": 1.0, "minilm": 5e-4}  # a pretrained BERT is destroyed by tiny's 1e-3


@dataclass
class Classifier:
    """A trained dense baseline (field names as :class:`labkit.zoo.Baseline`) and its
    workload."""

    model: M.Transformer
    task: D.PairTask
    metrics: dict  # eval metrics of the trained model on the validation split
    steps: int
    cached: bool
    path: Path
    workload: Workload
    backbone: str  # "tiny" | "minilm"
    recipe: dict  # how it was trained: the cache's training arguments and seconds, and
    # "data": which source was read (describe_source)


def task_name(task: str, source: str) -> str:
    """``"nli"``/``"qnli"`` (or the data task names) to the data task for ``source``."""
    base = {"nli": "nli", "mnli": "nli", "synthetic-nli": "nli", "qnli": "qnli",
            "synthetic-qnli": "qnli"}.get(task)
    if base is None:
        raise V.LabkitConfigError("task", task, "one of 'nli', 'qnli' (or 'mnli', "
                                  "'synthetic-nli', 'synthetic-qnli')")
    if source == "synthetic":
        return f"synthetic-{base}"
    return "mnli" if base == "nli" else "qnli"


def describe_source(source: str, name: str) -> dict:
    """What ``source`` reads for data task ``name``: ``{"source": as given, "path": what is
    read, "form": ...}``. A folder may be the task's own (``.../mnli``: "the task's own
    folder") or hold task folders (``.../`` with ``mnli/``, ``qnli/``, what ``labkit report
    --source-dir`` passes: "a folder of task folders"), see
    :func:`labkit.glue_files.task_folder`; "hub" and "synthetic" pass through."""
    if source in ("hub", "synthetic") or name.startswith("synthetic"):
        return {"source": source, "path": source, "form": source}
    path, form = G.task_folder(source, name)
    return {"source": source, "path": str(path), "form": G.FOLDER_FORMS[form]}


def task_source(source: str, name: str) -> str:
    """``source`` for data task ``name`` (:func:`describe_source`'s path)."""
    return describe_source(source, name)["path"]


def sources_used(source: str, tasks) -> dict:
    """``{data task: "path (form)"}`` for the tasks a notebook reads from ``source``: what a
    notebook prints and records (``params["source_used"]``)."""
    out = {}
    for t in tasks:
        name = task_name(t, source)
        d = describe_source(source, name)
        out[name] = d["path"] if d["form"] == d["path"] else f"{d['path']} ({d['form']})"
    return out


# Notebook parameters whose sensible value depends on the backbone: left at 0 (or "" for
# text), they take the backbone's recipe (DEFAULTS[model][field]); given, they are checked
# against the backbone's limits. {parameter: recipe field}.
RECIPE_FIELDS = {"baseline_steps": "steps", "lr": "lr", "baseline_lr": "lr",
                 "finetune_lr": "finetune_lr", "qat_lr": "finetune_lr", "max_len": "max_len",
                 "seq_len": "max_len"}
_RECIPE_SPEC = {"steps": ("int", 0, None), "lr": ("float", 0.0, 1.0),
                "finetune_lr": ("float", 0.0, 1.0), "max_len": ("int", 0, 4096)}
# notebook 03's default workload: the decoder LM trained from scratch (no backbone)
LM_RECIPE = {"lr": 3e-3, "max_len": 32}


def recipe_spec(namespace: dict, *names: str, **as_field: str) -> dict:
    """The notebook's parameter spec (:func:`labkit.notebook.declared`) with ``names`` (and
    ``as_field`` parameters) allowed to be 0, meaning "the backbone's recipe"."""
    from .notebook import declared

    spec = declared(namespace)
    fields = {n: RECIPE_FIELDS[n] for n in names} | as_field
    spec.update({n: _RECIPE_SPEC[f] for n, f in fields.items()})
    return spec


def with_recipe(params: dict, *names: str, lm_task: bool = False, **as_field: str) -> dict:
    """``params`` (validated notebook parameters) with the backbone-dependent ones resolved,
    in one place for every notebook that takes ``model``:

    * ``names`` (parameters of :data:`RECIPE_FIELDS`) and ``as_field`` (``parameter=field``)
      left at 0 take ``DEFAULTS[model][field]``; given, a learning rate must be within
      ``MAX_LR[model]`` and a length at least 8;
    * ``task=""`` (with ``lm_task``, notebook 03): the decoder LM (``"lm"``, :data:`LM_RECIPE`)
      for tiny on synthetic data, else ``"nli"``;
    * ``source_used``: which form of ``source`` is read for the task (:func:`sources_used`).

    Returns a new dict; ``recipe_filled`` lists the parameters that took the recipe."""
    V.choice("model", params["model"], MODELS)
    out, filled = dict(params), []
    if lm_task and out.get("task") == "":
        lm = out["model"] == "tiny" and out.get("source", "synthetic") == "synthetic"
        out["task"] = "lm" if lm else "nli"
        filled.append("task")
    recipe = LM_RECIPE if out.get("task") == "lm" else DEFAULTS[out["model"]]
    limit = 1.0 if out.get("task") == "lm" else MAX_LR[out["model"]]
    for name, field in ({n: RECIPE_FIELDS[n] for n in names} | as_field).items():
        if out[name] == 0 and field in recipe:
            out[name] = recipe[field]
            filled.append(name)
        elif field in ("lr", "finetune_lr") and out[name] != 0:
            V.number(name, out[name], 0.0, limit, lo_open=True)
        elif field == "max_len" and out[name] != 0:
            V.integer(name, out[name], 8, 4096)
    if "source" in out and out.get("task") != "lm":
        tasks = out["tasks"].split(",") if "tasks" in out else [out.get("task", "nli")]
        out["source_used"] = sources_used(out["source"], [t.strip() for t in tasks if t.strip()])
    out["recipe_filled"] = filled
    return out


def recipe_note(params: dict) -> str:
    """One line saying what :func:`with_recipe` filled and which data is read."""
    filled = ", ".join(f"{n}={params[n]}" for n in params.get("recipe_filled", ()))
    used = "; ".join(f"{t} from {p}" for t, p in params.get("source_used", {}).items())
    return (f"{params['model']}'s recipe: {filled or 'nothing left to fill'}"
            + (f" | data: {used}" if used else ""))


def real_text_params(defined: dict, source_dir: str | None, model: str | None) -> dict:
    """Parameter overrides of the real-text report profile for a notebook whose parameters
    are ``defined``: ``source=<source_dir>`` and ``model=<model>`` where the notebook has
    them (a notebook without a ``source`` parameter runs as it is)."""
    if source_dir is None:
        if model is not None and "model" in defined:
            V.choice("model", model, MODELS)
            return {"model": model}
        return {}
    root = Path(source_dir).expanduser()
    if not root.is_dir() or not any((root / t).is_dir() for t in ("mnli", "qnli")):
        raise V.LabkitConfigError("source_dir", source_dir,
                                  "a folder holding mnli/ and/or qnli/ GLUE-schema folders")
    out = {"source": str(root.resolve())} if "source" in defined else {}
    if str(defined.get("task", "")).strip("'\"") == "lm" and "source" in defined:
        out["task"] = "nli"  # an LM-first notebook runs its classifier workload on real text
    if "model" in defined:
        # the rest (lr, max_len, baseline_steps, ...) left at 0 in the notebook takes the
        # backbone's recipe there (with_recipe)
        out["model"] = V.choice("model", model or "minilm", MODELS)
    return out


CacheWarning = zoo.CacheWarning  # a cached classifier could not be used; it is retrained


def _cached(name: str, args: dict, pairs: D.PairTask, model: M.Transformer, train_fn,
            cache_dir) -> tuple[dict, bool, Path]:
    """Load ``model``'s trained weights from the cache or run ``train_fn() -> (metrics,
    extra)`` and save them. Returns (record, cached, path)."""
    def compute() -> dict:
        metrics, extra = train_fn()
        return {"config": asdict(model.cfg), "state": model.state_dict(), "metrics": metrics,
                "args": args, **extra}

    # keyed by the training rows only: training never sees the eval split (it stops on a
    # held-out part of train), so one trained model serves any eval subset (n_eval)
    got = cached(name, {**args, "data": zoo.data_digest(replace(pairs, eval={}))}, compute,
                 folder=cache_dir, check=zoo.same_config(model.cfg))
    if got.hit:
        model.load_state_dict(got.value["state"])
    return got.value, got.hit, got.path


def _finetune_minilm(pairs: D.PairTask, args: dict, progress: bool):
    from . import pretrained as PT

    model = PT.minilm_transformer(num_labels=pairs.num_labels, max_len=args["max_len"],
                                  seed=args["seed"])

    def train():
        recipe = B.FinetuneConfig(
            steps=args["steps"], lr=args["lr"], batch_size=args["batch_size"],
            warmup=args["warmup"], weight_decay=args["weight_decay"], bf16=args["bf16"],
            eval_every=args["eval_every"], seed=args["seed"],
            dev_fraction=args["dev_fraction"], patience=args["patience"],
            metric=args["stop_metric"])
        r = B.finetune(model, pairs, recipe, progress=progress)
        # without a dev split the last step's weights are kept (best_step = steps trained)
        return r.final, {"seconds": r.seconds, "history": r.history,
                         "best_step": getattr(r, "best_step", r.steps),
                         "dev": getattr(r, "dev", {})}
    return model, train


def _train_tiny_real(pairs: D.PairTask, args: dict, progress: bool):
    cfg = M.preset("tiny", kind="encoder", num_labels=pairs.num_labels,
                   vocab_size=len(pairs.tokenizer), max_len=args["max_len"],
                   dropout=args["dropout"])
    model = M.build(cfg, seed=args["seed"])

    def train():
        fit_part, dev = B.split_dev(pairs.train, 0.1, seed=args["seed"])
        stop = B.EarlyStopping(model, patience=args["patience"])
        r = T.fit(model, D.batches(fit_part, args["batch_size"], seed=args["seed"]),
                  steps=args["steps"], lr=args["lr"], weight_decay=args["weight_decay"],
                  eval_fn=lambda: T.evaluate(model, dev), eval_every=args["eval_every"],
                  callbacks=[stop], seed=args["seed"], progress=progress)
        best = stop.restore()
        final = T.evaluate(model, pairs.eval)
        return final, {"seconds": r.seconds, "history": r.history, "best_step": best,
                       "dev": {"loss": stop.best}}
    return model, train


def classifier(model: str = "tiny", task: str = "nli", source: str = "synthetic", *,
               steps: int | None = None, lr: float | None = None,
               batch_size: int | None = None, max_len: int | None = None,
               n_train: int | None = None, n_eval: int | None = None,
               vocab_size: int | None = None, bf16: bool = False, seed: int = 0,
               holdout: float = 0.0, progress: bool = True, cache_dir=None) -> Classifier:
    """A trained dense pair classifier (cached) and its workload; see the module docstring.

    ``None`` arguments take the backbone's :data:`DEFAULTS` (``vocab_size``: the word
    vocabulary's default in :func:`labkit.data.load_task`; tiny only).

    ``holdout``: a seeded fraction of the training rows kept out of training, here and in
    the workload's batches: ``workload.dev_set``, the rows to choose among compressed models
    on (the planner does), so the eval split is only ever reported on."""
    vocab = {} if vocab_size is None else {"vocab_size": vocab_size}
    V.choice("model", model, MODELS)
    name = task_name(task, source)
    data = describe_source(source, name)
    source = data["path"]
    d = DEFAULTS[model]
    steps, lr = steps or d["steps"], lr or d["lr"]
    batch_size, max_len = batch_size or d["batch_size"], max_len or d["max_len"]
    V.integer("steps", steps, 1)
    V.integer("batch_size", batch_size, 1)
    V.number("lr", lr, 0.0, MAX_LR[model], lo_open=True)
    V.number("holdout", holdout, 0.0, 0.5)
    if model == "tiny" and source == "synthetic" and holdout == 0:
        base = zoo.trained_encoder(name, source=source, steps=steps, lr=lr,
                                   batch_size=batch_size, n_train=n_train or 4000,
                                   n_eval=n_eval or 500, max_len=max_len, seed=seed,
                                   progress=progress, cache_dir=cache_dir, **vocab)
        wl = _workload(base.model, base.task, batch_size, trimmed=False)
        return Classifier(base.model, base.task, base.metrics, steps, base.cached, base.path,
                          wl, model, {"recipe": "zoo.trained_encoder", "steps": steps,
                                      "data": data})
    if model == "minilm":
        from . import pretrained as PT

        if not PT.minilm_available():
            raise PT.PretrainedUnavailable(PT.INSTALL_HINT)
        pairs = D.load_task(name, source=source, n_train=n_train, n_eval=n_eval,
                            max_len=max_len, seed=seed, tokenizer=PT.PairTokenizer())
        pairs, dev = _hold_out(pairs, holdout, seed)
        args = dict(backbone="minilm", task=name, steps=steps, lr=lr, batch_size=batch_size,
                    max_len=max_len, bf16=bf16, seed=seed, warmup=0.1, weight_decay=0.01,
                    dev_fraction=d["dev_fraction"], stop_metric="accuracy",
                    patience=d["patience"], eval_every=max(1, round(steps * d["eval_fraction"]))
                    if d["dev_fraction"] > 0 else steps, **({"holdout": holdout} if holdout else {}))
        net, train = _finetune_minilm(pairs, args, progress)
    else:
        real = source != "synthetic"
        pairs = D.load_task(name, source=source, n_train=n_train or (None if real else 4000),
                            n_eval=n_eval or (None if real else 500), max_len=max_len,
                            seed=seed, **vocab)
        pairs, dev = _hold_out(pairs, holdout, seed)
        if not real:  # the offline task: the zoo's recipe, on the rows left for training
            args = dict(backbone="tiny", task=name, steps=steps, lr=lr, batch_size=batch_size,
                        max_len=max_len, seed=seed, holdout=holdout)
            net = M.build(M.preset("tiny", kind="encoder", num_labels=pairs.num_labels,
                                   vocab_size=len(pairs.tokenizer), max_len=max_len), seed=seed)
            record, cached, path = _cached(f"classifier-tiny-{name}", args, pairs, net,
                                           _zoo_recipe(net, pairs, args, progress), cache_dir)
            net.eval()
            return Classifier(net, pairs, T.evaluate(net, pairs.eval), steps, cached, path,
                              _workload(net, pairs, batch_size, False, dev=dev), model, args)
        args = dict(backbone="tiny-real", task=name, steps=steps, lr=lr,
                    batch_size=batch_size, max_len=max_len, seed=seed, dropout=0.1,
                    weight_decay=0.1, patience=3, eval_every=max(steps // 20, 1),
                    **({"holdout": holdout} if holdout else {}))
        net, train = _train_tiny_real(pairs, args, progress)
    record, cached, path = _cached(f"classifier-{model}-{name}", args, pairs, net, train,
                                   cache_dir)
    net.eval()
    metrics = record["metrics"]
    if cached:  # the weights depend on the training rows only: score this eval split
        score = B.evaluate if model == "minilm" else T.evaluate
        metrics = score(net, pairs.eval)
    recipe = {**args, **{k: record[k] for k in ("seconds", "best_step", "dev") if k in record},
              "data": data}
    return Classifier(net, pairs, metrics, steps, cached, path,
                      _workload(net, pairs, batch_size, trimmed=model == "minilm", dev=dev),
                      model, recipe)


def _hold_out(pairs: D.PairTask, fraction: float, seed: int):
    """``(pairs without the held-out rows in train, held-out rows or None)``."""
    if not fraction:
        return pairs, None
    fit_rows, dev = B.split_dev(pairs.train, fraction, seed=seed)
    return replace(pairs, train=fit_rows), dev


def _zoo_recipe(net, pairs, args, progress):
    """The offline baseline's recipe (:func:`labkit.zoo.trained_encoder`'s), as a cached
    training function."""
    def train():
        r = T.fit(net, D.batches(pairs.train, args["batch_size"], seed=args["seed"]),
                  steps=args["steps"], lr=args["lr"], seed=args["seed"], progress=progress)
        return T.evaluate(net, pairs.eval), {"seconds": r.seconds}
    return train


def _sorted_batches(rows: dict, eval_batch: int) -> list[dict]:
    """Rows as length-sorted batches trimmed to their longest pair (same metrics, far less
    padding compute)."""
    from .pretrained import trim

    order = torch.argsort((~rows["padding_mask"]).sum(1))
    return [trim({k: v[order[i: i + eval_batch]] for k, v in rows.items()})
            for i in range(0, len(order), eval_batch)]


def _workload(net: M.Transformer, pairs: D.PairTask, batch_size: int, trimmed: bool,
              eval_batch: int = 64, dev: dict | None = None) -> Workload:
    """Batches for fine-tuning copies of ``net``; the eval set (and ``dev``, rows held out
    of training) as length-sorted, trimmed batches for a pretrained tokenizer."""
    ev = pairs.eval
    if trimmed:
        from .pretrained import trim

        eval_set = _sorted_batches(ev, eval_batch)
        dev_set = None if dev is None else _sorted_batches(dev, eval_batch)
        make = lambda s: B.trimmed_batches(pairs.train, batch_size, seed=s)
        sample = trim({k: v[:batch_size] for k, v in ev.items()})
    else:
        eval_set = ev
        make = lambda s: D.batches(pairs.train, batch_size, seed=s)
        sample = {k: v[:batch_size] for k, v in ev.items()}
        dev_set = dev
    return Workload("nli", net.cfg, make, eval_set,
                    (sample["input_ids"], sample["padding_mask"]), dev_set)
