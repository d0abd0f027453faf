"""Activation-aware pruning scores predict the removal error exactly (one unit at a time),
bias compensation keeps the mean output, and bad calibration input is refused."""
import copy

import pytest
import torch
import torch.nn.functional as F

from labkit import model as M
from labkit.techniques import SparsityConfig, apply_
from labkit.techniques import importance as IM
from labkit.techniques import sparsity as S
from labkit.validate import LabkitConfigError


def _mlp_and_tokens(seed=0):
    torch.manual_seed(seed)
    mlp = M.MLP(16, 24)
    with torch.no_grad():
        mlp.up.bias.normal_(0, 1.0)
    return mlp, torch.randn(500, 16) * 2


@pytest.mark.parametrize("compensate", [False, True])
def test_neuron_score_is_the_exact_error_of_removing_that_neuron(compensate):
    mlp, x = _mlp_and_tokens()
    a = F.gelu(mlp.up(x)).detach()  # (T, d_ff), what down receives
    m = IM.Moments()
    m.add(a)
    scores = IM.neuron_scores(m, mlp.down.weight, compensate)
    full = mlp.down(a)
    for j in range(a.shape[1]):
        cut = a.clone()
        cut[:, j] = a[:, j].mean() if compensate else 0.0  # compensation = the mean kept
        err = (mlp.down(cut) - full).pow(2).sum(-1).mean()
        assert float(scores[j]) == pytest.approx(float(err), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("compensate", [False, True])
def test_head_score_is_the_exact_error_of_removing_that_head(compensate):
    torch.manual_seed(1)
    attn = M.Attention(16, 4)
    with torch.no_grad():
        attn.v.bias.normal_(0, 1.0)
    y = torch.randn(300, 16)  # the input of attn.o: 4 heads x 4 dims
    stats = {}

    class Model(torch.nn.Module):
        cfg = None

        def forward(self, ids, mask=None, tt=None):
            return attn.o(y)

    stats = IM.collect(Model(), [{"input_ids": torch.zeros(1, 1, dtype=torch.long)}],
                       heads={"a": attn})["a"]
    scores = IM.head_scores(stats, compensate)
    full = attn.o(y)
    for h in range(4):
        cut = y.clone()
        block = slice(4 * h, 4 * h + 4)
        cut[:, block] = 0.0
        out = attn.o(cut)
        if compensate:
            out = out + (full - out).mean(0)  # the removed head's mean output, folded back
        err = (out - full).pow(2).sum(-1).mean()
        assert float(scores[h]) == pytest.approx(float(err), rel=1e-3, abs=1e-6)


def test_wanda_score_is_weight_magnitude_times_input_rms():
    w = torch.randn(5, 3)
    x = torch.randn(40, 3)
    m = IM.Moments()
    m.add(x)
    want = w.abs() * x.pow(2).mean(0).sqrt()
    assert torch.allclose(IM.wanda_scores(m, w), want, atol=1e-6)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    m = M.build(M.ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                              max_len=24, num_labels=3, **overrides), seed=seed)
    with torch.no_grad():  # larger weights and biases: units differ in what they output
        for p in m.parameters():
            p.mul_(8) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.5)
    return m


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, 24), generator=g)
    mask = torch.zeros(n, 24, dtype=torch.bool)
    mask[:, 18:] = True
    return {"input_ids": ids, "padding_mask": mask}


def test_padding_tokens_do_not_count():
    m = _model()
    b = _data(8)
    stats = IM.collect(m, [b], neurons={"blocks.0.ffn": m.blocks[0].ffn})
    assert stats["blocks.0.ffn"].n == int((~b["padding_mask"]).sum())


def _ffn_mean(model, batch):
    seen = []
    h = model.blocks[0].ffn.register_forward_hook(
        lambda mod, a, out: seen.append(out[~batch["padding_mask"]].mean(0)))
    with torch.no_grad():
        model(batch["input_ids"], batch["padding_mask"])
    h.remove()
    return seen[0]


@pytest.mark.parametrize("score", ["weight", "activation"])
def test_compensation_keeps_the_ffn_mean_output_on_calibration_rows(score):
    dense, cal = _model(), _data()
    pruned = copy.deepcopy(dense)
    apply_(pruned, SparsityConfig(sparsity=0.5, structure="neuron", score=score,
                                  compensate=True), calibration=[cal])
    assert S.actual_sparsity(pruned) == pytest.approx(0.5)
    # pre-norm block 0 sees the same input in both: its FFN's mean output is kept
    assert torch.allclose(_ffn_mean(pruned, cal), _ffn_mean(dense, cal), atol=1e-4)


def _error(model, ref, batch):
    with torch.no_grad():
        out = model.features(batch["input_ids"], batch["padding_mask"])
    return float((out - ref)[~batch["padding_mask"]].pow(2).mean())


@pytest.mark.parametrize("structure,parts", [("neuron", ("ffn",)), ("head", ("attn",))])
def test_activation_aware_compensated_pruning_beats_weight_magnitude(structure, parts):
    dense, cal, held = _model(), _data(seed=0), _data(seed=1)
    with torch.no_grad():
        ref = dense.features(held["input_ids"], held["padding_mask"])
    errs = {}
    for score, comp in (("weight", False), ("activation", True)):
        m = copy.deepcopy(dense)
        cfg = SparsityConfig(sparsity=0.5, structure=structure, parts=parts, score=score,
                             compensate=comp)
        apply_(m, cfg, calibration=[cal] if cfg.needs_data else None)
        errs[score] = _error(m, ref, held)
    assert errs["activation"] < 0.5 * errs["weight"], errs


def test_bad_calibration_and_configs_are_refused():
    m = _model()
    cfg = SparsityConfig(sparsity=0.5, structure="neuron", score="activation")
    with pytest.raises(LabkitConfigError, match="calibration"):
        apply_(copy.deepcopy(m), cfg)
    with pytest.raises(LabkitConfigError, match="vocab_size"):
        apply_(copy.deepcopy(m), cfg, calibration=[{"input_ids": torch.full((2, 4), 500)}])
    with pytest.raises(LabkitConfigError, match="calibration"):
        apply_(copy.deepcopy(m), cfg, calibration=[])
    with pytest.raises(LabkitConfigError, match="calibration"):
        apply_(copy.deepcopy(m), SparsityConfig(sparsity=0.5), calibration=[_data()])
    with pytest.raises(LabkitConfigError, match="compensate"):
        SparsityConfig(structure="unstructured", compensate=True)
    with pytest.raises(LabkitConfigError, match="score"):
        SparsityConfig(structure="neuron", method="gradual", score="activation")
    with pytest.raises(LabkitConfigError, match="score"):
        SparsityConfig(score="movement")
    decoder = M.build("tiny", kind="decoder")  # SwiGLU: down has no bias
    with pytest.raises(LabkitConfigError, match="compensate"):
        apply_(decoder, SparsityConfig(structure="neuron", compensate=True),
               calibration=[{"input_ids": torch.randint(5, 100, (2, 8))}])
