import itertools

import pytest
import torch

from labkit import measure
from labkit import model as M
from labkit.labs.attention import attention_maps, low_rank_error, rank_for_energy, spectrum_rows
from labkit.techniques import apply_, expected
from labkit.techniques.kernel_attention import KernelAttention, KernelAttentionConfig
from labkit.techniques.low_rank_attention import LinformerAttention, LowRankAttentionConfig
from labkit.validate import LabkitConfigError


def _model(**kw):
    return M.build("tiny", seed=0, **kw)


def test_full_rank_identity_projection_reproduces_dense():
    dense = _model(max_len=32).eval()
    lin = _model(max_len=32).eval()
    apply_(lin, LowRankAttentionConfig(k=32))
    for b in lin.blocks:
        assert isinstance(b.attn, LinformerAttention)
        with torch.no_grad():
            b.attn.E.copy_(torch.eye(32))
            b.attn.F.copy_(torch.eye(32))
    ids = torch.randint(6, 200, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(lin(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_short_sequence_uses_first_columns():
    torch.manual_seed(0)
    att = LinformerAttention(64, 4, k=8, seq_len=32).eval()
    q, k, v = (torch.randn(2, 4, 20, 16) for _ in range(3))
    e, f = att.E[:, :20], att.F[:, :20]
    want = torch.softmax(q @ (e @ k).transpose(-2, -1) / 4.0, -1) @ (f @ v)
    torch.testing.assert_close(att.attend(q, k, v), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LabkitConfigError, match="sequence length"):
        att.attend(*(torch.randn(1, 4, 33, 16) for _ in range(3)))


def test_padding_does_not_leak():
    torch.manual_seed(0)
    lin = _model(max_len=32).eval()
    apply_(lin, LowRankAttentionConfig(k=8))
    ids = torch.randint(6, 200, (2, 24))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[:, 16:] = True
    other = ids.clone()
    other[:, 16:] = torch.randint(6, 200, (2, 8))  # different content in the padding
    with torch.no_grad():
        h1 = lin.features(ids, pad)[:, :16]
        h2 = lin.features(other, pad)[:, :16]
        h3 = lin.features(other, None)[:, :16]
    torch.testing.assert_close(h1, h2)
    assert (h1 - h3).abs().max() > 1e-4  # without the mask the padding content matters


@pytest.mark.parametrize("share", ["none", "kv", "layerwise"])
@pytest.mark.parametrize("layers", [(), (1,)])
def test_expected_matches_counted_params_and_flops(share, layers):
    cfg = LowRankAttentionConfig(k=16, share=share, layers=layers, seq_len=96)
    dense, lin = _model(), _model()
    apply_(lin, cfg)
    e = expected(lin.cfg, cfg)
    assert e["seq_len"] == 96  # the projection length fixes the counted forward pass
    assert M.count_params(lin) - M.count_params(dense) == e["params_after"] - e["params_before"]
    assert M.count_params(lin) == e["params_after"]
    assert measure.model_bytes(lin)["total"] - measure.model_bytes(dense)["total"] == \
        e["bytes_after"] - e["bytes_before"]
    ids = torch.randint(6, 200, (1, 96))
    counted = measure.forward_flops(lin, ids) - measure.forward_flops(dense, ids)
    assert counted == e["flops_after"] - e["flops_before"] < 0
    n_conv = len(layers) or lin.cfg.n_layers
    core = e["parts"]["attn_core"]
    # SDPA over k keys plus the E K and F V projections, per converted layer
    assert core["flops_after"] - (lin.cfg.n_layers - n_conv) * 2 * 2 * 96 * 96 * 64 == \
        (2 * 2 * 96 * 16 * 64 + 2 * 2 * 16 * 96 * 64) * n_conv
    if share == "layerwise":
        es = {id(b.attn.E) for b in lin.blocks if isinstance(b.attn, LinformerAttention)}
        assert len(es) == 1
    if share != "none":
        assert all(b.attn.F is None for b in lin.blocks if isinstance(b.attn, LinformerAttention))


def _synthetic_maps(seed=0, n=48, heads=4, temp=3.0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, heads, n, 8, generator=g), torch.randn(2, heads, n, 8, generator=g)
    return [torch.softmax(temp * q @ k.transpose(-2, -1) / 8 ** 0.5, -1)]


def test_error_falls_with_k_and_svd_is_optimal():
    maps = _synthetic_maps()
    rows = low_rank_error(maps, ks=(2, 8, 16, 32, 48), seeds=(0, 1, 2, 3))
    by = {(r["method"], r["k"]): r["rel_error"] for r in rows}
    for method in ("svd", "linformer_jl", "random_subspace"):
        errs = [by[method, k] for k in (2, 8, 16, 32)]
        assert all(a > b for a, b in itertools.pairwise(errs)), (method, errs)
    for k in (2, 8, 16, 32):
        assert by["svd", k] <= by["random_subspace", k] + 1e-9
        assert by["svd", k] <= by["linformer_jl", k] + 1e-9
    assert by["svd", 48] < 1e-9 and by["random_subspace", 48] < 1e-6  # full rank is exact


def test_spectrum_of_real_attention_maps():
    model = _model().eval()
    ids = torch.randint(6, 200, (2, 40))
    lengths = torch.tensor([40, 30])
    pad = torch.arange(40)[None] >= lengths[:, None]
    maps = attention_maps(model, ids, pad)
    assert len(maps) == model.cfg.n_layers and maps[0].shape == (2, 4, 40, 40)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 40))
    assert maps[0][1, :, :, 30:].abs().max() == 0  # padding keys get no weight
    rows = spectrum_rows(maps, lengths)
    first = [r for r in rows if r["layer"] == 0]
    assert first[0]["sigma_rel"] == pytest.approx(1.0)
    assert all(a["energy"] <= b["energy"] + 1e-12 for a, b in itertools.pairwise(first))
    assert first[-1]["energy"] == pytest.approx(1.0)
    r90 = rank_for_energy(rows, 0.9)
    assert set(r90) == {0, 1} and all(1 <= v <= 40 for v in r90.values())


@pytest.mark.parametrize("kw,field", [
    ({"k": 0}, "k"), ({"k": -3}, "k"), ({"k": 65, "seq_len": 64}, "k"),
    ({"k": 8, "share": "headwise"}, "share"), ({"k": 8, "seq_len": 0}, "seq_len"),
    ({"k": 8, "layers": (0, 0)}, "layers"), ({"k": 8, "layers": (-1,)}, "layers"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(LabkitConfigError) as e:
        LowRankAttentionConfig(**kw)
    assert e.value.name == field and field in str(e.value)


@pytest.mark.parametrize("kw,field", [
    ({"k": 200}, "k"),  # rank above max_len=128
    ({"k": 8, "seq_len": 256}, "seq_len"),  # above the model's max_len
    ({"k": 8, "layers": (5,)}, "layers"),
])
def test_bad_configs_for_the_model(kw, field):
    with pytest.raises(LabkitConfigError) as e:
        apply_(_model(), LowRankAttentionConfig(**kw))
    assert e.value.name == field


def test_decoder_is_refused():
    with pytest.raises(LabkitConfigError, match="causal") as e:
        apply_(M.build("tiny", kind="decoder"), LowRankAttentionConfig(k=8))
    assert e.value.name == "kind"
    with pytest.raises(LabkitConfigError):
        LinformerAttention(64, 4, causal=True, k=8, seq_len=32)


def test_techniques_stack_and_keep_the_signature():
    model = _model()
    apply_(model, LowRankAttentionConfig(k=16, layers=(0,)))
    apply_(model, KernelAttentionConfig("favor", 32, layers=(1,)))
    assert isinstance(model.blocks[0].attn, LinformerAttention)
    assert isinstance(model.blocks[1].attn, KernelAttention)
    assert [t["technique"] for t in model.applied_techniques] == \
        ["LowRankAttentionConfig", "KernelAttentionConfig"]
    ids = torch.randint(6, 200, (2, 50))
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 40:] = True
    x = torch.randn(2, 50, 64)
    for b in model.blocks:
        assert b.attn(x, key_padding_mask=pad, rope=None).shape == x.shape
    loss = model.loss({"input_ids": ids, "padding_mask": pad, "labels": torch.tensor([0, 2])})
    loss.backward()
    assert model.blocks[0].attn.E.grad is not None and torch.isfinite(loss)
    assert set(measure.kernel_paths(model).values()) == {"linformer:sdpa", "kernel:favor(m=32)"}
    with pytest.raises(LabkitConfigError, match="already"):  # a layer is converted once
        apply_(model, LowRankAttentionConfig(k=8, layers=(0,)))
