"""C2DSR: graphs from training sequences only, corruption, the six loss terms, scoring."""

import os

import numpy as np
import pytest
import torch

from conftest import setup_model
from recbole_cdsr.model.c2dsr import ParamFreeGCN, transition_graphs

SMALL = dict(hidden_size=32, eval_neg_num=50, train_batch_size=64)


def _setup(tmp, data, **kw):
    return setup_model("C2DSR", tmp, data, **dict(SMALL, **kw))


def test_transition_graphs_by_hand():
    # items 1, 2 in domain 0; 3, 4 in domain 1 (0 is padding)
    dom = np.array([-1, 0, 0, 1, 1])
    adj, single = transition_graphs([[1, 3, 2, 4], [1, 2], [1, 3]], 5, dom)
    a, s = adj.to_dense(), single.to_dense()
    want = torch.zeros(5, 5)
    want[1, 3], want[1, 2] = 2 / 3, 1 / 3  # 1 -> 3 twice, 1 -> 2 once: counted, row-normalised
    want[3, 2], want[2, 4] = 1.0, 1.0  # directed: no 2 -> 3 or 4 -> 2
    assert torch.allclose(a, want)
    want_s = torch.zeros(5, 5)
    want_s[1, 2] = 1.0  # 1 -> 2 in both [1, 3, 2, 4] (3 skipped) and [1, 2]
    want_s[3, 4] = 1.0
    assert torch.allclose(s, want_s)


def test_parameter_free_gcn_is_the_mean_of_input_and_propagation():
    torch.manual_seed(0)
    g = ParamFreeGCN(4, 1, dropout=0.5).eval()
    emb = torch.randn(5, 4)
    adj, _ = transition_graphs([[1, 3, 2, 4], [1, 2], [1, 3]], 5, np.array([-1, 0, 0, 1, 1]))
    want = (emb + adj.to_dense() @ emb + g.biases[0]) / 2
    assert torch.allclose(g(emb, adj), want, atol=1e-6)


def test_graph_is_built_from_training_sequences_only(tmp_path, slice_data):
    cfg, ds, (_, _, test), model = _setup(str(tmp_path), slice_data)
    train_edges = {(int(a), int(b)) for s in ds.training_sequences for a, b in zip(s[:-1], s[1:])}
    adj = model.adj.to_dense()
    hist, n = test.dataset.inter_feat["item_id_list"], test.dataset.inter_feat["item_length"]
    target = test.dataset.inter_feat["item_id"]
    held_out = [(int(hist[r, n[r] - 1]), int(target[r])) for r in range(len(target))]
    held_out = [e for e in held_out if e not in train_edges]
    assert len(held_out) > 10  # the last history item -> the test target: never in training
    assert all(adj[a, b] == 0 for a, b in held_out)
    some = next(iter(train_edges))
    assert adj[some] > 0 and torch.allclose(adj.sum(1)[adj.sum(1) > 0], torch.tensor(1.0))


def test_training_rows_hold_two_items_of_each_domain(tmp_path, slice_data):
    cfg, ds, (train, _, _), _ = _setup(str(tmp_path), slice_data)
    L = cfg["MAX_ITEM_LIST_LENGTH"]
    want = 0
    for s in ds.training_sequences:
        counts = np.bincount(ds.item_domain[s[-(L + 1):]], minlength=2)
        want += bool((counts >= 2).all())
    assert len(train.dataset) == want > 0
    assert want < len(ds.training_sequences) / 2  # single-domain users (2/3 of the slice) are out
    _, ds0, (train0, _, _), _ = _setup(str(tmp_path), slice_data, train_min_items_per_domain=0)
    assert len(train0.dataset) == len(ds0.training_sequences)


def test_corruption_keeps_domains_and_positions(tmp_path, slice_data):
    _, ds, (train, _, _), model = _setup(str(tmp_path), slice_data)
    batch = next(iter(train))
    seq, uid = batch["item_id_list"], batch["user_id"]
    dom = model.item_domain[seq]
    for d in (0, 1):
        bad = model.corrupt(seq, uid, d)
        assert torch.equal(model.item_domain[bad], dom)  # every slot keeps its domain (padding too)
        assert torch.equal(bad[dom != d], seq[dom != d])  # the other domain's items are untouched
        assert (bad[dom == d] != seq[dom == d]).float().mean() > 0.9  # its own are replaced
        assert torch.equal(model.corrupt(seq, uid, d), bad)  # drawn once per user: the same every epoch
    model.resample_corruption = True
    assert not torch.equal(model.corrupt(seq, uid, 0), model.corrupt(seq, uid, 0))


