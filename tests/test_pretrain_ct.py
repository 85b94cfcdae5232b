import json
import os

import numpy as np
import torch

from recbole_cdsr.model.pretrain_ct import CollabTextPretrainer, DEFAULTS, pretrain_dataset, pretrain_domain
from recbole_cdsr.llm.stage1 import read_training_sequences
from recbole_cdsr.llm.encoders import read_item_titles

HP = dict(hidden_size=16, inner_size=32, epochs=3, patience=2, batch_size=32, max_len=10)


def test_both_losses_reach_the_projection_and_embeddings():
    hp = dict(DEFAULTS, **HP)
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

    out = pretrain_dataset(d, "fk-slice", Enc(), seqs, tokens, doms, text, hp=HP)
    for dom in ("A", "B"):
        n = int((doms == dom).sum())
        assert out[dom]["item_emb"].shape == (n, 16) and out[dom]["proj"].shape == (16, 8)
        assert list(out[dom]["item_tokens"]) == list(tokens[doms == dom])
    mans = sorted(f for f in os.listdir(d) if f.startswith("fk-slice.pretrain-") and f.endswith(".json"))
    assert len(mans) == 2
    m = json.loads(open(os.path.join(d, mans[0])).read())
    assert m["identity"]["hyper_parameters"]["hidden_size"] == 16 and m["sequences"] > 0
    stamp = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if ".pretrain-" in f}
    again = pretrain_dataset(d, "fk-slice", Enc(), seqs, tokens, doms, text, hp=HP)
    assert np.array_equal(again["A"]["item_emb"], out["A"]["item_emb"])
    assert stamp == {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if ".pretrain-" in f}


def test_training_improves_validation_over_random():
    # a domain where item i is always followed by item i + 1: learnable
    seqs = [[(s + k) % 30 + 1 for k in range(6)] for s in range(30)] * 4
    text = np.random.default_rng(0).standard_normal((31, 8)).astype(np.float32)
    res = pretrain_domain(seqs, text, dict(HP, epochs=30, patience=30, dropout=0.1))
    assert res["valid_hit@10"] > 0.9  # random ranking of 30 items would give ~0.33
