"""Trained dense baselines, trained once per machine and cached in a user cache folder.

Compression is applied to a *trained* model: pruning, quantizing or swapping the attention of
a model that never learned its task measures nothing. The synthetic NLI task needs a few
thousand steps of the tiny encoder (about 1,000 to get past what the hypothesis alone tells,
then it learns to find the hypothesis' object in the premise), more than a notebook should
spend on every run. So the dense
baseline is trained here, deterministically from its arguments, saved atomically, and
loaded by every later run with the same key (a few milliseconds).

The cache (:func:`labkit.cache.cached`) is keyed by what the weights depend on: the
*content* of the tokenised train and eval tensors and the vocabulary (not the folder path:
edited data retrains), every training argument, labkit's code and torch's version. A cache
file that cannot be read (truncated, corrupt, another model config) is retrained with a
:class:`~labkit.cache.CacheWarning`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data as D
from . import model as M
from . import train as T
from . import validate as V
from .cache import CacheWarning, cached, default_cache_dir, digest  # noqa: F401 - re-exported


def data_digest(task: D.PairTask) -> str:
    """A digest of the task's content: vocabulary, label names and every tensor."""
    return digest(task.tokenizer.vocab, list(task.labels), task.train, task.eval)


def same_config(cfg) -> Callable[[dict], None]:
    """A ``check`` for :func:`labkit.cache.cached`: the record was trained with ``cfg``."""
    def check(saved: dict) -> None:
        if saved["config"] != asdict(cfg):
            raise ValueError("its model config differs from this one")
    return check


@dataclass
class Baseline:
    model: M.Transformer
    task: D.PairTask
    metrics: dict  # eval metrics of the trained model
    steps: int
    cached: bool  # True when loaded rather than trained in this call
    path: Path


def trained_encoder(task: str = "synthetic-nli", source: str = "synthetic", preset: str = "tiny",
                    steps: int = 1500, lr: float = 1e-3, batch_size: int = 32,
                    n_train: int = 4000, n_eval: int = 500, max_len: int = 64, seed: int = 0,
                    progress: bool = True, cache_dir: Path | None = None,
                    vocab_size: int = D.VOCAB_SIZE) -> Baseline:
    """A dense encoder classifier trained on ``task`` (cached). Returns model, data, metrics.

    ``vocab_size`` caps the word vocabulary (see :func:`labkit.data.load_task`)."""
    V.integer("steps", steps, 1)
    args = dict(task=task, preset=preset, steps=steps, lr=lr, batch_size=batch_size,
                n_train=n_train, n_eval=n_eval, max_len=max_len, seed=seed,
                vocab_size=vocab_size)
    pairs = D.load_task(task, source=source, n_train=n_train, n_eval=n_eval, max_len=max_len,
                        seed=seed, vocab_size=vocab_size)
    cfg = M.preset(preset, kind="encoder", num_labels=pairs.num_labels,
                   vocab_size=len(pairs.tokenizer), max_len=max_len)
    model = M.build(cfg, seed=seed)

    def train() -> dict:
        result = T.fit(model, D.batches(pairs.train, batch_size, seed=seed), steps=steps,
                       lr=lr, seed=seed, eval_fn=lambda: T.evaluate(model, pairs.eval),
                       eval_every=steps, progress=progress)
        return {"config": asdict(cfg), "state": model.state_dict(), "metrics": result.final,
                "args": {**args, "source": source}}

    got = cached(f"encoder-{task}-{preset}", {**args, "data": data_digest(pairs)}, train,
                 folder=cache_dir, check=same_config(cfg))
    if got.hit:
        model.load_state_dict(got.value["state"])
        model.eval()
    return Baseline(model, pairs, got.value["metrics"], steps, got.hit, got.path)
