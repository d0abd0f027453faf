"""Trained dense baselines, trained once per machine and cached in a user cache folder.

Compression is applied to a *trained* model: pruning, quantizing or swapping the attention of
a model that never learned its task measures nothing. The synthetic NLI task needs a few
thousand steps of the tiny encoder (about 1,000 to get past what the hypothesis alone tells,
then it learns to find the hypothesis' object in the premise), more than a notebook should
spend on every run. So the dense
baseline is trained here, deterministically from its arguments, saved atomically, and
loaded by every later run with the same key (a few milliseconds).

The cache key is a hash of what the weights depend on: the *content* of the tokenised train
and eval tensors and the vocabulary (not the folder path: edited data retrains), every
training argument, labkit's version plus a digest of the code that builds and trains the
model (model.py, train.py, data.py), and the torch version. A cache file that cannot be read
(truncated, corrupt, from another layout) is retrained with a :class:`CacheWarning`.

The folder is ``$LABKIT_CACHE`` or the user cache folder (``~/.cache/labkit`` on Linux;
:func:`default_cache_dir`), never beside the installed package.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from . import data as D
from . import model as M
from . import train as T
from . import validate as V
from .notebook import atomic_write


class CacheWarning(UserWarning):
    """A cache file could not be used; the baseline is retrained."""


def default_cache_dir() -> Path:
    """``$LABKIT_CACHE``, else the platform's user cache folder for labkit."""
    env = os.environ.get("LABKIT_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("labkit", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs comes with jupyter
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "labkit"


@dataclass
class Baseline:
    model: M.Transformer
    task: D.PairTask
    metrics: dict  # eval metrics of the trained model
    steps: int
    cached: bool  # True when loaded rather than trained in this call
    path: Path


_CODE = ("model.py", "train.py", "data.py")


def code_version(files: tuple[str, ...] = _CODE) -> str:
    """labkit's version and a digest of the sources (paths under labkit/) the trained
    weights depend on."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in files:
        h.update((here / name).read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def data_digest(task: D.PairTask) -> str:
    """A hash of the task's content: vocabulary, label names and every tensor."""
    h = hashlib.sha256(json.dumps([task.tokenizer.vocab, list(task.labels)]).encode())
    for split in (task.train, task.eval):
        for name in sorted(split):
            t = split[name].contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(args: dict, task: D.PairTask | None = None,
              code: tuple[str, ...] = _CODE) -> str:
    """The cache key of a trained model: its training arguments, the data's content (when
    ``task`` is given), labkit's code version over ``code`` and torch's version."""
    blob = json.dumps({**args, "data": data_digest(task) if task is not None else None,
                       "code": code_version(code), "torch": torch.__version__.split("+")[0]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _key(args: dict, task: D.PairTask) -> str:
    return cache_key(args, task)


def load_checkpoint(path: Path, cfg=None, what: str = "baseline") -> dict | None:
    """The saved checkpoint, or None (with a CacheWarning) when it cannot be used: missing
    keys, a truncated file, or (when ``cfg`` is given) another model config."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if cfg is not None and saved["config"] != asdict(cfg):
            raise ValueError("its model config differs from this one")
        return saved
    except Exception as e:  # noqa: BLE001 - any unreadable cache means: train again
        warnings.warn(f"{what} cache {path} is unusable ({type(e).__name__}: {str(e)[:200]});"
                      " retraining and replacing it", CacheWarning, stacklevel=3)
        return None


_load = load_checkpoint


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
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"encoder-{task}-{preset}-{_key(args, pairs)}.pt"
    model = M.build(cfg, seed=seed)
    saved = _load(path, cfg) if path.is_file() else None
    if saved is not None:
        model.load_state_dict(saved["state"])
        model.eval()
        return Baseline(model, pairs, saved["metrics"], steps, True, path)
    result = T.fit(model, D.batches(pairs.train, batch_size, seed=seed), steps=steps, lr=lr,
                   seed=seed, eval_fn=lambda: T.evaluate(model, pairs.eval),
                   eval_every=steps, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    # write then rename: a crash or a parallel run never leaves a half-written file
    atomic_write(path, lambda tmp: torch.save({"config": asdict(cfg), "state": model.state_dict(),
                                               "metrics": result.final, "args": {**args, "source": source}}, tmp))
    return Baseline(model, pairs, result.final, steps, False, path)
