"""What notebooks 08 (LayerDrop, early exit) and 09 (CQIL) share.

* :func:`trained_lm` / :func:`trained_sdn`: the trained depth baselines (a decoder LM with
  or without LayerDrop; an encoder with SDN exits), trained once per machine and cached
  (:func:`labkit.cache.cached`: keyed by every argument, labkit's code and torch's
  version; an unreadable file retrains),
  with their loss history so a cached run still draws its curves.
* :func:`pointer_task`: the SDN's default task, where depth matters: follow ``k`` pointers
  through a row of slots, so a row needs ``k + 1`` dependent reads (about one block each).
* :func:`prune_rows`, :func:`exit_rows`, :func:`cqil_rows`: the sweeps; :func:`paired_latency`:
  every variant timed side by side (:func:`labkit.measure.paired`).
* :func:`exit_choice`: the exit threshold chosen on the calibration rows, measured on the test
  rows, with its verdict (:func:`labkit.techniques.early_exit.verdict`).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .. import data as D
from .. import measure
from .. import model as M
from .. import train as T
from .. import validate as V
from ..cache import cached
from ..techniques import (
    CQILConfig,
    EarlyExitConfig,
    LayerDropConfig,
    LayerPruneConfig,
    LoRAConfig,
    apply_,
)
from ..techniques import cqil as C
from ..techniques import early_exit as E
from ..techniques.layerdrop import evenly_spread


@dataclass
class Trained:
    model: M.Transformer
    history: list  # {"step", "split", "loss", ...} rows, as trained
    metrics: dict  # final eval metrics
    cached: bool
    path: Path
    eval_set: object  # what metrics were computed on
    data: object  # the corpus or the pair task


def _replay(board, series: str, history: list) -> None:
    if board is None:
        return
    for h in history:
        if h["split"] == "train" and "loss" in board.panels:
            board.log("loss", series, h["step"], h["loss"])
        elif h["split"] == "eval":
            for k, v in h.items():
                if k in board.panels and k not in ("step", "split", "seconds"):
                    board.log(k, f"{series} eval", h["step"], v)
    board.flush()


def _train_or_load(name, args, model, fit_kwargs, eval_fn, board, series, eval_set, data):
    def train() -> dict:
        cbs = [board.callback("loss", series, every=5)] if board is not None else []
        res = T.fit(model, eval_fn=eval_fn, callbacks=cbs, progress=False, **fit_kwargs)
        return {"state": model.state_dict(), "history": res.history, "metrics": res.final,
                "args": args}

    got = cached(f"depth-{name}", args, train)
    if got.hit:  # the board draws the curves the cached run trained through
        model.load_state_dict(got.value["state"])
        _replay(board, series, got.value["history"])
    model.eval()
    return Trained(model, got.value["history"], got.value["metrics"], got.hit, got.path,
                   eval_set, data)


def trained_lm(n_layers: int = 8, p: float = 0.0, steps: int = 400, size: str = "tiny",
               seq_len: int = 32, batch_size: int = 16, lr: float = 3e-3, n_eval: int = 256,
               seed: int = 0, board=None, series: str = "") -> Trained:
    """A decoder LM of ``n_layers`` trained with LayerDrop rate ``p`` (0: plain), cached.
    The returned model runs every block (the default executor)."""
    V.integer("n_layers", n_layers, 2)
    V.number("p", p, 0.0, 1.0, hi_open=True)
    V.integer("steps", steps, 1)
    args = {"kind": "lm", "n_layers": n_layers, "p": p, "steps": steps, "size": size, "seq_len": seq_len,
                "batch_size": batch_size, "lr": lr, "n_eval": n_eval, "seed": seed}
    corpus = D.load_lm_corpus(seed=seed)
    cfg = M.preset(size, kind="decoder", n_layers=n_layers, vocab_size=len(corpus.tokenizer),
                   max_len=seq_len)
    model = M.build(cfg, seed=seed)
    gen = D.lm_batches(corpus.eval, batch_size, seq_len, seed=seed + 1)
    eval_set = [next(gen) for _ in range(max(1, n_eval // batch_size))]
    if p > 0:
        apply_(model, LayerDropConfig(p=p))
    out = _train_or_load(f"lm{n_layers}-p{p}", args, model,
                         {"train_batches": D.lm_batches(corpus.train, batch_size, seq_len,
                                                         seed=seed),
                              "steps": steps, "lr": lr, "seed": seed, "eval_every": max(1, steps // 5)},
                         lambda: T.evaluate(model, eval_set), board,
                         series or f"LayerDrop p={p}", eval_set, corpus)
    model.set_executor(M.BlockExecutor())  # every block at inference
    return out


# ---- a task where depth matters ---------------------------------------------------------

POINTER_TASK = "pointer-hops"


def _pointer_row(rng: random.Random, label: int, slots: int, hops: tuple) -> dict:
    """Draw until the row's label is ``label`` (balanced classes)."""
    while True:
        k = rng.choice(hops)
        vals = [rng.randrange(slots) for _ in range(slots)]
        at = 0
        for _ in range(k):
            at = vals[at]  # follow the pointer stored in the slot
        if int(vals[at] >= slots // 2) == label:
            return {"question": f"hop{k}", "sentence": " ".join(f"d{v}" for v in vals),
                    "label": label, "hops": k}


def pointer_rows(n: int, seed: int, part: str | None = None, slots: int = 8,
                 hops: tuple = (1, 2)) -> list[dict]:
    """Rows of the pointer task. Sentence: ``slots`` digits ``d0 .. d{slots-1}``, slot ``i``
    holding a pointer to a slot; question ``hop{k}``. Start at slot 0, follow ``k`` pointers;
    the label is whether the value found there is in the upper half (1, "high") or not.

    Why depth matters: the slot to read next is only known once the previous read is done,
    so ``k`` hops are ``k + 1`` dependent reads and one attention layer does about one read.
    An exit after block 1 is near chance on the pointer it cannot follow; later exits answer
    ``hop1`` rows, then ``hop2`` rows. ``part`` as in :func:`labkit.data.in_eval_part`: eval
    rows never appear in train."""
    V.integer("slots", slots, 2, 64)
    if not isinstance(hops, (tuple, list)) or not hops:
        raise V.LabkitConfigError("hops", hops, "a non-empty tuple of hop counts >= 0")
    for k in hops:
        V.integer("hops", k, 0, slots)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        r = _pointer_row(rng, len(rows) % 2, slots, tuple(hops))
        if part is None or D.in_eval_part(r["question"], r["sentence"]) == (part == "eval"):
            rows.append(r)
    rng.shuffle(rows)
    return rows


def pointer_task(n_train: int = 8000, n_eval: int = 500, seed: int = 0, slots: int = 8,
                 hops: tuple = (1, 2), max_len: int = 48) -> D.PairTask:
    """:func:`pointer_rows` tokenised as a sentence pair (``[CLS] hop{k} [SEP] d.. [SEP]``);
    ``eval["hops"]`` keeps each held-out row's hop count."""
    train = pointer_rows(n_train, seed * 1000 + 1, "train", slots, hops)
    evals = pointer_rows(n_eval, seed * 1000 + 2, "eval", slots, hops)
    tok = D.WordTokenizer.fit(r[c] for r in train for c in ("question", "sentence"))

    def encode(rows):
        seqs = [tok.encode_pair(r["question"], r["sentence"], max_len) for r in rows]
        ids = torch.full((len(seqs), max(map(len, seqs))), D.PAD, dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, :len(q)] = torch.tensor(q)
        return {"input_ids": ids, "padding_mask": ids == D.PAD,
                "labels": torch.tensor([r["label"] for r in rows])}

    ev = encode(evals)
    ev["hops"] = torch.tensor([r["hops"] for r in evals])
    return D.PairTask(POINTER_TASK, ("low", "high"), tok, encode(train), ev, max_len)


def trained_sdn(n_layers: int = 6, steps: int = 1500, size: str = "tiny",
                task: str = POINTER_TASK, n_train: int = 8000, n_eval: int = 500,
                max_len: int = 48, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                board=None, series: str = "SDN") -> Trained:
    """An encoder with an internal classifier after every block, trained jointly with the
    SDN loss (weights growing over training), cached. ``task``: :data:`POINTER_TASK` (the
    default: depth matters, :func:`pointer_task`) or a :func:`labkit.data.load_task` task.
    ``eval_set``: held-out rows (the first half calibrates temperatures and chooses the exit
    threshold, the second measures, see :func:`split_eval`)."""
    V.integer("n_layers", n_layers, 2)
    V.integer("steps", steps, 1)
    args = {"kind": "sdn", "n_layers": n_layers, "steps": steps, "size": size, "task": task,
                "n_train": n_train, "n_eval": n_eval, "max_len": max_len, "batch_size": batch_size, "lr": lr,
                "seed": seed}
    pairs = pointer_task(n_train, n_eval, seed, max_len=max_len) if task == POINTER_TASK \
        else D.load_task(task, n_train=n_train, n_eval=n_eval, max_len=max_len, seed=seed)
    cfg = M.preset(size, kind="encoder", n_layers=n_layers, vocab_size=len(pairs.tokenizer),
                   num_labels=pairs.num_labels, max_len=max_len)
    model = M.build(cfg, seed=seed)
    apply_(model, EarlyExitConfig(q=0.9))
    return _train_or_load(f"sdn{n_layers}", args, model,
                          {"train_batches": D.batches(pairs.train, batch_size, seed=seed),
                               "steps": steps, "lr": lr, "seed": seed, "eval_every": max(1, steps // 5),
                               "strategy": E.SDNStrategy(steps)},
                          lambda: T.evaluate(model, pairs.eval), board, series, pairs.eval,
                          pairs)


def split_eval(tensors: dict) -> tuple[dict, dict]:
    """Held-out rows in two halves: calibration, then test."""
    n = len(tensors["labels"]) // 2
    return ({k: v[:n] for k, v in tensors.items()}, {k: v[n:] for k, v in tensors.items()})


def eval_loss(model, eval_set) -> float:
    return T.evaluate(model, eval_set)["loss"]


def paired_latency(fns: dict, rounds: int = 3, min_run_time: float = 0.1) -> dict:
    """``{name: row}``: every callable timed side by side (the first is the reference)."""
    with torch.inference_mode():
        res = measure.paired(fns, rounds=rounds, min_run_time=min_run_time)
    return {r["variant"]: r for r in res.rows()}


# ---- LayerDrop ------------------------------------------------------------------------

def pruned(model, keep) -> M.Transformer:
    """A copy of ``model`` with only the ``keep`` blocks (real removal)."""
    return apply_(copy.deepcopy(model), LayerPruneConfig(keep=tuple(keep)))


def prune_rows(models: dict, kept_counts, eval_set, sample, rounds: int = 3,
               min_run_time: float = 0.05) -> list[dict]:
    """Quality, parameters and side-by-side batch-``sample`` latency of every model in
    ``models`` (``{label: trained model}``) pruned to each count in ``kept_counts``."""
    rows, fns = [], {}
    for label, model in models.items():
        n = len(model.blocks)
        for k in kept_counts:
            keep = evenly_spread(n, k)
            m = pruned(model, keep)
            rows.append({"model": label, "blocks_kept": k, "kept": list(keep),
                         "eval_loss": eval_loss(m, eval_set), "params": M.count_params(m)})
            if label == next(iter(models)):  # the same architecture: time it once
                fns[f"{k} blocks"] = partial(m, *sample)
    lat = paired_latency(fns, rounds, min_run_time)
    for r in rows:
        t = lat[f"{r['blocks_kept']} blocks"]
        r.update(latency_ms=t["median_ms"], speedup=t["speedup"])
    return rows


# ---- early exit -----------------------------------------------------------------------

def exit_rows(model, test: dict, qs, calibrated: bool) -> list[dict]:
    """Per threshold q: simulated and measured (batched, per-sample masks) accuracy and
    mean blocks executed on ``test``; the two must agree."""
    ex = model.executor
    ex.calibrated = calibrated
    z, y = E.exit_logits(model, test)
    rows = []
    for q in qs:
        sim = E.simulate(z, y, q, ex.exits, ex.n_layers, ex.temps())
        ex.q = q
        logits, blocks = E.predict(model, test["input_ids"], test["padding_mask"])
        rows.append({"q": q, "calibrated": calibrated, "accuracy": sim["accuracy"],
                     "blocks": sim["blocks"],
                     "measured_accuracy": float((logits.argmax(-1) == y).float().mean()),
                     "measured_blocks": float(blocks.float().mean())})
    return rows


def exit_choice(model, calib: dict, test: dict, qs, calibrated: bool, required: float = 1.5,
                max_loss: float = 0.01) -> dict:
    """The exit threshold chosen on ``calib`` (:func:`early_exit.choose_q`: fewest blocks
    within ``max_loss`` of the final head there), then run for real on ``test`` and judged
    there (:func:`early_exit.verdict`; ``required``: the blocks ratio asked for)."""
    ex = model.executor
    ex.calibrated = calibrated
    z, y = E.exit_logits(model, calib)
    best = E.choose_q(z, y, qs, ex.exits, ex.n_layers, ex.temps(), max_loss)
    zt, yt = E.exit_logits(model, test)
    first, final = zt[0].argmax(-1) == yt, zt[-1].argmax(-1) == yt
    chosen = blocks = None
    if best is not None:
        ex.q = best["q"]
        logits, blocks = E.predict(model, test["input_ids"], test["padding_mask"])
        chosen = logits.argmax(-1) == yt
    v = E.verdict(first, final, chosen, blocks, ex.n_layers, required, max_loss)
    mean = (lambda t: None if t is None else float(t.float().mean()))
    return {"q": best["q"] if best else None, "calibrated": calibrated,
            "calib_rows": len(y), "test_rows": len(yt),
            "calib_full_accuracy": float((z[-1].argmax(-1) == y).float().mean()),
            "calib_accuracy": best["accuracy"] if best else None,
            "calib_blocks": best["blocks"] if best else None,
            "first_exit_accuracy": mean(first), "full_accuracy": mean(final),
            "exit_accuracy": mean(chosen), "exit_blocks": mean(blocks), **v}


def exit_latency(model, test: dict, qs, batch: int = 64, singles: int = 16, rounds: int = 3,
                 min_run_time: float = 0.05, calibrated: bool = False) -> list[dict]:
    """Measured latency of early exit at each q vs the full model, side by side: a batch of
    ``batch`` rows, and ``singles`` rows one at a time (batch 1)."""
    ex = model.executor
    ex.calibrated = calibrated
    ids, mask = test["input_ids"], test["padding_mask"]
    full = copy.deepcopy(model)
    full.set_executor(M.BlockExecutor())  # the model without exit heads

    def plain(rows_):
        def go():
            for r in rows_:
                full(ids[r], mask[r])
        return go

    def run(q, rows_):
        def go():
            ex.q = q
            for r in rows_:
                E.predict(model, ids[r], mask[r])
        return go

    out = []
    for scope, rows_ in (("batch", [slice(0, batch)]),
                         ("batch 1", [slice(i, i + 1) for i in range(singles)])):
        fns = {"full": plain(rows_), **{f"q={q}": run(q, rows_) for q in qs}}
        lat = paired_latency(fns, rounds, min_run_time)
        for q in qs:
            t = lat[f"q={q}"]
            out.append({"scope": scope, "q": q, "calibrated": calibrated,
                        "latency_ms": t["median_ms"], "full_ms": lat["full"]["median_ms"],
                        "speedup": t["speedup"], "speedup_min": t["speedup_min"],
                        "speedup_max": t["speedup_max"]})
    return out


def calibration_rows(model, calib: dict, test: dict) -> tuple[list[dict], dict]:
    """ECE per exit before/after fitting temperatures on ``calib``; reliability bins of the
    first exit before and after. Leaves calibration on."""
    z_cal, y_cal = E.exit_logits(model, calib)
    t = E.fit_temperatures(z_cal, y_cal)
    model.executor.temperature.copy_(t)
    model.executor.calibrated = True
    z, y = E.exit_logits(model, test)
    rows, bins = [], {}
    for k in range(z.shape[0]):
        before = E.reliability(z[k].softmax(-1), y)
        after = E.reliability((z[k] / t[k]).softmax(-1), y)
        rows.append({"exit": k, "after_block": (list(model.executor.exits) + [len(
            model.blocks) - 1])[k] + 1, "temperature": float(t[k]), "ece_before": before["ece"],
            "ece_after": after["ece"], "accuracy": float((z[k].argmax(-1) == y).float().mean())})
        if k == 0:
            bins = {"before": before["bins"], "after": after["bins"]}
    return rows, bins


# ---- CQIL -----------------------------------------------------------------------------

def minilm_similarity(n: int = 32):
    """Adjacent-layer input similarity of the pretrained MiniLM on real sentences, or
    ``(None, reason)`` when the extra is missing."""
    from .. import pretrained as P

    if not P.minilm_available():
        return None, P.INSTALL_HINT
    model, tok = P.load_minilm()
    batch = P.encode(tok, P.sentences(n))
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[:-1]  # block inputs
    keep = batch["attention_mask"].bool()
    flat = torch.stack([torch.nn.functional.normalize(h, dim=-1)[keep] for h in hs])
    return torch.einsum("itd,jtd->ij", flat, flat) / flat.shape[1], "all-MiniLM-L6-v2"


def recover(model, teacher, batches, steps: int, rank: int, temperature: float, lr: float,
            full: bool = False, board=None, series: str = ""):
    """Self-distillation from ``teacher`` through LoRA adapters of ``rank`` (or a full
    fine-tune); adapters are merged afterwards, so inference costs nothing extra."""
    if not full:
        apply_(model, LoRAConfig(rank=rank))
    cbs = [board.callback("loss", series, every=5)] if board is not None else []
    res = T.fit(model, batches, steps=steps, lr=lr, strategy=C.DistillStrategy(teacher,
                temperature), callbacks=cbs, progress=False)
    if not full:
        C.merge_lora_(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return res


def cqil_rows(base: Trained, dropped_from: dict, starts, ps, end: int, recovery_steps: int,
              rank: int, temperature: float, lr: float, d: int = 0, board=None,
              seed: int = 0) -> list[dict]:
    """Eval loss of CQIL, CQIL + recovery, and dropping the same number of blocks from the
    group (from each model in ``dropped_from``) at each start layer and P."""
    n = len(base.model.blocks)
    corpus = base.data
    rows = [{"variant": "sequential", "start": None, "P": 1, "blocks_saved": 0,
             "ideal_cut": 0.0, "eval_loss": eval_loss(base.model, base.eval_set)}]
    for start in starts:
        for p in ps:
            if p > end - start:
                continue
            saved = (end - start) - len(C.steps_of(start, end, p))
            common = {"start": start, "end": end, "P": p, "D": d, "blocks_saved": saved,
                      "ideal_cut": C.ideal_cut(n, start, end, p)}
            m = apply_(copy.deepcopy(base.model), CQILConfig(start=start, end=end, P=p, D=d))
            rows.append({"variant": "CQIL", **common, "eval_loss": eval_loss(m, base.eval_set)})
            if recovery_steps:
                recover(m, base.model, D.lm_batches(corpus.train, 16, base.model.cfg.max_len,
                                                    seed=seed + 7),
                        recovery_steps, rank, temperature, lr, board=board,
                        series=f"recovery s={start} P={p}")
                rows.append({"variant": "CQIL + recovery", **common,
                             "eval_loss": eval_loss(m, base.eval_set)})
            keep = drop_keep(n, start, end, saved)
            for label, model in dropped_from.items():
                rows.append({"variant": f"drop {saved} ({label})", **common, "keep": keep,
                             "eval_loss": eval_loss(pruned(model, keep), base.eval_set)})
    return rows


def drop_keep(n: int, start: int, end: int, saved: int) -> list[int]:
    """The blocks kept when ``saved`` blocks, evenly spread in ``[start, end)``, are dropped."""
    group = list(range(start, end))
    drop = {group[i] for i in evenly_spread(len(group), saved)} if saved else set()
    return [i for i in range(n) if i not in drop]


def cqil_group(base: Trained, start: int, end: int, p: int, d: int, recovery_steps: int,
               rank: int, temperature: float, lr: float, full: bool = False, board=None,
               seed: int = 0) -> dict:
    """Eval loss of the sequential model, of CQIL on ``[start, end)`` and (with
    ``recovery_steps``) after recovery; the ideal latency cut."""
    m = apply_(copy.deepcopy(base.model), CQILConfig(start=start, end=end, P=p, D=d))
    row = {"start": start, "end": end, "P": p, "D": d,
           "sequential_loss": eval_loss(base.model, base.eval_set),
           "cqil_loss": eval_loss(m, base.eval_set),
           "ideal_cut": C.ideal_cut(len(base.model.blocks), start, end, p)}
    if recovery_steps:
        recover(m, base.model, D.lm_batches(base.data.train, 16, base.model.cfg.max_len,
                                            seed=seed + 7),
                recovery_steps, rank, temperature, lr, full=full, board=board,
                series=f"[{start},{end}) P={p} D={d}")
        row["recovered_loss"] = eval_loss(m, base.eval_set)
    return row


def attach_latency(rows: list[dict], model, sample, process_rows: list[dict], rounds: int = 3,
                   min_run_time: float = 0.05) -> list[dict]:
    """Add ``measured_speedup`` and ``ideal_speedup`` to quality rows: CQIL's from the
    cross-process measurement (``process_rows`` of :func:`cqil_dist.summarize`), dropped
    models' timed side by side with the sequential model in this process."""
    drops = {tuple(r["keep"]): pruned(model, r["keep"]) for r in rows if "keep" in r}
    fns = {"sequential": lambda: model(*sample),
           **{str(k): partial(m, *sample) for k, m in drops.items()}}
    lat = paired_latency(fns, rounds, min_run_time)
    cut = {(r["start"], r["P"]): r["latency_cut"] for r in process_rows}
    for r in rows:
        if "keep" in r:
            r["measured_speedup"] = lat[str(tuple(r["keep"]))]["speedup"]
        elif r["variant"] == "sequential":
            r["measured_speedup"] = 1.0
        else:
            c = cut.get((r["start"], r["P"]))
            r["measured_speedup"] = 1 / (1 - c) if c is not None else None
        r["ideal_speedup"] = 1 / (1 - r["ideal_cut"])
    return rows