def test_every_loss_term_is_finite_and_trains_its_parts(tmp_path, slice_data):
    _, _, (train, _, _), model = _setup(str(tmp_path), slice_data)
    batch = next(iter(train))
    terms = model.losses(batch)
    assert len(terms) == 6 and all(torch.isfinite(t) and t > 0 for t in terms)
    parts = {"share_x": model.lin_x.weight, "share_y": model.lin_y.weight, "x": model.encoders[1].last_layernorm.weight,
             "y": model.encoders[2].last_layernorm.weight, "mi_x": model.disc[0].weight, "mi_y": model.disc[1].weight}
    untouched = {"share_x": model.lin_y.weight, "share_y": model.lin_x.weight, "x": model.encoders[2].last_layernorm.weight,
                 "y": model.encoders[1].last_layernorm.weight, "mi_x": model.disc[1].weight, "mi_y": model.disc[0].weight}
    for term, name in zip(terms, parts):
        model.zero_grad()
        term.backward(retain_graph=True)
        assert parts[name].grad is not None and parts[name].grad.abs().sum() > 0, name
        assert untouched[name].grad is None or untouched[name].grad.abs().sum() == 0, name
        assert model.item_emb.weight.grad.abs().sum() > 0, name  # every term reaches the mixed table
    model.eval()  # no dropout: the total is exactly lambda x CE terms + (1 - lambda) x infomax terms
    with torch.no_grad():
        t = model.losses(batch)
        assert torch.allclose(model.calculate_loss(batch), 0.7 * sum(t[:4]) + 0.3 * sum(t[4:]))


def test_scores_come_from_the_target_domains_head(tmp_path, slice_data):
    _, ds, (_, _, test), model = _setup(str(tmp_path), slice_data)
    model.eval()
    batch = test.dataset.inter_feat[:8]
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        assert scores.shape == (8, model.n_items) and torch.isinf(scores[:, 0]).all()
        a, b = model.items_a, model.items_b
        assert torch.isfinite(scores[:, a]).all() and torch.isfinite(scores[:, b]).all()
        # by hand for row 0: lin_x(mixed state at the last input + A-view state at the last A input)
        seq, n = batch["item_id_list"][:, : int(batch["item_length"].max())], batch["item_length"]
        h_mix, h_a, _ = model.encode(seq, model.tables())
        dom = model.item_domain[seq[0, : n[0]]]
        last_a = int(torch.nonzero(dom == 0).max()) if (dom == 0).any() else int(n[0]) - 1
        want = model.lin_x(h_mix[0, n[0] - 1] + h_a[0, last_a])
        assert torch.allclose(scores[0, a], want, atol=1e-5)
        model.lin_x.weight.zero_()
        again = model.full_sort_predict(batch)
    assert torch.equal(again[:, b], scores[:, b]) and not torch.equal(again[:, a], scores[:, a])


@pytest.mark.slow
def test_one_command_on_real_food_kitchen_slice(tmp_path, slice_data, capsys):
    import json

    import run_recbole_cdsr

    args = ["--model=C2DSR", "--dataset=fk-slice", f"--data_path={slice_data}", f"--checkpoint_dir={tmp_path / 's'}",
            f"--results_dir={tmp_path / 'r'}", "--epochs=2", "--eval_step=1", "--hidden_size=32", "--eval_neg_num=50",
            "--show_progress=False", "--state=WARNING"]
    assert run_recbole_cdsr.main(args) == 0
    res = json.loads(open(os.path.join(tmp_path / "r", os.listdir(tmp_path / "r")[0])).read())
    assert res["model"] == "C2DSR" and res["train_view"] == "sequence"
    assert res["timing"]["epochs_trained"] == 2 and len(res["valid_history"]) == 2
    assert set(res["test"]) == {"sampled", "full"} and "A/mrr@10" in res["test"]["full"]
    out = capsys.readouterr().out
    assert "Test results of C2DSR on fk-slice" in out


