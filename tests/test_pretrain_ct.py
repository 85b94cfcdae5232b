import json
import os

import numpy as np
import pytest
import torch

from conftest import pretrain_hp
from recbole_cdsr.data.atomic import read_item_titles, read_training_sequences
from recbole_cdsr.stages.llmcdsr import pretrain_tables
from recbole_cdsr.trainer.pretrain_ct import CollabTextPretrainer, pretrain_domain

DEFAULTS = pretrain_hp()
HP = pretrain_hp(hidden_size=16, inner_size=32, epochs=3, patience=2, batch_size=32, max_len=10)


def test_both_losses_reach_the_projection_and_embeddings():
    hp = HP
    m = CollabTextPretrainer(21, 8, hp)
    text = torch.randn(21, 8)
    inp = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    pos = torch.tensor([[2, 3, 6, 0], [5, 7, 0, 0]])
    neg = torch.tensor([[9, 10, 11, 0], [12, 13, 0, 0]])
    bce, nce = m.losses(inp, pos, neg, text)
    (bce + 0.1 * nce).backward()
    assert m.proj.weight.grad.abs().sum() > 0
    g = m.enc.item_embedding.weight.grad
    assert g[[1, 2, 3, 6, 9]].abs().sum() > 0 and g[20].abs().sum() == 0  # untouched item: no gradient


@pytest.mark.slow
def test_pretrain_learns_and_is_cached(tmp_path, slice_data):
    import shutil

    d = str(tmp_path / "fk-slice")  # a private copy: other tests write their own stage files
    shutil.copytree(os.path.join(slice_data, "fk-slice"), d,
                    ignore=shutil.ignore_patterns("*.pretrain-*", "*.pseudo-*", "*.gen-*"))
    tokens, doms, _ = read_item_titles(os.path.join(d, "fk-slice.item"))
    seqs = list(read_training_sequences(d, "fk-slice").values())
    rng = np.random.default_rng(0)
    text = rng.standard_normal((len(tokens), 8)).astype(np.float32)

    class Enc:  # identity of a fake encoder (the text vectors above are random)
        def identity(self):
            return {"name": "random-test-vectors"}

    out = pretrain_tables(d, "fk-slice", Enc(), seqs, tokens, doms, text, hp=HP)
    for dom in ("A", "B"):
        n = int((doms == dom).sum())
        assert out[dom]["item_emb"].shape == (n, 16) and out[dom]["proj"].shape == (16, 8)
        assert list(out[dom]["item_tokens"]) == list(tokens[doms == dom])
    mans = sorted(f for f in os.listdir(d) if f.startswith("fk-slice.pretrain-") and f.endswith(".json"))
    assert len(mans) == 2
    m = json.loads(open(os.path.join(d, mans[0])).read())
    assert m["identity"]["hyper_parameters"]["hidden_size"] == 16 and m["sequences"] > 0
    stamp = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if ".pretrain-" in f}
    again = pretrain_tables(d, "fk-slice", Enc(), seqs, tokens, doms, text, hp=HP)
    assert np.array_equal(again["A"]["item_emb"], out["A"]["item_emb"])
    assert stamp == {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if ".pretrain-" in f}


@pytest.mark.slow
def test_training_improves_validation_over_random():
    # a domain where item i is always followed by item i + 1: learnable
    seqs = [[(s + k) % 30 + 1 for k in range(6)] for s in range(30)] * 4
    text = np.random.default_rng(0).standard_normal((31, 8)).astype(np.float32)
    res = pretrain_domain(seqs, text, dict(HP, epochs=30, patience=30, dropout=0.1))
    assert res["valid_hit@10"] > 0.9  # random ranking of 30 items would give ~0.33


