import dataclasses
import itertools

import pytest
import torch
from torch import nn

from labkit import accounting, measure
from labkit.model import MLP, build, count_params, preset
from labkit.techniques import factorized_ffn as FF
from labkit.techniques.registry import apply_, expected
from labkit.validate import LabkitConfigError

KINDS = ("encoder", "decoder")


def _ids(cfg, b=2, n=16):
    torch.manual_seed(1)
    return torch.randint(6, cfg.vocab_size, (b, n))


# ------------------------------------------------------------------ LowRankLinear

def test_lowrank_linear_computes_x_v_ut_plus_b():
    torch.manual_seed(0)
    lin = FF.LowRankLinear(12, 20, rank=5)
    nn.init.normal_(lin.bias)
    x = torch.randn(3, 7, 12)
    want = x @ (lin.U @ lin.V.T).T + lin.bias
    torch.testing.assert_close(lin(x), want)
    assert lin(x).shape == (3, 7, 20)
    assert sum(p.numel() for p in lin.parameters()) == 5 * (12 + 20) + 20
    assert FF.LowRankLinear(12, 20, 5, bias=False).bias is None


def test_random_init_matches_dense_init_scale():
    torch.manual_seed(0)
    lin = FF.LowRankLinear(256, 1024, rank=64)
    std = lin.dense_weight().std().item()
    assert 0.7 * FF.DENSE_INIT_STD < std < 1.3 * FF.DENSE_INIT_STD


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
def test_full_rank_svd_reproduces_dense(shape):
    torch.manual_seed(0)
    dense = nn.Linear(shape[1], shape[0])
    nn.init.normal_(dense.bias)
    low = FF.LowRankLinear.from_linear(dense, rank=min(shape), init="svd")
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low.dense_weight(), dense.weight, atol=1e-5, rtol=1e-4)


def test_svd_init_error_falls_with_rank_and_is_optimal():
    torch.manual_seed(0)
    dense = nn.Linear(32, 48, bias=False)
    nn.init.normal_(dense.weight)
    errs = []
    for r in (1, 2, 4, 8, 16, 24, 32):
        low = FF.LowRankLinear.from_linear(dense, r, "svd")
        err = (low.dense_weight() - dense.weight).norm() / dense.weight.norm()
        errs.append(err.item())
        # equals the Eckart-Young tail of the singular values
        assert err.item() == pytest.approx(FF.svd_error(dense.weight, r), abs=1e-4)
        # and beats a random rank-r factorisation of the same size
        rnd = torch.randn(48, r) @ torch.randn(r, 32)
        scale = (rnd * dense.weight).sum() / rnd.square().sum()  # best scalar fit
        assert err.item() <= ((scale * rnd - dense.weight).norm() / dense.weight.norm()).item()
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert errs[-1] < 1e-5


def test_random_from_linear_keeps_bias_not_weights():
    torch.manual_seed(0)
    dense = nn.Linear(8, 16)
    nn.init.normal_(dense.bias)
    low = FF.LowRankLinear.from_linear(dense, 4, "random")
    torch.testing.assert_close(low.bias, dense.bias)
    assert FF.svd_error(dense.weight, 4) < (low.dense_weight() - dense.weight).norm() / dense.weight.norm()


# ------------------------------------------------------------------ apply / expected

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_params_analytic_equals_counted(kind, rank):
    cfg = preset("tiny", kind=kind)
    dense = build(cfg)
    assert count_params(dense) == accounting.params(cfg)
    model = apply_(build(cfg), FF.FactorizedFFNConfig(rank=rank))
    e = expected(cfg, FF.FactorizedFFNConfig(rank=rank))
    assert count_params(model) == e["params_after"]
    assert e["params_before"] == count_params(dense)
    assert measure.model_bytes(model)["total"] == e["bytes_after"]
    # the per-MLP formula of the docstring: 2 r (d + d_ff) a matrix pair, 3 matrices if gated
    d, f = cfg.d_model, cfg.d_ff
    mats = 3 if kind == "decoder" else 2
    bias = 0 if kind == "decoder" else d + f
    for block in model.blocks:
        assert sum(p.numel() for p in block.ffn.parameters()) == mats * rank * (d + f) + bias
    ffn = e["parts"]["ffn"]
    assert ffn["params_ratio"] == pytest.approx(ffn["params_before"] / ffn["params_after"])
    assert ffn["params_after"] == cfg.n_layers * (mats * rank * (d + f) + bias)


