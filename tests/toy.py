"""A toy sentence-pair-shaped task a small encoder learns in a few hundred steps (the label is
the second token mod 3), for tests of recovery and the planner that need a teacher that
learned something, in seconds."""
from __future__ import annotations

import torch

from labkit import model as M
from labkit import train as T
from labkit.labs.workloads import Workload

VOCAB, N = 64, 12


def rows(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, N), generator=g)
    ids[:, 0] = 2  # [CLS]
    # one token decides: (ids1 + ids2) mod 3 was learnt on one CPU and stayed at chance on
    # another (same seed, other rounding), which left the teacher nothing to teach
    labels = ids[:, 1] % 3
    return {"input_ids": ids, "padding_mask": torch.zeros(n, N, dtype=torch.bool),
            "labels": labels}


def batches(seed: int, size: int = 32):
    i = 0
    while True:
        yield rows(size, 1000 * seed + i)
        i += 1


def config(**overrides) -> M.ModelConfig:
    return M.ModelConfig(**{"vocab_size": VOCAB, "d_model": 32, "n_layers": 3, "n_heads": 4,
                            "d_ff": 64, "max_len": N, "num_labels": 3, **overrides})


def teacher(steps: int = 300, **overrides) -> M.Transformer:
    model = M.build(config(**overrides), seed=0)
    T.fit(model, batches(7), steps, lr=3e-3, progress=False)
    return model.eval()


def workload(cfg: M.ModelConfig, make=batches) -> Workload:
    sample = rows(32, 98)
    return Workload("nli", cfg, make, rows(512, 99), (sample["input_ids"],
                                                      sample["padding_mask"]), rows(256, 97))
