"""Techniques from different notebooks stack on one model (DESIGN.md: replacement modules
keep the forward signature of what they replace)."""
import pytest
import torch

from labkit import measure
from labkit import model as M
from labkit.techniques import (
    FactorizedFFNConfig,
    FakeQuantConfig,
    Int8Config,
    KernelAttentionConfig,
    LowRankAttentionConfig,
    SharingConfig,
    SparsityConfig,
    apply_,
)


def _ids(m, n=32):
    return torch.randint(4, m.cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention", [LowRankAttentionConfig(k=16, seq_len=32),
                                       KernelAttentionConfig(feature_map="elu")])
def test_attention_then_2_4_sparsity_then_int8(attention):
    m = M.build("tiny", num_labels=3, max_len=32).eval()
    x = _ids(m)
    apply_(m, attention)
    apply_(m, SparsityConfig(structure="nm", n=2, m=4, sparsity=0.5))
    for block in m.blocks:  # the 2:4 pattern holds in every FFN weight
        for lin in (block.ffn.up, block.ffn.down):
            w = lin.weight.detach()
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    with torch.no_grad():
        before = m(x)
    apply_(m, Int8Config(mode="dynamic"))
    with torch.no_grad():
        after = m(x)
    assert after.shape == before.shape == (2, 3)
    assert torch.allclose(after, before, atol=0.1 * before.abs().max().item() + 1e-3)
    names = [t["technique"] for t in m.applied_techniques]
    assert names == [type(attention).__name__, "SparsityConfig", "Int8Config"]
    assert any("int8" in p.lower() or "_int_mm" in p for p in measure.kernel_paths(m).values())


def test_factorize_share_and_fake_quant_keep_training():
    m = M.build("tiny", kind="decoder", max_len=32)
    apply_(m, FactorizedFFNConfig(rank=8))
    apply_(m, SharingConfig(parts=("ffn",)))
    apply_(m, FakeQuantConfig(bits=4))
    assert m.blocks[0].ffn is m.blocks[1].ffn
    x = _ids(m)
    loss = m.loss({"input_ids": x, "labels": x})
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.blocks[0].ffn.parameters())
