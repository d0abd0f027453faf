"""labkit.accounting: one schema for every technique and stack, checked against what
labkit.measure counts on the built model (parameters, forward FLOPs, bytes)."""
import pytest
import torch

from labkit import accounting, measure
from labkit import model as M
from labkit.techniques import (
    FactorizedFFNConfig,
    KernelAttentionConfig,
    LowRankAttentionConfig,
    SharingConfig,
    apply_,
    expected,
)

STACKS = {
    "dense": [],
    "factorized": [FactorizedFFNConfig(rank=8)],
    "factorized-up-layer1": [FactorizedFFNConfig(rank=8, layers=(1,), parts=("ffn.up",))],
    "shared": [SharingConfig()],
    "shared-ffn-3-layers": [SharingConfig(("ffn",), layers=(1, 2, 3))],
    "kernel-favor": [KernelAttentionConfig("favor", 16)],
    "fact+share": [FactorizedFFNConfig(rank=8), SharingConfig(("ffn",))],
    "share-attn+kernel+fact": [SharingConfig(("attn",)), KernelAttentionConfig("trig", 8),
                               FactorizedFFNConfig(rank=4)],
}
ENCODER_ONLY = {
    "linformer": [LowRankAttentionConfig(k=16, seq_len=96)],
    "linformer+fact+share": [LowRankAttentionConfig(k=16, seq_len=96),
                             FactorizedFFNConfig(rank=8), SharingConfig()],
    "share+linformer-layerwise": [SharingConfig(("attn",)),
                                  LowRankAttentionConfig(k=8, share="layerwise")],
    "linformer-kv-layer0+kernel-layer1": [LowRankAttentionConfig(k=8, share="kv", layers=(0,)),
                                          KernelAttentionConfig("elu", layers=(1,))],
}
CASES = [("encoder", k, v) for k, v in {**STACKS, **ENCODER_ONLY}.items()] + \
    [("decoder", k, v) for k, v in STACKS.items()]


@pytest.mark.parametrize("kind,name,configs", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_claim_equals_count(kind, name, configs):
    cfg = M.preset("small", kind=kind)
    dense, model = M.build(cfg), M.build(cfg)
    for c in configs:
        apply_(model, c)
    e = expected(cfg, *configs)
    ids = torch.randint(6, 200, (1, e["seq_len"]))
    assert e["params_before"] == M.count_params(dense)
    assert e["params_after"] == M.count_params(model)
    assert e["flops_before"] == measure.forward_flops(dense, ids)
    assert e["flops_after"] == measure.forward_flops(model, ids)
    assert e["bytes_before"] == measure.model_bytes(dense)["total"]
    assert e["bytes_after"] == measure.model_bytes(model)["total"]
    for k in ("params", "flops", "bytes"):
        assert e[f"{k}_ratio"] == pytest.approx(e[f"{k}_before"] / e[f"{k}_after"])
        assert sum(p[f"{k}_after"] for p in e["parts"].values()) == e[f"{k}_after"]
    assert e["techniques"] == [type(c).__name__ for c in configs]


def test_same_schema_for_every_technique():
    cfg = M.preset("small")
    keys = {frozenset(expected(cfg, *cs)) for cs in list(STACKS.values()) +
            list(ENCODER_ONLY.values())}
    assert len(keys) == 1


def test_at_another_sequence_length_and_batch():
    cfg = M.preset("tiny")
    configs = [FactorizedFFNConfig(rank=8), KernelAttentionConfig("favor", 16)]
    model = M.build(cfg)
    for c in configs:
        apply_(model, c)
    e = expected(cfg, *configs, seq_len=40)
    ids = torch.randint(6, 200, (3, 40))
    assert measure.forward_flops(model, ids) == 3 * e["flops_after"]


def test_linear_shapes_is_the_model():
    for kind in ("encoder", "decoder"):
        cfg = M.preset("tiny", kind=kind)
        model = M.build(cfg)
        want = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
        assert accounting.linear_shapes(cfg) == want


def test_unknown_config_is_refused():
    with pytest.raises(TypeError, match="no expected"):
        expected(M.preset("tiny"), object())
