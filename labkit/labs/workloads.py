"""What a notebook trains and measures on: the decoder LM or the encoder on synthetic NLI.

A :class:`Workload` bundles a model config sized for the data, a seeded batch stream, an
eval set for :func:`labkit.train.evaluate`, and a sample batch ``(ids, padding_mask or
None)`` for latency, memory and FLOP counts, so every technique notebook measures alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import data
from .. import validate as V
from ..model import ModelConfig, preset

TASKS = ("lm", "nli")


@dataclass
class Workload:
    """What a variant trains and is evaluated on."""

    task: str
    cfg: ModelConfig
    make_batches: object  # seed -> endless iterator of training batches
    eval_set: object  # a dict of tensors or a list of batches, for labkit.train.evaluate
    sample: tuple  # (ids, padding mask or None): a batch for latency and FLOP counts
    # rows held out of training (never in make_batches), for choosing among models without
    # touching the eval split; None when the workload has none
    dev_set: object = None


def workload(task: str = "lm", size: str = "tiny", batch_size: int = 16, seq_len: int = 32,
             n_train: int = 2000, n_eval: int = 256, seed: int = 0,
             vocab_size: int = data.VOCAB_SIZE) -> Workload:
    """The decoder LM (``"lm"``: :func:`labkit.data.load_lm_corpus`) or the encoder on
    ``synthetic-nli`` (``"nli"``: :func:`labkit.data.load_task`), with a preset's sizes and
    a word vocabulary of at most ``vocab_size`` (specials included)."""
    V.choice("task", task, TASKS)
    V.integer("batch_size", batch_size, 1)
    V.integer("seq_len", seq_len, 8)
    V.integer("vocab_size", vocab_size, len(data.SPECIALS) + 1, 1_000_000)  # as load_task
    if task == "lm":
        corpus = data.load_lm_corpus(seed=seed, vocab_size=vocab_size)
        cfg = preset(size, kind="decoder", vocab_size=len(corpus.tokenizer),
                     max_len=max(seq_len, 8))
        gen = data.lm_batches(corpus.eval, batch_size, seq_len, seed=seed + 1)
        eval_set = [next(gen) for _ in range(max(1, n_eval // batch_size))]
        ids = eval_set[0]["input_ids"]
        return Workload(task, cfg, lambda s: data.lm_batches(corpus.train, batch_size, seq_len,
                                                             seed=s),
                        eval_set, (ids, None))
    pairs = data.load_task("synthetic-nli", n_train=n_train, n_eval=n_eval, max_len=seq_len,
                           seed=seed, vocab_size=vocab_size)
    cfg = preset(size, kind="encoder", vocab_size=len(pairs.tokenizer),
                 num_labels=pairs.num_labels, max_len=max(seq_len, 8))
    ev = pairs.eval
    return Workload(task, cfg, lambda s: data.batches(pairs.train, batch_size, seed=s), ev,
                    (ev["input_ids"][:batch_size], ev["padding_mask"][:batch_size]))
