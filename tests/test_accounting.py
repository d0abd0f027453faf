"""labkit.accounting: one schema for every technique and stack, checked against what
labkit.measure counts on the built model (parameters, forward FLOPs, bytes)."""
import pytest
import torch

from labkit import accounting, measure
from labkit import kernels as K
from labkit import model as M
from labkit.techniques import (
    CQILConfig,
    EarlyExitConfig,
    FactorizedFFNConfig,
    FakeQuantConfig,
    Int8Config,
    KernelAttentionConfig,
    LayerDropConfig,
    LayerPruneConfig,
    LoRAConfig,
    LowRankAttentionConfig,
    SharingConfig,
    SparsityConfig,
    apply_,
    expected,
)
from labkit.techniques import quant as Q
from labkit.techniques import sparsity as S

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
            list(ENCODER_ONLY.values()) + [v for k, v in DEPLOYED.items() if k != "dense"]}
    assert len(keys) == 1


# ------------------------------------------------ techniques that change the stored format
# Sparsity is claimed as deployed in its structure's storage; the count converts the
# pruned model to that path (labkit.techniques.sparsity.convert) and counts it.
NATURAL = {"unstructured": "csr", "block": "bsr", "nm": "nm-simulated", "row": "compacted-dense",
           "column": "compacted-dense", "neuron": "compacted-dense", "head": "compacted-dense"}


def _counted(model, ids) -> dict:
    """Parameters, FLOPs and bytes of the applied model as deployed, counted on its tensors:
    ``count_params`` plus the weights CSR/BSR hold as buffers; FlopCounterMode, minus
    2 x tokens per zero weight where the path skips zeros the counter sees as dense work
    (CSR, BSR, N:M); ``model_bytes`` (fake quant: its packed ``quantized_bytes``; N:M: the
    kept values and index bits, as the CPU has no N:M storage)."""
    model.eval()
    if any(m.act is not None for m in Q.quantized_layers(model).values()):
        Q.calibrate(model, [ids])
    masked = list(S.masked_linears(model).values())
    flops = measure.forward_flops(model, ids)
    if masked:  # a shared linear runs once per block that uses it: zeros per use
        zeros = sum(int((m.weight == 0).sum()) for _, m in model.named_modules(
            remove_duplicate=False) if isinstance(m, S.MaskedLinear))
        path = NATURAL[masked[0].structure]
        S.convert(model, path)
        flops = (measure.forward_flops(model, ids) if path == "compacted-dense"
                 else flops - 2 * ids.numel() * zeros)
    params, nbytes = M.count_params(model), measure.model_bytes(model)["total"]
    for m in model.modules():
        if isinstance(m, (K.CSRLinear, K.BSRLinear)):
            params += m.values.numel()
        elif isinstance(m, K.NMLinear):
            w = m.weight.detach()
            params -= m.sparse_counts()[0]
            nbytes += K.storage_bytes(w, "nm", n=m.n, m=m.m)["total"] - 4 * w.numel()
    if Q.quantized_layers(model):
        nbytes = Q.quantized_bytes(model)["total"] + sum(
            b.numel() * b.element_size() for b in model.buffers())
    return {"params": params, "flops": flops, "bytes": nbytes}


