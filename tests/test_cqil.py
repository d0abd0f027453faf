import copy

import pytest
import torch
from conftest import requires_minilm

from labkit import model as M
from labkit import train as T
from labkit.techniques import CQILConfig, LoRAConfig, apply_, expected
from labkit.techniques import cqil as C
from labkit.validate import LabkitConfigError


def _dec(n=8, seed=0):
    return M.build("tiny", kind="decoder", n_layers=n, seed=seed).eval()


def _manual(m, ids, start, end, p, d):
    """The CQIL equations written out block by block, bypass into the MLP input only."""
    x, rope = m.embed(ids), m.rope
    for i in range(start):
        x = m.blocks[i](x, rope=rope)
    for s in range(start, end, p):
        delta, attn = 0, []
        for j in range(s, min(s + p, end)):
            b = m.blocks[j]
            a = b.attn(b.norm1(x), rope=rope)
            h = x + a
            byp = sum(attn[len(attn) - d:]) if d and attn else 0
            delta = delta + (h + b.ffn(b.norm2(h + byp)) - x)
            attn.append(a)
        x = x + delta
    for i in range(end, len(m.blocks)):
        x = m.blocks[i](x, rope=rope)
    return m.head(m.norm(x))


@pytest.mark.parametrize("start,end,p,d", [(4, 8, 2, 0), (2, 7, 2, 0), (1, 8, 3, 0),
                                           (4, 8, 4, 0), (0, 8, 4, 1), (2, 8, 3, 2)])
def test_cqil_equals_the_equations(start, end, p, d):
    m = _dec()
    ids = torch.randint(0, 1000, (2, 12))
    want = _manual(m, ids, start, end, p, d)
    apply_(m, CQILConfig(start=start, end=end, P=p, D=d))
    assert torch.allclose(m(ids), want, atol=1e-5)


def test_bypass_is_not_double_counted_like_the_reference():
    m = _dec()
    ids = torch.randint(0, 1000, (2, 12))
    x = m.embed(ids)
    ctx = M.BlockContext(None, m.rope)
    b0, b1 = m.blocks[0], m.blocks[1]
    y0, a0 = C.block_parts(b0, x, ctx)
    assert torch.allclose(y0, b0(x, rope=m.rope), atol=1e-6)  # no bypass: the block itself
    y1, _ = C.block_parts(b1, x, ctx, bypass=a0)
    # the reference's in-place add puts the bypass into the residual as well
    h = x + b1.attn(b1.norm1(x), rope=m.rope)
    ref_style = (h + a0) + b1.ffn(b1.norm2(h + a0))
    assert torch.allclose(ref_style - y1, a0, atol=1e-5)


def test_ideal_cut_and_expected():
    assert C.ideal_cut(8, 4, 8, 2) == pytest.approx(4 * (1 - 1 / 2) / 8)
    assert C.ideal_cut(8, 0, 8, 4) == pytest.approx(8 * (1 - 1 / 4) / 8)
    assert C.ideal_cut(8, 2, 7, 2) == pytest.approx((5 - 3) / 8)  # 3 steps for 5 blocks
    e = expected(_dec().cfg, CQILConfig(start=4, end=8, P=2))["detail"]
    assert e["ideal_latency_cut"] == 0.25 and e["allreduce_per_forward"] == 2
    assert C.steps_of(2, 7, 2) == [[2, 3], [4, 5], [6]]


def test_input_similarity_shape_and_measured_on_the_sequential_model():
    m = _dec()
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    s = C.input_similarity(m, ids, mask)
    assert s.shape == (8, 8)
    assert torch.allclose(s.diagonal(), torch.ones(8), atol=1e-5)
    assert torch.allclose(s, s.T, atol=1e-6)
    apply_(m, CQILConfig(start=0, end=8, P=2, D=1))  # block_parts skips block hooks
    assert torch.allclose(C.input_similarity(m, ids, mask), s, atol=1e-6)
    assert isinstance(m.executor, C.CQILExecutor)  # restored


def test_lora_starts_as_base_counts_and_merges():
    m = _dec(n=2)
    ids = torch.randint(0, 1000, (2, 12))
    ref = m(ids)
    apply_(m, LoRAConfig(rank=4))
    assert torch.equal(m(ids), ref)
    d, f = m.cfg.d_model, m.cfg.d_ff
    per_block = 4 * 4 * (d + d) + 2 * 4 * (d + f) + 4 * (f + d)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 2 * per_block
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, C.LoRALinear):
                mod.B.normal_(0, 0.05)
    changed = m(ids)
    assert not torch.allclose(changed, ref)
    assert C.merge_lora_(m) == 14
    assert not any(isinstance(x, C.LoRALinear) for x in m.modules())
    assert torch.allclose(m(ids), changed, atol=1e-5)