@pytest.mark.parametrize("kind", KINDS)
def test_flops_analytic_equals_measured(kind):
    cfg = preset("tiny", kind=kind)
    conf = FF.FactorizedFFNConfig(rank=8)
    ids = _ids(cfg)
    dense, low = build(cfg), apply_(build(cfg), conf)
    e = expected(cfg, conf)
    tokens = ids.numel()
    ffn = e["parts"]["ffn"]
    per_token = {k: ffn[k] // e["seq_len"] for k in ("flops_before", "flops_after")}
    saved = measure.forward_flops(dense, ids) - measure.forward_flops(low, ids)
    assert saved == tokens * (per_token["flops_before"] - per_token["flops_after"])
    # one FFN alone: exactly the analytic per-token FLOPs
    x = torch.randn(2, 16, cfg.d_model)
    per_layer = per_token["flops_after"] // cfg.n_layers
    assert measure.flops(lambda: low.blocks[0].ffn(x)) == tokens * per_layer
    assert ffn["flops_ratio"] == pytest.approx(
        (cfg.d_model * cfg.d_ff) / (8 * (cfg.d_model + cfg.d_ff)))


@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_svd_model_reproduces_dense_model(kind):
    cfg = preset("tiny", kind=kind)
    ids = _ids(cfg)
    dense = build(cfg, seed=3).eval()
    low = apply_(build(cfg, seed=3), FF.FactorizedFFNConfig(rank=min(cfg.d_model, cfg.d_ff),
                                                            init="svd")).eval()
    with torch.no_grad():
        torch.testing.assert_close(low(ids), dense(ids), atol=1e-4, rtol=1e-4)
    assert all(isinstance(b.ffn.up, FF.LowRankLinear) for b in low.blocks)


def test_svd_model_output_error_falls_with_rank():
    cfg = preset("tiny", kind="decoder")
    ids = _ids(cfg)
    dense = build(cfg, seed=0).eval()
    with torch.no_grad():  # give the FFN weights some structure beyond the tiny random init
        for b in dense.blocks:
            for lin in (b.ffn.up, b.ffn.gate, b.ffn.down):
                lin.weight.mul_(20)
        ref = dense(ids)
        errs = []
        for r in (4, 16, 32, 64):
            low = apply_(build(cfg, seed=0), FF.FactorizedFFNConfig(rank=r, init="svd"))
            for b in low.blocks:
                for name in ("up", "gate", "down"):
                    lin = getattr(b.ffn, name)
                    lin.U.mul_(20 ** 0.5)
                    lin.V.mul_(20 ** 0.5)
            errs.append(((low.eval()(ids) - ref).norm() / ref.norm()).item())
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-4


def test_layers_subset_and_forward_signature():
    cfg = preset("small", kind="encoder")
    conf = FF.FactorizedFFNConfig(rank=16, layers=(1, 3))
    model = apply_(build(cfg), conf)
    kinds = [type(b.ffn.up).__name__ for b in model.blocks]
    assert kinds == ["Linear", "LowRankLinear", "Linear", "LowRankLinear"]
    assert count_params(model) == expected(cfg, conf)["params_after"]
    ids = _ids(cfg)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, -3:] = True
    assert model(ids, mask).shape == (2, cfg.num_labels)
    assert model.applied_techniques[-1]["rank"] == 16
    assert isinstance(model.blocks[1].ffn, MLP)


def test_training_updates_factors():
    cfg = preset("tiny", kind="decoder")
    model = apply_(build(cfg), FF.FactorizedFFNConfig(rank=8))
    before = model.blocks[0].ffn.up.U.detach().clone()
    ids = _ids(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}).backward()
    assert model.blocks[0].ffn.up.U.grad is not None and model.blocks[0].ffn.up.V.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.blocks[0].ffn.up.U)


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("field,kwargs", [
    ("rank", {"rank": 0}), ("rank", {"rank": -3}), ("rank", {"rank": 2.5}),
    ("init", {"rank": 4, "init": "kaiming"}), ("layers", {"rank": 4, "layers": (1, 1)}),
    ("layers", {"rank": 4, "layers": (0, -1)}), ("layers", {"rank": 4, "layers": "x"}),
    ("parts", {"rank": 4, "parts": ("attn",)}), ("parts", {"rank": 4, "parts": ()}),
])
def test_bad_config_names_field(field, kwargs):
    with pytest.raises(LabkitConfigError) as e:
        FF.FactorizedFFNConfig(**kwargs)
    assert e.value.name == field and field in str(e.value)


def test_init_error_lists_allowed():
    with pytest.raises(LabkitConfigError, match="'random', 'svd'"):
        FF.FactorizedFFNConfig(rank=4, init="orthogonal")


def test_rank_above_dimension_raises_on_apply_and_expected():
    cfg = preset("tiny")  # d=64, d_ff=256
    conf = FF.FactorizedFFNConfig(rank=65)
    with pytest.raises(LabkitConfigError, match="rank=65.*above the dimension") as e:
        apply_(build(cfg), conf)
    assert "64" in e.value.allowed
    with pytest.raises(LabkitConfigError, match="rank"):
        expected(cfg, conf)
    apply_(build(cfg), dataclasses.replace(conf, rank=64))  # the edge itself is allowed


def test_layer_out_of_range_raises():
    with pytest.raises(LabkitConfigError, match="layers"):
        apply_(build("tiny"), FF.FactorizedFFNConfig(rank=4, layers=(2,)))


def test_applying_twice_raises():
    model = apply_(build("tiny"), FF.FactorizedFFNConfig(rank=4))
    with pytest.raises(TypeError, match="no nn.Linear"):
        apply_(model, FF.FactorizedFFNConfig(rank=4))


def test_break_even_rank():
    assert FF.break_even_rank(64, 256) == pytest.approx(51.2)
    r = FF.best_rank_for_ratio(768, 3072, 3.2)
    assert r == 192
