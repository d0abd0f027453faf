"""CQIL across 2 gloo ranks on encoders with padding and segment embeddings: pre-norm, and
BERT-style post-norm blocks (MiniLM's shape), against the one-process CQIL model's logits;
a bypass on post-norm blocks is refused before any process starts."""
import copy

import pytest
import torch

from labkit.dist import launch
from labkit.model import build, preset
from labkit.techniques import CQILConfig, apply_
from labkit.techniques import cqil_dist as CD
from labkit.validate import LabkitConfigError

BERT = {"norm_position": "post", "type_vocab_size": 2}


def _inputs(cfg, rows=3, n=14):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (rows, n), generator=g)
    ids[:, 0], ids[:, 6] = 2, cfg.sep_token_id  # [CLS] a [SEP] b
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask[1, 10:] = True  # a shorter row, padded
    mask[2, 8:] = True
    ids[mask] = 0
    types = (torch.arange(n) > 8).long().expand(rows, n).clone()  # not what [SEP] gives
    return ids, mask, types


@pytest.mark.parametrize("style,groups,given_types", [
    ({}, [[1, 4, 0], [1, 4, 1]], True),  # pre-norm, with and without the bypass
    (BERT, [[1, 4, 0], [0, 2, 0]], True),  # post-norm + segments, types given
    (BERT, [[1, 4, 0]], False)])  # post-norm, segment ids derived from [SEP]
def test_across_processes_equals_the_one_process_model(tmp_path, style, groups, given_types):
    m = build(preset("tiny", vocab_size=100, n_layers=4, **style))
    m.eval()
    ids, mask, types = _inputs(m.cfg)
    types = types if given_types else None
    CD.save_job(tmp_path / "job.pt", m, ids, mask, types)
    launch("labkit.techniques.cqil_dist:run",
           {"model": str(tmp_path / "job.pt"), "groups": groups, "n_layers": 4, "reps": 1,
            "rounds": 1, "save_outputs": True},
           nproc=2, run_dir=tmp_path / "run", validate=CD.validate, timeout=60)
    for s, e, d in groups:
        got = torch.load(tmp_path / "run" / f"cqil-{s}-{e}-{d}.pt")
        one = apply_(copy.deepcopy(m), CQILConfig(start=s, end=e, P=2, D=d))
        with torch.no_grad():
            want = one(ids, mask, types)
            assert (got - want).abs().max() <= 1e-5, (s, e, d)
            # the padding mask and the segments reach every rank: without them, other logits
            assert (one(ids) - want).abs().max() > 1e-4


def test_bypass_on_post_norm_blocks_is_refused_before_start(tmp_path):
    m = build(preset("tiny", vocab_size=100, n_layers=4, **BERT))
    ids, mask, types = _inputs(m.cfg)
    CD.save_job(tmp_path / "job.pt", m, ids, mask, types)
    with pytest.raises(LabkitConfigError, match=r"D=1 is not allowed: expected 0 for "
                                                r"post-norm"):
        launch("labkit.techniques.cqil_dist:run",
               {"model": str(tmp_path / "job.pt"), "groups": [[1, 4, 1]], "n_layers": 4},
               nproc=2, validate=CD.validate)
    with pytest.raises(LabkitConfigError, match="D=2"):
        CD.check_block_style("post", 2)
    CD.check_block_style("pre", 2)  # the bypass is defined for pre-norm blocks