def test_recovery_by_self_distillation_through_lora_reduces_the_kl():
    from labkit import data as D

    corpus = D.load_lm_corpus(n_sentences=500, seed=0)
    m = M.build("tiny", kind="decoder", n_layers=4, vocab_size=len(corpus.tokenizer),
                max_len=16, d_model=32, d_ff=64)
    T.fit(m, D.lm_batches(corpus.train, 8, 16), steps=30, lr=3e-3, progress=False)
    teacher = copy.deepcopy(m).eval()
    apply_(m, CQILConfig(start=0, end=4, P=4))
    apply_(m, LoRAConfig(rank=4))
    batch = next(D.lm_batches(corpus.eval, 16, 16, seed=5))
    strat = C.DistillStrategy(teacher, temperature=2.0)

    def kl():
        m.zero_grad()
        return float(strat.forward_backward(m, batch, T.TrainState(), []))

    before = kl()
    assert before > 0
    T.fit(m, D.lm_batches(corpus.train, 8, 16, seed=1), steps=25, lr=3e-3, strategy=strat,
          progress=False)
    assert kl() < 0.8 * before
    same = C.DistillStrategy(teacher)  # a student equal to its teacher has zero loss
    assert float(same.forward_backward(copy.deepcopy(teacher).train(), batch,
                                       T.TrainState(), [])) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"start": 4, "end": 4}, "start=4.*less than end=4"),
    ({"start": 5, "end": 3}, "start=5"),
    ({"start": 0, "end": 4, "P": 1}, r"P=1.*>= 2"),
    ({"start": 0, "end": 4, "P": 5}, r"P=5.*\[2, end - start = 4\]"),
    ({"start": 0, "end": 4, "D": -1}, "D=-1.*>= 0"),
    ({"start": -1, "end": 4}, "start=-1")])
def test_bad_group(kw, match):
    with pytest.raises(LabkitConfigError, match=match):
        CQILConfig(**kw)


def test_bad_end_and_rank():
    with pytest.raises(LabkitConfigError, match=r"end=9.*at most the number of blocks \(8\)"):
        apply_(_dec(), CQILConfig(start=4, end=9, P=2))
    for r in (0, -2):
        with pytest.raises(LabkitConfigError, match=f"rank={r}.*>= 1"):
            LoRAConfig(rank=r)


def test_across_processes_equals_one_process(tmp_path):
    """P=2 ranks under torchrun (gloo), one all-reduce of deltas per step (plus an
    all-gather for D > 0); a short last step leaves a rank idle."""
    from labkit.dist import launch
    from labkit.techniques import cqil_dist as CD

    m = _dec()
    ids = torch.randint(0, 1000, (1, 16))
    CD.save_job(tmp_path / "job.pt", m, ids)
    groups = [[4, 8, 0], [1, 8, 1]]
    res = launch("labkit.techniques.cqil_dist:run",
                 {"model": str(tmp_path / "job.pt"), "groups": groups, "n_layers": 8,
                  "reps": 1, "rounds": 1, "save_outputs": True},
                 nproc=2, run_dir=tmp_path / "run", validate=CD.validate)
    for s, e, d in groups:
        got = torch.load(tmp_path / "run" / f"cqil-{s}-{e}-{d}.pt")
        apply_(m, CQILConfig(start=s, end=e, P=2, D=d))
        with torch.no_grad():
            assert (got - m(ids)).abs().max() <= 1e-5
    ranks = {r["rank"]: r for r in res.result["ranks"]}
    assert ranks[0]["groups"][0]["own_blocks"] == [4, 6]
    assert ranks[1]["groups"][0]["own_blocks"] == [5, 7]
    assert ranks[1]["groups"][1]["own_blocks"] == [2, 4, 6]
    rows = CD.summarize(res.result)
    assert [r["start"] for r in rows] == [4, 1] and all(r["cqil_ms"] > 0 for r in rows)


def test_cross_process_config_refused_before_start():
    from labkit.dist import launch
    from labkit.techniques import cqil_dist as CD

    with pytest.raises(LabkitConfigError, match="P=2"):
        launch("labkit.techniques.cqil_dist:run", {"model": "x", "groups": [[3, 4]]},
               nproc=2, validate=CD.validate)
    with pytest.raises(LabkitConfigError, match="end=9"):
        CD.validate({"groups": [[4, 9]], "n_layers": 8}, 2)


