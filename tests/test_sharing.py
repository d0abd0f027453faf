import copy

import pytest
import torch

from labkit import measure
from labkit.model import build, count_params, preset
from labkit.techniques import factorized_ffn as FF
from labkit.techniques import sharing as S
from labkit.techniques.registry import apply_, expected
from labkit.validate import LabkitConfigError

KINDS = ("encoder", "decoder")


def _batch(cfg, b=2, n=12):
    torch.manual_seed(1)
    ids = torch.randint(6, cfg.vocab_size, (b, n + 1))
    if cfg.kind == "decoder":
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return {"input_ids": ids[:, :-1], "labels": torch.randint(0, cfg.num_labels, (b,))}


PART_SETS = (("attn", "ffn"), ("ffn",), ("attn",))


def _parts(mode):
    return mode


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", PART_SETS)
def test_params_analytic_equals_counted(kind, mode):
    cfg = preset("small", kind=kind)  # 4 layers
    model = apply_(build(cfg), S.SharingConfig(mode))
    e = expected(cfg, S.SharingConfig(mode))
    assert count_params(model) == e["params_after"]
    assert measure.model_bytes(model)["total"] == e["bytes_after"]
    # L x -> 1 x for the shared part
    L = cfg.n_layers
    one = build(cfg).blocks[0]
    shared = sum(sum(p.numel() for p in getattr(one, part).parameters()) for part in mode)
    assert e["params_before"] - e["params_after"] == (L - 1) * shared
    # FLOPs do not change
    assert e["flops_after"] == e["flops_before"]
    ids = torch.randint(6, 200, (1, e["seq_len"]))
    assert measure.forward_flops(model, ids) == e["flops_after"]


@pytest.mark.parametrize("mode", PART_SETS)
def test_tensors_really_tied(mode):
    model = apply_(build("small"), S.SharingConfig(mode))
    b0 = model.blocks[0]
    for b in model.blocks[1:]:
        for part in ("attn", "ffn"):
            same = getattr(b, part) is getattr(b0, part)
            assert same == (part in _parts(mode))
            if part in _parts(mode):
                for p, q in zip(getattr(b, part).parameters(), getattr(b0, part).parameters()):
                    assert p.data_ptr() == q.data_ptr()
        # norms stay per-layer
        assert b.norm1.weight.data_ptr() != b0.norm1.weight.data_ptr()
    # one parameter object each: an optimizer sees it once
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_shared_weight_sums_layers_and_updates_once(kind):
    cfg = preset("tiny", kind=kind)
    shared = apply_(build(cfg, seed=0), S.SharingConfig(("attn", "ffn")))
    # the same function with untied copies: each layer owns a copy of block 0's weights
    untied = copy.deepcopy(shared)
    for b in untied.blocks[1:]:
        b.attn, b.ffn = copy.deepcopy(b.attn), copy.deepcopy(b.ffn)
    assert count_params(untied) > count_params(shared)
    batch = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(shared(batch["input_ids"]), untied(batch["input_ids"]))
    shared.loss(batch).backward()
    untied.loss(batch).backward()
    w = shared.blocks[0].ffn.up.weight
    want = sum(b.ffn.up.weight.grad for b in untied.blocks)
    torch.testing.assert_close(w.grad, want)
    wq = shared.blocks[0].attn.q.weight
    torch.testing.assert_close(wq.grad, sum(b.attn.q.weight.grad for b in untied.blocks))
    before = w.detach().clone()
    torch.optim.SGD(shared.parameters(), lr=0.5).step()
    torch.testing.assert_close(w.detach(), before - 0.5 * want)  # one update, not L
    assert shared.blocks[1].ffn.up.weight is w


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", PART_SETS)
@pytest.mark.parametrize("order", ["factorize-first", "share-first"])
def test_composes_with_factorized_ffn(kind, mode, order):
    cfg = preset("small", kind=kind)
    configs = [FF.FactorizedFFNConfig(rank=8), S.SharingConfig(mode)]
    if order == "share-first":
        configs.reverse()
    model = build(cfg)
    for c in configs:
        apply_(model, c)
    e = expected(cfg, *configs)
    assert count_params(model) == e["params_after"]
    assert all(isinstance(b.ffn.up, FF.LowRankLinear) for b in model.blocks)
    if "ffn" in _parts(mode):
        assert all(b.ffn is model.blocks[0].ffn for b in model.blocks)
    # both orders give the same parameter count, and the forward signature is kept
    other = expected(cfg, *configs[::-1])
    assert other["params_after"] == e["params_after"]
    batch = _batch(cfg)
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    out = model(batch["input_ids"], mask)
    assert out.shape == ((2, cfg.num_labels) if kind == "encoder"
                         else (2, batch["input_ids"].shape[1], cfg.vocab_size))
    ids = batch["input_ids"]
    ffn = e["parts"]["ffn"]
    want = ids.numel() * (ffn["flops_before"] - ffn["flops_after"]) // e["seq_len"]
    assert measure.forward_flops(build(cfg), ids) - measure.forward_flops(model, ids) == want


def test_share_then_factorize_one_layer_factorizes_the_shared_ffn():
    cfg = preset("small")
    model = apply_(build(cfg), S.SharingConfig(("ffn",)))
    conf = FF.FactorizedFFNConfig(rank=8, layers=(2,))
    with pytest.warns(UserWarning, match="shared by blocks"):
        apply_(model, conf)
    assert all(isinstance(b.ffn.up, FF.LowRankLinear) for b in model.blocks)
    assert count_params(model) == expected(cfg, S.SharingConfig(("ffn",)), conf)["params_after"]


def test_sharing_twice_is_idempotent_and_flops_unchanged():
    cfg = preset("tiny")
    model = apply_(build(cfg), S.SharingConfig(("ffn",)))
    n = count_params(model)
    apply_(model, S.SharingConfig(("ffn",)))
    assert count_params(model) == n
    apply_(model, S.SharingConfig(("attn",)))
    assert count_params(model) == expected(cfg, S.SharingConfig(("attn", "ffn")))["params_after"]
    ids = _batch(cfg)["input_ids"]
    assert measure.forward_flops(model, ids) == measure.forward_flops(build(cfg), ids)


@pytest.mark.parametrize("parts", [("both",), ("attn.q",), (), None, 1, ("ffn", "ffn")])
def test_unknown_parts_raise_naming_field(parts):
    with pytest.raises(LabkitConfigError) as e:
        S.SharingConfig(parts)
    assert e.value.name == "parts" and "'attn', 'ffn'" in str(e.value)


def test_one_layer_model_refused():
    cfg = preset("tiny", n_layers=1)
    with pytest.raises(LabkitConfigError, match="n_layers"):
        apply_(build(cfg), S.SharingConfig())
    with pytest.raises(LabkitConfigError, match="n_layers"):
        expected(cfg, S.SharingConfig())
    with pytest.raises(LabkitConfigError, match="layers"):  # one selected block: nothing to share
        expected(preset("tiny"), S.SharingConfig(layers=(1,)))


def test_share_a_subset_of_layers():
    cfg = preset("small")  # 4 layers
    conf = S.SharingConfig(("ffn",), layers=(1, 2, 3))
    model = apply_(build(cfg), conf)
    assert model.blocks[0].ffn is not model.blocks[1].ffn
    assert model.blocks[1].ffn is model.blocks[2].ffn is model.blocks[3].ffn
    assert count_params(model) == expected(cfg, conf)["params_after"]


def test_expected_rejects_unknown_config():
    with pytest.raises(TypeError, match="no expected"):
        expected(preset("tiny"), S.SharingConfig(), object())