DEPLOYED = {
    "dense": [],
    **{f"sparse-{st}": [SparsityConfig(0.5, st, parts=("attn", "ffn"), block=8)]
       for st in ("unstructured", "nm", "block", "row", "column", "neuron")},
    "sparse-head": [SparsityConfig(0.5, "head", parts=("attn",))],
    "sparse-global-attn-layer1": [SparsityConfig(0.7, scope="global", parts=("attn",),
                                                 layers=(1,))],
    "fakequant-4bit": [FakeQuantConfig(bits=4)],
    "fakequant-3bit-group-acts": [FakeQuantConfig(bits=3, granularity="group", group_size=8,
                                                  activations=True)],
    "fakequant-asym-head": [FakeQuantConfig(bits=5, symmetric=False, parts=("ffn", "head"))],
    "fakequant-mixed": [FakeQuantConfig(bits=4, bits_by_layer=(("blocks.1.ffn.up", 8),))],
    "int8": [Int8Config()],
    "int8-ffn-layer0": [Int8Config(layers=(0,), parts=("ffn",))],
    "layerprune": [LayerPruneConfig(keep=(1,))],
    "layerdrop-keep": [LayerDropConfig(keep=(0,))],
    "cqil": [CQILConfig(0, 2, 2)],
    "lora": [LoRAConfig(rank=4)],
    "fact-up+rows-attn+int8": [FactorizedFFNConfig(rank=8, parts=("ffn.up",)),
                               SparsityConfig(0.5, "row", parts=("attn",)),
                               Int8Config(parts=("attn", "ffn", "head"))],
    "fact+sparse-attn+fakequant": [FactorizedFFNConfig(rank=8),
                                   SparsityConfig(0.5, "block", parts=("attn",), block=16),
                                   FakeQuantConfig(bits=4)],
    "share+unstructured": [SharingConfig(), SparsityConfig(0.5, "unstructured")],
    "share-ffn+neuron": [SharingConfig(("ffn",)), SparsityConfig(0.5, "neuron")],
    "share+int8": [SharingConfig(), Int8Config()],
    "kernel+nm+int8": [KernelAttentionConfig("elu"), SparsityConfig(structure="nm"),
                       Int8Config()],
    "prune+fakequant": [LayerPruneConfig(keep=(0,)), FakeQuantConfig(bits=4)],
    "cqil+lora": [CQILConfig(0, 2, 2), LoRAConfig(rank=2)],
}
ENCODER_DEPLOYED = {"early-exit": [EarlyExitConfig(q=1.0)]}
DEPLOYED_CASES = [("encoder", k, v) for k, v in {**DEPLOYED, **ENCODER_DEPLOYED}.items()] + \
    [("decoder", k, v) for k, v in DEPLOYED.items()
     if k in ("sparse-unstructured", "sparse-neuron", "sparse-head", "fakequant-4bit", "int8",
              "share-ffn+neuron", "layerprune", "lora")]


@pytest.mark.parametrize("kind,name,configs", DEPLOYED_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in DEPLOYED_CASES])
def test_deployed_claim_equals_count(kind, name, configs):
    cfg = M.preset("tiny", kind=kind)
    model = M.build(cfg)
    for c in configs:
        apply_(model, c)
    e = expected(cfg, *configs)
    counted = _counted(model, torch.randint(6, 200, (1, e["seq_len"])))
    for k in ("params", "flops", "bytes"):
        assert e[f"{k}_after"] == counted[k], k
        assert sum(p[f"{k}_after"] for p in e["parts"].values()) == e[f"{k}_after"]


def test_sparsity_detail_and_real_nonzeros():
    cfg = M.preset("tiny")
    for st in ("unstructured", "block", "row", "nm"):
        c = SparsityConfig(0.75, st, parts=("attn", "ffn"), block=8, n=1, m=4)
        model = apply_(M.build(cfg), c)
        d = expected(cfg, c)["detail"]
        nonzero = sum(int(m.weight.count_nonzero()) for m in S.masked_linears(model).values())
        assert d["weights_nonzero"] == nonzero
        assert d["sparsity"] == pytest.approx(0.75)
        assert d["bytes_sparse"] < d["bytes_dense"]


def test_a_stack_the_model_refuses_is_refused_by_expected():
    cfg = M.preset("tiny")
    configs = [FactorizedFFNConfig(rank=8), SparsityConfig(0.5)]
    model = apply_(M.build(cfg), configs[0])
    with pytest.raises(TypeError, match="sparsity prunes nn.Linear"):
        apply_(model, configs[1])
    with pytest.raises(TypeError, match="sparsity prunes nn.Linear"):
        expected(cfg, *configs)


def test_depth_checks_fail_the_same_way_in_apply_and_expected():
    from labkit.validate import LabkitConfigError

    cfg = M.preset("tiny")
    for c in (LayerPruneConfig(keep=(0, 5)), CQILConfig(0, 4, 2),
              EarlyExitConfig(exits=(1,))):
        with pytest.raises(LabkitConfigError):
            apply_(M.build(cfg), c)
        with pytest.raises(LabkitConfigError):
            expected(cfg, c)
    with pytest.raises(LabkitConfigError, match="encoder"):
        expected(M.preset("tiny", kind="decoder"), EarlyExitConfig())


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