def test_length_buckets_leave_losses_and_gradients_unchanged(monkeypatch):
    import recbole_cdsr.trainer.pretrain_ct as pct

    torch.manual_seed(0)
    m = CollabTextPretrainer(31, 8, dict(HP, bucket_overhead=0))  # small batch: let the plan use 3 groups
    m.eval()  # no dropout: both ways must give the same numbers
    text = torch.randn(31, 8)
    lens = [2, 9, 3, 10, 1, 5, 9]
    inp = torch.zeros(len(lens), 10, dtype=torch.long)
    for i, n in enumerate(lens):
        inp[i, :n] = torch.randint(1, 31, (n,))
    pos = torch.where(inp > 0, torch.randint(1, 31, inp.shape), 0)
    neg = torch.where(inp > 0, torch.randint(1, 31, inp.shape), 0)
    assert len(pct.plan_length_buckets((inp > 0).sum(1), 3, 0)) == 3  # the case under test
    out = {}
    for k in (1, 3):
        m.zero_grad()
        m.length_buckets = k
        bce, nce = m.losses(inp, pos, neg, text)
        (bce + 0.1 * nce).backward()
        out[k] = (bce.detach(), nce.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert torch.allclose(out[1][0], out[3][0], atol=1e-6) and torch.equal(out[1][1], out[3][1])
    assert len(out[1][2]) == len(out[3][2]) > 0
    for g1, g3 in zip(out[1][2], out[3][2]):
        assert torch.allclose(g1, g3, atol=1e-6)


def test_validation_hit_at_10_is_the_pessimistic_full_ranking():
    torch.manual_seed(1)
    m = CollabTextPretrainer(41, 8, HP)
    with torch.no_grad():  # ties: item 7 scores exactly as item 3 for every history
        m.enc.item_embedding.weight[7] = m.enc.item_embedding.weight[3]
    lens = [1, 4, 10, 2, 7, 3, 10, 5, 6, 1, 8]
    hist = torch.zeros(len(lens), 10, dtype=torch.long)
    for i, n in enumerate(lens):
        hist[i, :n] = torch.randint(1, 41, (n,))
    target = torch.randint(1, 41, (len(lens),))
    target[:3] = 3  # tied with item 7: pessimistic ranks count item 7
    m.eval()
    hits = 0
    with torch.no_grad():
        for i in range(len(lens)):  # one row at a time, untrimmed
            h = m.enc(hist[i : i + 1])[0, lens[i] - 1]
            s = m.enc.item_embedding.weight @ h
            t = int(target[i])
            rank = 1 + sum(1 for c in range(1, 41) if c != t and s[c] >= s[t])
            hits += rank <= 10
    want = hits / len(lens)
    m.train()
    assert m.hit_at_10(hist, target, chunk=3) == want
    assert m.hit_at_10(hist, target, chunk=1024) == want
    assert m.training  # back in training mode
    # every item tied with the target (a constant model) ranks it last: no hit
    with torch.no_grad():
        m.enc.item_embedding.weight[:] = 1.0
    assert m.hit_at_10(hist, target) == 0.0


def test_nt_xent_is_the_public_loss_on_dot_products_with_both_kinds_of_negatives():
    """By hand, in plain Python: for each of the 2n rows, -log softmax of its positive among
    [every row of the other view, every other row of its own view], logits = dot / tau."""
    import math

    from recbole_cdsr.trainer.pretrain_ct import nt_xent

    torch.manual_seed(0)
    a, b = torch.randn(4, 3) * 2, torch.randn(4, 3) * 2  # dot products well outside [-1, 1]
    tau = 0.7
    dot = lambda x, y: sum(float(p) * float(q) for p, q in zip(x, y)) / tau  # noqa: E731
    losses = []
    for x_view, y_view in ((a, b), (b, a)):
        for i in range(4):
            logits = [dot(x_view[i], y_view[j]) for j in range(4)]  # cross-view, positive at j = i
            logits += [dot(x_view[i], x_view[j]) for j in range(4) if j != i]  # same view, self excluded
            m = max(logits)
            lse = m + math.log(sum(math.exp(v - m) for v in logits))
            losses.append(lse - logits[i])
    want = sum(losses) / len(losses)
    assert nt_xent(a, b, tau).item() == pytest.approx(want, rel=1e-5)
    # the cosine, cross-view-only variant is a different number
    cos = torch.nn.functional.normalize
    lbl = torch.arange(4)
    other = 0.5 * (torch.nn.functional.cross_entropy(cos(a, dim=-1) @ cos(b, dim=-1).t() / tau, lbl)
                   + torch.nn.functional.cross_entropy(cos(b, dim=-1) @ cos(a, dim=-1).t() / tau, lbl))
    assert abs(other.item() - want) > 0.1


def test_contrastive_term_covers_inputs_targets_and_negatives(monkeypatch):
    import recbole_cdsr.trainer.pretrain_ct as pct

    seen = {}
    real = pct.nt_xent

    def spy(a, b, tau=1.0):
        seen["n"] = a.shape[0]
        return real(a, b, tau)

    monkeypatch.setattr(pct, "nt_xent", spy)
    m = CollabTextPretrainer(31, 8, HP)
    inp = torch.tensor([[1, 2, 0], [3, 0, 0]])
    pos = torch.tensor([[2, 4, 0], [5, 0, 0]])
    neg = torch.tensor([[20, 21, 0], [22, 0, 0]])
    bce, nce = m.losses(inp, pos, neg, torch.randn(31, 8))
    assert seen["n"] == 8  # items 1 2 3 4 5 and the negatives 20 21 22
    nce.backward()
    assert m.enc.item_embedding.weight.grad[[20, 21, 22]].abs().sum(1).gt(0).all()
    # the public pre-training: its backbone, xavier-normal projection, Adam betas (0.9, 0.98)
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    assert isinstance(m.enc, PublicSASRecEncoder) and DEFAULTS["adam_betas"] == [0.9, 0.98]
    assert abs(m.proj.weight.std().item() - (2.0 / (8 + 16)) ** 0.5) < 0.06
