"""Trained dense baselines, trained once per machine and cached under ``data/cache/``.

Compression is applied to a *trained* model: pruning, quantizing or swapping the attention of
a model that never learned its task measures nothing. The synthetic NLI task needs about
1,500 steps of the tiny encoder to clear chance clearly (two-hop matching: find the object,
then compare its colour), more than a notebook should spend on every run. So the dense
baseline is trained here, deterministically from its arguments, saved atomically, and
loaded by every later run with the same arguments (a few milliseconds).

The cache key covers every argument and the torch version; delete ``data/cache/`` to retrain.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data as D
from . import model as M
from . import train as T
from . import validate as V
from .notebook import atomic_write

CACHE_DIR = Path(os.environ.get("LABKIT_CACHE", D.DATA_DIR / "cache"))


@dataclass
class Baseline:
    model: M.Transformer
    task: D.PairTask
    metrics: dict  # eval metrics of the trained model
    steps: int
    cached: bool  # True when loaded rather than trained in this call
    path: Path


def _key(args: dict) -> str:
    blob = json.dumps({**args, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_encoder(task: str = "synthetic-nli", source: str = "synthetic", preset: str = "tiny",
                    steps: int = 1500, lr: float = 1e-3, batch_size: int = 32,
                    n_train: int = 4000, n_eval: int = 500, max_len: int = 64, seed: int = 0,
                    progress: bool = True, cache_dir: Path | None = None) -> Baseline:
    """A dense encoder classifier trained on ``task`` (cached). Returns model, data, metrics."""
    V.integer("steps", steps, 1)
    args = dict(task=task, source=source, preset=preset, steps=steps, lr=lr,
                batch_size=batch_size, n_train=n_train, n_eval=n_eval, max_len=max_len, seed=seed)
    pairs = D.load_task(task, source=source, n_train=n_train, n_eval=n_eval, max_len=max_len,
                        seed=seed)
    cfg = M.preset(preset, kind="encoder", num_labels=pairs.num_labels,
                   vocab_size=len(pairs.tokenizer), max_len=max_len)
    folder = Path(cache_dir or CACHE_DIR)
    path = folder / f"encoder-{task}-{preset}-{_key(args)}.pt"
    model = M.build(cfg, seed=seed)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["config"] == asdict(cfg):
            model.load_state_dict(saved["state"])
            model.eval()
            return Baseline(model, pairs, saved["metrics"], steps, True, path)
    result = T.fit(model, D.batches(pairs.train, batch_size, seed=seed), steps=steps, lr=lr,
                   seed=seed, eval_fn=lambda: T.evaluate(model, pairs.eval),
                   eval_every=steps, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    # write then rename: a crash or a parallel run never leaves a half-written file
    atomic_write(path, lambda tmp: torch.save({"config": asdict(cfg), "state": model.state_dict(),
                                               "metrics": result.final, "args": args}, tmp))
    return Baseline(model, pairs, result.final, steps, False, path)
