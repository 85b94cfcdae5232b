"""URLLM's dual-graph model: attribute words, the attribute graph, the alignment terms."""

import os

import numpy as np
import pytest
import torch

from conftest import setup_model
from recbole_cdsr.model.urllm import attribute_graph, attribute_words, normalise_text

SMALL = dict(hidden_size=16, urllm_attr_size=6, eval_neg_num=50, train_batch_size=64)


def _setup(tmp, data, **kw):
    return setup_model("URLLM", tmp, data, **dict(SMALL, **kw))


def test_attribute_words_by_the_public_rule():
    assert normalise_text("The Green_Tea, 20-pack") == "green tea 20 pack"
    assert normalise_text("A \u2018Cast\u2019-Iron pan; an iron`s") == "cast iron pan iron s"
    texts = ["", "The Green_Tea, 20-pack", "green tea bags, lid", "Cast-Iron pan", "iron PAN lid", "A tea pot"]
    doms = [-1, 0, 0, 1, 1, 1]
    vocab, words = attribute_words(texts, doms)
    # green, tea: 2 A items; iron, pan: 2 B items; lid: 1 A + 1 B item (dropped); tea stays on
    # the B item too (it qualified through A); 20, pack, bags, cast, pot: one item each
    assert vocab == ["green", "iron", "pan", "tea"]
    assert words == [[], ["green", "tea"], ["green", "tea"], ["iron", "pan"], ["iron", "pan"], ["tea"]]
    adj = attribute_graph(words, vocab).to_dense()
    n = len(texts)
    green, iron, pan, tea = (n + i for i in range(4))
    assert adj.shape == (n + 4, n + 4)
    assert adj[1, green] == adj[1, tea] == 0.5 and adj[5, tea] == 1.0 and adj[0].sum() == 0
    assert torch.allclose(adj[tea, [1, 2, 5]], torch.full((3,), 1 / 3)) and adj[tea, :n].sum() == pytest.approx(1.0)
    assert adj[:n, :n].sum() == 0 and adj[n:, n:].sum() == 0  # only item <-> word edges


def test_tokens_losses_and_scores(tmp_path, slice_data):
    cfg, ds, (train, _, test), model = _setup(str(tmp_path), slice_data)
    assert model.n_words > 50 and model.encoders[0].position_embedding.weight.shape[1] == 32  # 2d
    batch = next(iter(train))
    terms = model.losses(batch)
    assert len(terms) == 8 and all(torch.isfinite(t) for t in terms)
    for i, part in ((6, model.lin_align_view[0].weight), (7, model.lin_align_view[1].weight),
                    (0, model.lin_x.weight), (4, model.disc[0].weight)):
        model.zero_grad()
        terms[i].backward(retain_graph=True)
        assert part.grad is not None and part.grad.abs().sum() > 0, i
        assert model.item_emb_att.weight.grad.abs().sum() > 0, i  # the attribute table feeds every term
    model.eval()
    with torch.no_grad():  # no dropout; the corruption noise is drawn from the same seed twice
        torch.manual_seed(1)
        t = model.losses(batch)
        want = 0.5 * (0.7 * sum(t[:4]) + 0.3 * sum(t[4:6])) + 0.5 * (t[6] + t[7])
        torch.manual_seed(1)
        assert torch.allclose(model.calculate_loss(batch), want)
        scores = model.full_sort_predict(test.dataset.inter_feat[:4])
    assert scores.shape == (4, model.n_items) and torch.isfinite(scores[:, model.items_a]).all()


def test_corrupted_tokens_get_noise_only_there(tmp_path, slice_data):
    _, _, (train, _, _), model = _setup(str(tmp_path), slice_data)
    model.eval()
    seq = next(iter(train))["item_id_list"][:, :5]
    with torch.no_grad():
        tables = model.tables()
        clean = model.tokens(0, seq, tables)
        noisy = model.tokens(0, seq, tables, corrupted=True)
    assert torch.equal(model.tokens(0, seq, tables), clean) and not torch.equal(noisy, clean)
    z = (noisy - clean)[clean != 0] * torch.sign(clean[clean != 0])  # sign(e) N(0, 1) 0.05, sign undone
    assert abs(z.mean().item()) < 0.005 and 0.045 < z.std().item() < 0.055
    assert torch.equal(noisy[clean == 0], clean[clean == 0])


@pytest.mark.slow
def test_one_command_on_real_food_kitchen_slice(tmp_path, slice_data):
    import json

    import run_recbole_cdsr

    args = ["--model=URLLM", "--dataset=fk-slice", f"--data_path={slice_data}", f"--checkpoint_dir={tmp_path / 's'}",
            f"--results_dir={tmp_path / 'r'}", "--epochs=2", "--hidden_size=16", "--urllm_attr_size=6",
            "--eval_neg_num=50", "--show_progress=False", "--state=WARNING"]
    assert run_recbole_cdsr.main(args) == 0
    res = json.loads(open(os.path.join(tmp_path / "r", os.listdir(tmp_path / "r")[0])).read())
    assert res["model"] == "URLLM" and res["timing"]["epochs_trained"] == 2 and len(res["valid_history"]) == 2
    assert np.isfinite(res["test"]["full"]["B/mrr@10"])