# -- the cheaper exact paths (fast_layers, fused_loss) ----------------------------------
def test_gcn_rows_equal_the_whole_table_propagation_by_hand():
    """ParamFreeGCN.rows gives the rows of forward (depths 1 and 2, eval mode), and in
    training one dropout mask per table row, shared by every row that reads it."""
    from recbole_cdsr.model.c2dsr import RowLookup, csr_parts

    torch.manual_seed(0)
    dom = np.array([-1, 0, 0, 1, 1, 0])
    adj, _ = transition_graphs([[1, 3, 2, 4], [1, 2], [1, 3], [5, 3, 5]], 6, dom)
    emb = torch.randn(6, 4, requires_grad=True)
    for depth in (1, 2):
        g = ParamFreeGCN(4, depth, dropout=0.5).eval()
        ids = torch.tensor([0, 2, 5])
        whole = g(emb, adj)
        rows = g.rows(emb, csr_parts(adj), ids)
        assert torch.allclose(rows, whole[ids], atol=1e-6)
        (gw,) = torch.autograd.grad(whole[ids].sum(), emb)
        (gr,) = torch.autograd.grad(rows.sum(), emb)
        assert gr.abs().sum() > 0 and torch.allclose(gr, gw, atol=1e-6)
    # rows 1 and 4 of this graph both read row 2 alone: in training, one mask for row 2
    one = torch.sparse_coo_tensor(torch.tensor([[1, 4], [2, 2]]), torch.ones(2), (6, 6), check_invariants=True).coalesce()
    g = ParamFreeGCN(4, 1, dropout=0.5).train()
    flat = torch.ones(6, 4)
    for _ in range(5):
        out = g.rows(flat, csr_parts(one), torch.tensor([1, 4]))
        assert torch.equal(out[0], out[1])
        assert set(torch.unique(torch.round((out - g.biases[0] / 2) * 1e4) / 1e4).tolist()) <= {0.5, 1.5}  # (1 + {0, 2}) / 2
    look = RowLookup(torch.arange(6.0).view(3, 2), torch.tensor([0, 3, 7]), 9)
    assert torch.equal(look[torch.tensor([[7, 0]])], torch.tensor([[[4.0, 5.0], [0.0, 1.0]]]))
    with pytest.raises(IndexError, match="outside the rows"):
        look[torch.tensor([3, 4])]


def _fast_and_old(tmp, data, model="C2DSR", **kw):
    old = setup_model(model, os.path.join(tmp, "old"), data, dataset="food-kitchen", fast_layers=False,
                      fused_loss=False, **kw)
    new = setup_model(model, os.path.join(tmp, "new"), data, dataset="food-kitchen", **kw)
    return old, new


def compare_fast_and_old_paths(tmp, data, model):
    """Loss terms, gradients and scores of the fast path against the path before it, on
    real Food-Kitchen rows, dropout off (the paths draw their masks differently)."""
    (_, _, (train, _, test), old), (_, _, _, new) = _fast_and_old(tmp, data, model, hidden_size=32, dropout_prob=0.0)
    assert new.fast and new.fused and not old.fast and not old.fused
    new.load_state_dict(old.state_dict())
    assert all(e.pack_below == 0.8 and e.kept_draws for e in new.encoders)
    batch = next(iter(train))
    grads, terms = [], []
    for net in (old, new):
        net.train()
        torch.manual_seed(5)
        t = net.losses(batch)
        sum(t).backward()
        terms.append(torch.stack([x.detach() for x in t]))
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert torch.allclose(terms[0], terms[1], rtol=1e-5) and (terms[0] > 0).all()
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 20
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-3, atol=1e-6), name
    assert grads[1]["item_emb.weight"].abs().sum() > 0
    for net in (old, new):
        net.eval()
    rows = test.dataset.inter_feat[:64]
    with torch.no_grad():
        a, b = old.full_sort_predict(rows), new.full_sort_predict(rows)
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b)) and torch.allclose(a[finite], b[finite], atol=1e-5)
    return old, new, batch


@pytest.mark.slow
def test_fast_path_equals_the_old_path_on_real_food_kitchen(tmp_path, fk_data):
    old, new, batch = compare_fast_and_old_paths(str(tmp_path), fk_data, "C2DSR")
    # with dropout on, the fast path trains: finite terms, gradients into every table
    new.train()
    new.zero_grad()
    loss = new.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    for t in (new.item_emb, new.item_emb_a, new.item_emb_b):
        assert t.weight.grad.abs().sum() > 0


def test_discriminator_as_x_w_y_equals_bilinear(tmp_path, slice_data):
    _, _, _, model = _setup(str(tmp_path), slice_data)
    x, y = torch.randn(7, 32), torch.randn(7, 32)
    model.fast = False
    want = model.disc_score(0, x, y)
    model.fast = True
    assert torch.allclose(model.disc_score(0, x, y), want, atol=1e-5)
    assert torch.allclose(want, model.disc[0](x, y))
