import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from labkit import measure
from labkit import model as M
from labkit.techniques import apply_, expected
from labkit.techniques.kernel_attention import (
    FEATURE_MAPS,
    KernelAttention,
    KernelAttentionConfig,
    approximation_error,
    feature_map,
    linear_attention,
    orthogonal_gaussian,
)
from labkit.validate import LabkitConfigError


def _qkv(n=40, d=16, h=2, b=2, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) * s for s in (scale, scale, 1.0)]


def _omega(fm, m=32, d=16, seed=0):
    if fm == "elu":
        return None
    return orthogonal_gaussian(m if fm == "favor" else m // 2, d,
                               torch.Generator().manual_seed(seed))


def test_elu_matches_naive_quadratic_form():
    q, k, v = _qkv()
    att = KernelAttention(32, 2, feature_map="elu").eval()
    qf, kf = F.elu(q) + 1, F.elu(k) + 1
    a = qf @ kf.transpose(-2, -1)  # (B, H, N, N)
    want = (a / a.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(att.attend(q, k, v), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fm", FEATURE_MAPS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 64])
def test_causal_chunked_matches_naive_masked(fm, chunk):
    q, k, v = _qkv(n=40, scale=0.5)
    om = _omega(fm)
    qf, kf = feature_map(q, fm, om, True), feature_map(k, fm, om, False)
    num, den = linear_attention(qf, kf, v, causal=True, chunk=chunk)
    a = (qf @ kf.transpose(-2, -1)).tril()  # naive masked computation
    torch.testing.assert_close(num, a @ v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(den, a.sum(-1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_causal_module_matches_naive_and_ignores_future():
    torch.manual_seed(0)
    att = KernelAttention(32, 2, causal=True, feature_map="favor", num_features=32,
                          chunk_size=8).eval()
    x = torch.randn(1, 30, 32)
    y = att(x)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, 32)  # change the future
    torch.testing.assert_close(att(x2)[:, :20], y[:, :20])
    q, k, v = att.heads(att.q(x)), att.heads(att.k(x)), att.heads(att.v(x))
    qf = feature_map(q, "favor", att.omega, True)
    kf = feature_map(k, "favor", att.omega, False)
    a = (qf @ kf.transpose(-2, -1)).tril()
    ref = att.o(((a / a.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(1, 30, 32))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fm", ["favor", "trig"])
def test_error_falls_as_m_grows(fm):
    q, k, v = _qkv(n=64, scale=0.6)
    table = approximation_error(q, k, v, feature_maps=(fm,), ms=(8, 64, 512),
                                seeds=(0, 1, 2, 3))
    errs = table.sort_values("m")["rel_error"].tolist()
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[0]


def test_trig_instability_is_detected_not_hidden():
    q, k, v = _qkv(n=64)
    table = approximation_error(q, k, v, feature_maps=("favor", "trig"), ms=(16,),
                                scales=(0.3, 2.0))
    at = {(r.feature_map, r.scale): r for r in table.itertuples()}
    assert at["trig", 2.0].nonpositive_frac > 0.05
    assert at["trig", 2.0].nonpositive_frac > at["trig", 0.3].nonpositive_frac
    assert at["favor", 2.0].nonpositive_frac == 0  # positive features: never
    # the module records it and warns once
    att = KernelAttention(32, 2, feature_map="trig", num_features=16).eval()
    with pytest.warns(RuntimeWarning, match="denominators"):
        att.attend(q * 2.0, k * 2.0, v)
    st = att.denominator_stats
    assert st["rows"] == 2 * 2 * 64 and st["nonpositive"] > 0


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("fm,m", [("elu", 64), ("favor", 24), ("trig", 24)])
def test_expected_matches_counted(kind, fm, m):
    cfg = KernelAttentionConfig(fm, m, chunk_size=48)
    dense, lin = M.build("tiny", kind=kind), M.build("tiny", kind=kind)
    apply_(lin, cfg)
    e = expected(lin.cfg, cfg)
    ids = torch.randint(6, 200, (1, lin.cfg.max_len))
    counted = measure.forward_flops(lin, ids) - measure.forward_flops(dense, ids)
    assert counted == e["flops_after"] - e["flops_before"] < 0
    assert measure.forward_flops(lin, ids) == e["flops_after"]
    assert M.count_params(lin) == M.count_params(dense) == e["params_after"] == e["params_before"]
    assert measure.model_bytes(lin)["total"] - measure.model_bytes(dense)["total"] == \
        e["bytes_after"] - e["bytes_before"]
    assert cfg.feature_dim(16) == (16 if fm == "elu" else m)  # elu: feature dim = head dim


def test_features_are_seeded_buffers():
    a, b = M.build("tiny"), M.build("tiny")
    apply_(a, KernelAttentionConfig("favor", 32, seed=3))
    apply_(b, KernelAttentionConfig("favor", 32, seed=3))
    wa = [blk.attn.omega for blk in a.blocks]
    torch.testing.assert_close(wa[0], b.blocks[0].attn.omega)
    assert not torch.equal(wa[0], wa[1])  # layers draw different features
    assert "blocks.0.attn.omega" in a.state_dict()
    # orthogonal within a block of d rows
    w = wa[0][:16]
    gram = (w / w.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(gram, torch.eye(16), atol=1e-5, rtol=0)


def test_padding_does_not_leak():
    model = M.build("tiny").eval()
    apply_(model, KernelAttentionConfig("favor", 32))
    ids = torch.randint(6, 200, (2, 24))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[:, 16:] = True
    other = ids.clone()
    other[:, 16:] = torch.randint(6, 200, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.features(ids, pad)[:, :16],
                                   model.features(other, pad)[:, :16], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw,field", [
    ({"num_features": 0}, "num_features"), ({"feature_map": "relu"}, "feature_map"),
    ({"feature_map": "trig", "num_features": 15}, "num_features"),
    ({"chunk_size": 0}, "chunk_size"), ({"seed": -1}, "seed"), ({"layers": (1, 1)}, "layers"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(LabkitConfigError) as e:
        KernelAttentionConfig(**kw)
    assert e.value.name == field and field in str(e.value)


def test_kernel_then_low_rank_stacks_on_an_encoder():
    from labkit.techniques.low_rank_attention import LowRankAttentionConfig

    model = M.build("tiny")
    apply_(model, KernelAttentionConfig("elu", layers=(1,)))
    apply_(model, LowRankAttentionConfig(k=16, layers=(0,)))
    x = torch.randn(2, 20, 64)
    for b in model.blocks:
        assert b.attn(x, key_padding_mask=None, rope=None).shape == x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # elu never has unstable denominators
        model(torch.randint(6, 200, (2, 20)))


@pytest.mark.parametrize("fm", ["favor", "trig"])
@pytest.mark.parametrize("pair", ["same-axis", "random"])
def test_random_features_are_unbiased(fm, pair):
    """Many independent orthogonal blocks: the mean of phi(q) . phi(k) over blocks must be
    exp(q . k / sqrt(d)) within 4 standard errors. Fails without the QR sign fix (rows lean
    to one side: about 10 standard errors low for favor) and without the -|x|^2/2 term."""
    from labkit.techniques.kernel_attention import feature_map, orthogonal_gaussian

    d, blocks = 16, 3000
    g = torch.Generator().manual_seed(0)
    if pair == "same-axis":
        q = torch.zeros(d)
        q[0] = 1.0
        k = q.clone()
    else:
        q, k = torch.randn(d, generator=g) * 0.5, torch.randn(d, generator=g) * 0.5
    truth = math.exp(float(q @ k) / math.sqrt(d))
    rows = d if fm == "favor" else d // 2  # trig: sin and cos of m/2 frequencies
    with measure.num_threads(1):  # thousands of tiny QRs: threads only contend
        omega = orthogonal_gaussian(rows * blocks, d, torch.Generator().manual_seed(1))
        pq = feature_map(q.view(1, 1, 1, d), fm, omega, True, stabilise=False).view(blocks, -1)
        pk = feature_map(k.view(1, 1, 1, d), fm, omega, False, stabilise=False).view(blocks, -1)
    if fm == "trig":  # features are [sin | cos] over all rows: regroup per block
        pq = torch.cat(feature_map(q.view(1, 1, 1, d), fm, omega, True, stabilise=False)
                       .flatten().chunk(2), 0).view(2, blocks, rows).transpose(0, 1).flatten(1)
        pk = torch.cat(feature_map(k.view(1, 1, 1, d), fm, omega, False, stabilise=False)
                       .flatten().chunk(2), 0).view(2, blocks, rows).transpose(0, 1).flatten(1)
    # each block's estimate: its features' dot product, rescaled from the 1/sqrt(all rows)
    est = (pq.double() * pk.double()).sum(1) * blocks
    se = float(est.std() / math.sqrt(blocks))
    assert abs(float(est.mean()) - truth) < 4 * se + 1e-5 * truth, (float(est.mean()), truth, se)
    assert se < 0.02 * truth  # enough blocks that a few-percent bias is caught