def _post(n=4, seed=0):
    """A BERT-style encoder: post-norm blocks, segment embeddings, LayerNorm eps 1e-12."""
    cfg = M.ModelConfig(norm_position="post", type_vocab_size=2, norm_eps=1e-12, n_layers=n,
                        d_model=32, n_heads=4, d_ff=64, vocab_size=64, max_len=16)
    m = M.build(cfg, seed=seed).eval()
    with torch.no_grad():  # norms away from identity, so a misplaced norm shows
        for b in m.blocks:
            for nm in (b.norm1, b.norm2):
                nm.weight.uniform_(0.5, 1.5)
                nm.bias.normal_(0, 0.2)
    return m


def _pair(b=2, n=12):
    ids = torch.randint(6, 64, (b, n), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 5], ids[:, n - 1] = 2, 3, 3  # [CLS] a [SEP] b [SEP]: two segments
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, n - 3:] = True
    return ids, mask


def _post_manual(m, ids, mask, start, end, p, d):
    """CQIL over post-norm blocks written out: a_j = attn(x), h = norm1(x + a),
    MLP input norm1(x + a + bypass), f = norm2(h + mlp(.))."""
    x = m.embed(ids) + m.pos(torch.arange(ids.shape[1])) + m.token_type(m.token_types(ids))
    x = m.embed_norm(x)
    for i in range(start):
        x = m.blocks[i](x, key_padding_mask=mask)
    for s in range(start, end, p):
        delta, attn = 0, []
        for j in range(s, min(s + p, end)):
            b = m.blocks[j]
            a = b.attn(x, key_padding_mask=mask)
            byp = sum(attn[len(attn) - d:]) if d and attn else 0
            y = b.norm2(b.norm1(x + a) + b.ffn(b.norm1(x + a + byp)))
            delta = delta + (y - x)
            attn.append(a)
        x = x + delta
    for i in range(end, len(m.blocks)):
        x = m.blocks[i](x, key_padding_mask=mask)
    return m.head(torch.tanh(m.pooler(x[:, 0])))


def test_block_parts_is_the_block_for_pre_and_post_norm():
    for m in (_dec(n=2), _post(n=2)):
        ids, mask = _pair()
        x = m.embed(ids)
        ctx = M.BlockContext(None if m.cfg.kind == "decoder" else mask, m.rope)
        for b in m.blocks:
            y, a = C.block_parts(b, x, ctx)
            torch.testing.assert_close(y, ctx.call(b, x), atol=1e-5, rtol=1e-5)
            assert a.shape == x.shape


@pytest.mark.parametrize("start,end,p,d", [(0, 4, 2, 1), (1, 4, 3, 2), (0, 4, 4, 0)])
def test_cqil_on_post_norm_segment_model_equals_the_equations(start, end, p, d):
    m = _post()
    ids, mask = _pair()
    with torch.no_grad():
        want = _post_manual(m, ids, mask, start, end, p, d)
        apply_(m, CQILConfig(start=start, end=end, P=p, D=d))
        torch.testing.assert_close(m(ids, mask), want, atol=1e-5, rtol=1e-4)


def test_bypass_on_blocks_it_cannot_split_is_refused():
    m = _dec(n=4)
    m.blocks[2] = torch.nn.Identity()
    with pytest.raises(LabkitConfigError, match=r"D=1.*0 for blocks \[2\].*Identity"):
        apply_(m, CQILConfig(start=0, end=4, P=2, D=1))
    apply_(m, CQILConfig(start=0, end=4, P=2, D=0))  # no split needed: allowed


@requires_minilm
def test_block_parts_and_cqil_bypass_on_real_minilm():
    from labkit import pretrained as P

    m = P.minilm_transformer(num_labels=2, max_len=32, dropout=0.0).eval()
    tok = P.load_tokenizer()
    batch = P.encode(tok, P.sentences(4), max_len=32)
    ids, mask = batch["input_ids"], ~batch["attention_mask"].bool()
    with torch.no_grad():
        x = m.embed_norm(m.embed(ids) + m.pos(torch.arange(ids.shape[1]))
                         + m.token_type(m.token_types(ids)))
        ctx = M.BlockContext(mask, None)
        for b in m.blocks:
            y, _ = C.block_parts(b, x, ctx)
            torch.testing.assert_close(y, ctx.call(b, x), atol=1e-4, rtol=1e-4)
            x = y
        want = _post_manual(m, ids, mask, 2, 6, 2, 1)
        apply_(m, CQILConfig(start=2, end=6, P=2, D=1))
        torch.testing.assert_close(m(ids, mask), want, atol=1e-4, rtol=1e-4)
