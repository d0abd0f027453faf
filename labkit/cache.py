"""One cache for what labkit trains or computes once per machine.

``cached(kind, args, compute)`` returns ``compute()``'s record (a dict of tensors and plain
values), saved atomically in labkit's cache folder. The key is ``args`` (callers put content
digests of their data and base model there, :func:`digest`), the content of every module of
the labkit package that runs, and torch's version. Keying on the whole package is coarse (an
edit anywhere retrains) but never stale: a hand-written list of the files a result depends
on misses the one that changed (measure.py, kernels/). A file that cannot be read, or whose
record ``check`` refuses, is recomputed with a :class:`CacheWarning`.

The folder is ``$LABKIT_CACHE`` or the user cache folder (``~/.cache/labkit`` on Linux),
never beside the installed package.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import __version__
from .notebook import atomic_write

PACKAGE = Path(__file__).resolve().parent  # read at each call: a test points it at a copy


class CacheWarning(UserWarning):
    """A cache file could not be used; what it held is computed again."""


class Cached(NamedTuple):
    value: dict  # what compute() returned, now or on an earlier run
    hit: bool  # True when loaded rather than computed in this call
    path: Path


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


@cache
def package_digest(root: Path) -> str:
    """labkit's version and a digest of every module under ``root`` (relative path and
    bytes). Computed once per process: the code that runs is the code imported."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"


def digest(*objs) -> str:
    """A digest of content: modules (their state), tensors (shape, dtype, bytes), dicts
    (sorted by key), lists and plain JSON values, nested."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.nn.Module):
            o = o.state_dict()
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(json.dumps(str(k)).encode() + b":")
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for x in o:
                feed(x)
            h.update(b"]")
        else:
            h.update(json.dumps(o, default=str).encode())

    for o in objs:
        feed(o)
    return h.hexdigest()[:16]


def key(kind: str, args: dict) -> str:
    """The cache key of ``kind`` computed from ``args`` by this labkit and this torch."""
    blob = json.dumps({"kind": kind, "args": args, "code": package_digest(PACKAGE),
                       "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(path: Path, check: Callable[[dict], None] | None, kind: str) -> dict | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a {type(saved).__name__}, not a record")
        if check is not None:
            check(saved)
        return saved
    except Exception as e:  # noqa: BLE001 - any unreadable cache means: compute again
        warnings.warn(f"{kind} cache {path} is unusable ({type(e).__name__}: {str(e)[:200]});"
                      " retraining and replacing it", CacheWarning, stacklevel=3)
        return None


def cached(kind: str, args: dict, compute: Callable[[], dict], *,
           folder: Path | str | None = None,
           check: Callable[[dict], Any] | None = None) -> Cached:
    """``compute()`` once per machine for ``(kind, args)``; see the module docstring.
    ``check(record)`` raises when a loaded record cannot serve (e.g. another model config)."""
    if not re.fullmatch(r"[\w.+-]+", kind):
        raise ValueError(f"cache kind={kind!r} is not allowed: letters, digits and . + - _ "
                         "only (it names the file)")
    path = Path(folder if folder is not None else default_cache_dir()) / \
        f"{kind}-{key(kind, args)}.pt"
    if path.is_file():
        saved = _load(path, check, kind)
        if saved is not None:
            return Cached(saved, True, path)
    record = compute()
    # write then rename: a crash or a parallel run never leaves a half-written file
    atomic_write(path, lambda tmp: torch.save(record, tmp))
    return Cached(record, False, path)
