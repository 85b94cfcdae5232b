"""LeCDSR: frozen LLM tables, hand-computed losses, padding, positions, profiles without
leakage, the LLM profile path over HTTP, and a short run on real Food-Kitchen."""

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from conftest import base_config
from dataset_converters import write_synthetic_cdsr
from recbole.utils import init_seed
from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
from recbole_cdsr.stages.lecdsr import SYSTEM_PROMPT, profile_items, profile_requests
from recbole_cdsr.stages.lecdsr import prepare as prepare_lecdsr
from recbole_cdsr.model.lecdsr import LeCDSR, alignment_loss, hinge_loss

SMALL = dict(hidden_size=16, adapter_inner_size=24, train_batch_size=64, eval_neg_num=20, n_neg=7,
             MAX_ITEM_LIST_LENGTH=8)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lecdsr-syn"))
    write_synthetic_cdsr(d, "tiny-cdsr", seed=3)
    return d


def setup(tmp, data_path, **kw):
    cfg = CDSRConfig("LeCDSR", "tiny-cdsr", config_dict=base_config(tmp, data_path=data_path, **dict(SMALL, **kw)))
    updates, record = prepare_lecdsr(cfg)
    for k, v in updates.items():
        cfg[k] = v
    init_seed(cfg["seed"], True)
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    train, valid, test = cdsr_data_preparation(cfg, ds)
    model = LeCDSR(cfg, train.dataset)
    return cfg, ds, (train, valid, test), model, updates


def expected_table(ds, path, token_key, field, n_rows):
    with np.load(path) as z:
        toks, emb = z[token_key], z["emb"]
    table = np.zeros((n_rows, emb.shape[1]), np.float32)
    for t, e in zip(toks, emb):
        i = ds.field2token_id[field].get(str(t), 0)
        if i:
            table[i] = e
    return torch.from_numpy(table)


@pytest.mark.slow
def test_frozen_tables_are_the_cached_vectors_before_and_after_training(tmp_path, syn):
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    cfg, ds, (train, valid, _), model, up = setup(str(tmp_path), syn, epochs=2)
    items = expected_table(ds, up["item_text_table"], "item_tokens", ds.iid_field, ds.item_num)
    users = expected_table(ds, up["user_profiles"], "users", ds.uid_field, ds.user_num)
    assert items.shape == (ds.item_num, 384) and users.shape == (ds.user_num, 384)  # MiniLM vectors
    assert (items[1:].norm(dim=1) > 0.99).all() and (users[1:].norm(dim=1) > 0.99).all()  # every row filled
    assert torch.equal(model.item_text, items) and torch.equal(model.user_profiles, users)
    names = {n for n, _ in model.named_parameters()}
    assert not any("item_text" in n or "user_profiles" in n for n in names)  # buffers, not weights
    trainer = CDSRTrainer(cfg, model)
    trainer.fit(train, valid, saved=False, show_progress=False, verbose=False)
    assert trainer.steps_done > 0
    assert torch.equal(model.item_text, items) and torch.equal(model.user_profiles, users)
    # ...while the trainable parts did move, and the padding rows stayed zero
    assert model.item_embedding.weight[0].abs().sum() == 0 and model.position_embedding.weight[0].abs().sum() == 0


def test_hinge_loss_by_hand_per_sample_not_broadcast():
    pos = torch.tensor([1.0, 0.0])
    neg = torch.tensor([[0.5, 2.0, -30.0], [1.0, 0.0, 9.0]])
    tau = 2.0
    # sample 1: relu(-0.25 + 1) + relu(0.5 + 1) + relu(-15.5 + 1) = 0.75 + 1.5 + 0
    # sample 2: relu(0.5 + 1) + relu(0 + 1) + relu(4.5 + 1) = 1.5 + 1 + 5.5
    assert hinge_loss(pos, neg, tau).item() == pytest.approx((2.25 + 8.0) / 2)


def _alignment_by_loops(x, y, mask, tau2):
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        idx = [t for t in range(x.shape[1]) if mask[b, t]]
        for i in idx:
            logit_r = [float(x[b, i] @ y[b, j]) / tau2 for j in idx]
            logit_c = [float(x[b, j] @ y[b, i]) / tau2 for j in idx]
            sim = [(float(x[b, i] @ x[b, j]) + float(y[b, i] @ y[b, j])) / (2 * tau2) for j in idx]
            tgt = np.exp(sim) / np.exp(sim).sum()
            ce_r = -(tgt * (np.array(logit_r) - math.log(np.exp(logit_r).sum()))).sum()
            ce_c = -(tgt * (np.array(logit_c) - math.log(np.exp(logit_c).sum()))).sum()
            total += (ce_r + ce_c) / 2
            count += 1
    return total / count


def test_alignment_loss_by_hand_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[False, True, True, True], [False, False, True, True]])
    got = alignment_loss(x, y, mask, 1.7).item()
    assert got == pytest.approx(_alignment_by_loops(x, y, mask, 1.7), rel=1e-5)
    x2, y2 = x.clone(), y.clone()
    x2[~mask], y2[~mask] = 100.0, -100.0  # padding content changes nothing
    assert alignment_loss(x2, y2, mask, 1.7).item() == pytest.approx(got, rel=1e-6)


def test_calculate_loss_equals_hinge_of_scores_plus_weighted_alignment(tmp_path, syn):
    cfg, ds, (train, _, _), model, _ = setup(str(tmp_path), syn)
    model.eval()
    batch = next(iter(train))
    neg = model.sample_negatives(batch["item_id"], cfg["n_neg"])
    assert neg.shape == (len(batch), 7)
    rep, E, T, real = model.forward(batch, with_parts=True)
    full = model.full_sort_predict(batch)
    rows = torch.arange(len(batch))
    pos_s, neg_s = full[rows, batch["item_id"]], full[rows.unsqueeze(1), neg]
    by_hand = (torch.relu((neg_s - pos_s.unsqueeze(1)) / 9.0 + 1).sum(1).mean()
               + 0.6 * _alignment_by_loops(E.detach(), T.detach(), real, 7.0))
    assert model.calculate_loss(batch, neg=neg).item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_negatives_come_from_the_targets_domain_and_never_are_the_target(tmp_path, syn):
    _, ds, _, model, _ = setup(str(tmp_path), syn)
    pos = torch.tensor([1, 2, ds.item_num - 1, ds.item_num - 2] * 50)
    neg = model.sample_negatives(pos, 300)
    dom = torch.as_tensor(ds.item_domain)
    assert (dom[neg] == dom[pos].unsqueeze(1)).all() and (neg != pos.unsqueeze(1)).all()
    # uniform over the rest of the domain: every other item of the domain is drawn
    a_items = set(ds.domain_items[int(dom[1])].tolist()) - {1}
    assert set(neg[0].tolist()) | set(neg[4].tolist()) == a_items


def test_padding_does_not_change_scores(tmp_path, syn):
    _, ds, (_, _, test), model, _ = setup(str(tmp_path), syn)
    model.eval()
    batch, _ = next(iter(test))
    base = model.full_sort_predict(batch)
    seq, n = batch["item_id_list"], batch["item_length"]
    assert (n < seq.shape[1]).any()
    garbage = seq.clone()
    pad = torch.arange(seq.shape[1]).unsqueeze(0) >= n.unsqueeze(1)
    garbage[pad] = torch.randint(1, ds.item_num, (int(pad.sum()),))
    batch.interaction["item_id_list"] = garbage  # real items where padding was
    assert not torch.allclose(garbage, seq)
    assert torch.allclose(model.full_sort_predict(batch), base, atol=1e-5)
    # a row scores the same alone as inside its batch
    batch.interaction["item_id_list"] = seq
    one = batch[torch.tensor([3])]
    assert torch.allclose(model.full_sort_predict(one)[0], base[3], atol=1e-5)


def test_adapter_sees_padded_row_counts_and_padding_changes_nothing(tmp_path, syn):
    """The distinct items of a batch are padded to a multiple of row_bucket before the text
    adapter (a new shape per batch grows oneDNN's per-shape cache without bound on CPU);
    the scores, the loss and its gradients are those of the unpadded rows."""
    cfg, ds, (train, _, _), model, _ = setup(str(tmp_path), syn)
    assert model.row_bucket == cfg["lecdsr_row_bucket"] == 1024  # the default, from the YAML
    model.eval()
    batch = next(iter(train))
    neg = model.sample_negatives(batch["item_id"], cfg["n_neg"])
    n_distinct = int(torch.unique(batch["item_id_list"]).numel())
    seen = []
    hook = model.item_adapter.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))

    def run(bucket):
        model.row_bucket = bucket
        model.zero_grad()
        loss = model.calculate_loss(batch, neg=neg)
        loss.backward()
        return loss.item(), full_sort(), {n: p.grad.clone() for n, p in model.item_adapter.named_parameters()}

    def full_sort():
        with torch.no_grad():
            return model.full_sort_predict(batch)

    loss1, s1, g1 = run(1)
    assert seen == [n_distinct, n_distinct] and n_distinct % 64  # unpadded: a shape of its own
    seen.clear()
    loss64, s64, g64 = run(64)
    assert seen == [-(-n_distinct // 64) * 64] * 2
    hook.remove()
    assert loss64 == pytest.approx(loss1, rel=1e-6)
    assert torch.allclose(s64, s1, atol=1e-6)
    for name in g1:
        assert g1[name].abs().sum() > 0
        assert torch.allclose(g64[name], g1[name], atol=1e-7), name


def test_positions_count_back_per_domain(tmp_path, syn):
    _, ds, _, model, _ = setup(str(tmp_path), syn)
    a = [i for i in range(1, ds.item_num) if ds.item_domain[i] == 0][:3]
    b = [i for i in range(1, ds.item_num) if ds.item_domain[i] == 1][:3]
    seq = torch.tensor([[a[0], b[0], a[1], b[1], b[2], 0, 0, 0]])  # oldest first, left-aligned
    right, real = model.right_align(seq, torch.tensor([5]))
    assert right.tolist() == [[0, 0, 0, a[0], b[0], a[1], b[1], b[2]]]
    # newest first: b2 -> 1, b1 -> 2, a1 -> 1, b0 -> 3, a0 -> 2; padding 0
    assert model.positions(right, real).tolist() == [[0, 0, 0, 2, 3, 1, 2, 1]]


def test_profiles_never_see_validation_or_test_targets(tmp_path):
    d = tmp_path / "leak"
    d.mkdir()
    (d / "leak.item").write_text(
        "item_id:token\tdomain:token\ttitle:token_seq\n"
        + "".join(f"i{k}\t{'A' if k < 5 else 'B'}\ttitle {k}\n" for k in range(10))
        + "vtarget\tA\tLEAK VALID TARGET\nttarget\tB\tLEAK TEST TARGET\nwv\tA\tLEAK W VALID\nwt\tB\tLEAK W TEST\n")
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    # U is in all three files (leave-one-out style); W only in valid and test
    (d / "leak.train.inter").write_text(head + "U\ti0 i5\ti1\nX\ti2\ti6\n")
    (d / "leak.valid.inter").write_text(head + "U\ti0 i5 i1\tvtarget\nW\ti3 i7\twv\n")
    (d / "leak.test.inter").write_text(head + "U\ti0 i5 i1 vtarget\tttarget\nW\ti3 i7 wv\twt\n")
    from recbole_cdsr.llm.encoders import read_item_titles

    got = profile_items(str(d), "leak")
    assert got == {"U": ["i0", "i5", "i1"], "X": ["i2", "i6"], "W": ["i3", "i7"]}
    reqs = profile_requests(got, read_item_titles(str(d / "leak.item")), {"A": "Food", "B": "Kitchen"})
    for r in reqs:
        assert "LEAK" not in r["prompt"]["user"] and r["prompt"]["system"] == SYSTEM_PROMPT
    u = next(r for r in reqs if r["user"] == "U")
    assert u["item_text"] == "1. title 0  Food\n2. title 5  Kitchen\n3. title 1  Food"


class _ProfileServer(BaseHTTPRequestHandler):
    bodies = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        user = body["messages"][-1]["content"]
        text = "" if "synthetic item b7 " in user else "Likes items that follow each other."  # one empty answer
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)


def test_llm_profiles_over_http_are_resumable_and_an_empty_answer_is_an_error(tmp_path, syn):
    from recbole_cdsr.stages.lecdsr import ProfileError

    _ProfileServer.bodies = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ProfileServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        with pytest.raises(ProfileError, match=r"user profiles failed .*empty answer"):
            setup(str(tmp_path), syn, profile_generator="openai", llm_base_url=url, llm_model="m",
                  llm_max_retries=0, llm_concurrency=2)
        n_users = len(_ProfileServer.bodies)
        assert n_users == 400  # train 280 + valid 60 + test 60 synthetic users, one request each
        first = _ProfileServer.bodies[0]["messages"]
        assert first[0] == {"role": "system", "content": SYSTEM_PROMPT} and first[1]["role"] == "user"
        failed = sum(1 for b in _ProfileServer.bodies if "synthetic item b7 " in b["messages"][-1]["content"])
        assert 0 < failed < n_users
        # the rerun sends only the failed users again (they fail again: still one clear error)
        _ProfileServer.bodies = []
        with pytest.raises(ProfileError):
            setup(str(tmp_path), syn, profile_generator="openai", llm_base_url=url, llm_model="m",
                  llm_max_retries=0, llm_concurrency=2)
        assert len(_ProfileServer.bodies) == failed
    finally:
        srv.shutdown()
        srv.server_close()
    jsonl = [f for f in os.listdir(os.path.join(syn, "tiny-cdsr")) if f.startswith("tiny-cdsr.profile-") and f.endswith(".jsonl")]
    assert len(jsonl) == 1
    recs = [json.loads(x) for x in open(os.path.join(syn, "tiny-cdsr", jsonl[0]))]
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == n_users - failed and ok[0]["raw"] == "Likes items that follow each other."


def test_ablations_drop_their_inputs(tmp_path, syn):
    _, _, (train, _, _), model, up = setup(str(tmp_path), syn, lecdsr_use_profiles=False)
    assert "user_profiles" not in up and not hasattr(model, "user_profiles")
    assert model.calculate_loss(next(iter(train))).item() > 0
    _, _, (train, _, _), model, up = setup(str(tmp_path), syn, lecdsr_use_item_text=False)
    assert "item_text_table" not in up and not hasattr(model, "item_adapter")
    batch = next(iter(train))
    neg = model.sample_negatives(batch["item_id"], 7)
    rep = model.forward(batch)
    full = model.full_sort_predict(batch)
    rows = torch.arange(len(batch))
    hinge = torch.relu((full[rows.unsqueeze(1), neg] - full[rows, batch["item_id"]].unsqueeze(1)) / 9 + 1).sum(1).mean()
    assert model.calculate_loss(batch, neg=neg).item() == pytest.approx(hinge.item(), rel=1e-5)  # no alignment term
    assert rep.shape == (len(batch), 16)


def test_training_samples_have_at_least_two_items_before_the_target(tmp_path, syn):
    cfg, ds, (train, _, _), _, _ = setup(str(tmp_path), syn)
    assert cfg["train_min_history"] == 2 and ds.train_view == "prefix"
    assert int(train.dataset.inter_feat["item_length"].min()) == 2
    # count: every training sequence of n items gives n - 2 samples
    with open(os.path.join(syn, "tiny-cdsr", "tiny-cdsr.train.inter")) as f:
        next(f)
        expected = sum(len(line.split("\t")[1].split()) + 1 - 2 for line in f)
    assert len(train.dataset) == expected


@pytest.mark.slow
def test_one_command_on_real_food_kitchen_slice(tmp_path, slice_data, capsys):
    from run_recbole_cdsr import main

    args = [f"--data_path={slice_data}", "--model=LeCDSR", "--dataset=fk-slice", "--epochs=1", "--hidden_size=32",
            "--eval_neg_num=50", f"--checkpoint_dir={tmp_path / 'ck'}", f"--results_dir={tmp_path / 'res'}",
            "--show_progress=False", "--state=WARNING", "--use_gpu=False"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Test results of LeCDSR on fk-slice" in out and "full" in out
    res = json.load(open(next((tmp_path / "res").iterdir())))
    assert res["stages"]["profiles"]["source"]["generator"] == "titles"
    assert "NOT an LLM" in res["stages"]["profiles"]["source"]["note"]
    assert res["timing"]["train_steps"] > 0 and 0 <= res["test"]["full"]["A/hit@10"] <= 1


def test_profile_embedding_resumes_from_its_saved_parts(tmp_path):
    from recbole_cdsr.llm.encoders import encode_in_parts

    class Flaky:
        """Encodes a text as [len, first char code]; fails on the call numbered ``fail_at``."""

        def __init__(self, fail_at=None):
            self.calls, self.fail_at = [], fail_at

        def encode(self, texts):
            self.calls.append(list(texts))
            if len(self.calls) == self.fail_at:
                raise RuntimeError("killed")
            return np.asarray([[len(t), ord(t[0])] for t in texts], dtype=np.float32)

    texts = [f"text {i}" * (1 + i % 3) for i in range(23)]
    parts = str(tmp_path / "x.parts")
    first = Flaky(fail_at=4)
    with pytest.raises(RuntimeError, match="killed"):
        encode_in_parts(first, texts, parts, part_size=5)
    assert len(os.listdir(parts)) == 3  # parts 1-3 done and kept
    # a damaged part (wrong number of rows) is encoded again
    np.save(os.path.join(parts, "part-00001-of-00005.npy"), np.zeros((2, 2), np.float32))
    second = Flaky()
    table = encode_in_parts(second, texts, parts, part_size=5)
    assert [c[0] for c in second.calls] == [texts[5], texts[15], texts[20]]  # parts 2, 4, 5 only
    assert np.array_equal(table, Flaky().encode(texts)) and not os.path.exists(parts)


# -- faithfulness to the public code: initialisation, selection, the no-profile ablation ---

def _public_xavier_std(shape):
    """xavier-normal std of a tensor of ``shape`` (torch's fans: dim 1 in, dim 0 out, times
    the product of the remaining dims)."""
    rf = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return math.sqrt(2.0 / (shape[1] * rf + shape[0] * rf))


def test_default_init_is_the_public_xavier_normal_on_trainable_weights_only(tmp_path, syn):
    cfg, ds, _, model, up = setup(str(tmp_path), syn, hidden_size=64, adapter_inner_size=96)
    L, d = cfg["MAX_ITEM_LIST_LENGTH"], 64
    pooled = []
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        # the public filter is [1, L//2+1, d, 2]; ours drops the leading 1 (same values)
        shape = (1,) + tuple(p.shape) if name == "filter" else tuple(p.shape)
        z = p.detach().flatten() / _public_xavier_std(shape)
        if name in ("item_embedding.weight", "position_embedding.weight"):
            assert p[0].abs().sum() == 0  # padding row: zero (masked everywhere anyway)
            z = p.detach()[1:].flatten() / _public_xavier_std(shape)
        if z.numel() >= 500:
            assert abs(z.std().item() - 1) < 0.12 and abs(z.mean().item()) < 0.12, name
        pooled.append(z)
    pooled = torch.cat(pooled)
    assert abs(pooled.std().item() - 1) < 0.03 and abs(pooled.mean().item()) < 0.03
    # the checks that tell it from the public constructor's init (and from our old one)
    assert model.filter.std().item() == pytest.approx(math.sqrt(2 / ((L // 2 + 1) * 2 * d + 2 * d)), rel=0.12)
    n = ds.item_num
    assert model.out_bias.weight.std().item() == pytest.approx(math.sqrt(2 / (n + 1)), rel=0.25)
    assert model.feature_gate_item.weight.std().item() == pytest.approx(math.sqrt(2 / (2 * d)), rel=0.1)
    # 1-D parameters keep their constructor values; the frozen tables are the cached vectors
    assert torch.equal(model.item_adapter.net[1].weight, torch.ones(96))
    assert torch.equal(model.item_adapter.net[1].bias, torch.zeros(96))
    assert model.item_adapter.net[1].eps == 1e-5  # nn.LayerNorm's default, as the public adapters
    items = expected_table(ds, up["item_text_table"], "item_tokens", ds.iid_field, ds.item_num)
    users = expected_table(ds, up["user_profiles"], "users", ds.uid_field, ds.user_num)
    assert torch.equal(model.item_text, items) and torch.equal(model.user_profiles, users)
    assert cfg["lecdsr_init"] == "xavier" and model.init_scheme == "xavier"


def test_normal_init_is_the_public_constructor_and_bad_names_fail(tmp_path, syn):
    _, _, _, model, _ = setup(str(tmp_path), syn, hidden_size=64, adapter_inner_size=96, lecdsr_init="normal")
    assert model.init_scheme == "normal"
    for emb in (model.item_embedding, model.out_embedding):
        assert emb.weight[1:].std().item() == pytest.approx(1 / 64, rel=0.05)
    assert model.out_bias.weight.abs().sum() == 0
    assert model.filter.std().item() == pytest.approx(0.02, rel=0.1)
    _, _, _, model, _ = setup(str(tmp_path), syn, lecdsr_init="normal", embedding_init_std=0.1)
    assert model.item_embedding.weight[1:].std().item() == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="lecdsr_init"):
        setup(str(tmp_path), syn, lecdsr_init="kaiming")
    with pytest.raises(ValueError, match="lecdsr_user_vector"):
        setup(str(tmp_path), syn, lecdsr_use_profiles=False, lecdsr_user_vector="mean")


def test_no_profile_ablation_uses_trainable_user_ids(tmp_path, syn):
    cfg, ds, (train, _, test), model, _ = setup(str(tmp_path), syn, lecdsr_use_profiles=False)
    # scores depend on who the user is: the same histories under other user ids
    model.eval()
    tb, _ = next(iter(test))
    base = model.full_sort_predict(tb)
    users = tb["user_id"].clone()
    tb.interaction["user_id"] = users.roll(1)
    moved = model.full_sort_predict(tb)
    tb.interaction["user_id"] = users
    assert (base - moved).abs().amax(dim=1).min() > 1e-4  # every row changed
    # a trainable [user_num, d] table, initialised like the other weights (xavier-normal)
    weights = dict(model.named_parameters())
    assert "user_embedding.weight" in weights
    w = weights["user_embedding.weight"]
    assert w.shape == (ds.user_num, 16) and w.requires_grad
    assert w.std().item() == pytest.approx(math.sqrt(2 / (ds.user_num + 16)), rel=0.1)
    # the users of a training batch get a gradient, the others (held-out users among them) none
    model.train()
    batch = next(iter(train))
    model.calculate_loss(batch).backward()
    in_batch = torch.zeros(ds.user_num, dtype=torch.bool)
    in_batch[batch["user_id"]] = True
    assert (w.grad[in_batch].norm(dim=1) > 0).all() and w.grad[~in_batch].abs().sum() == 0
    assert model.user_vector == "id"
    # with one user's vector set to zero, that user's scores equal the zero-vector option's
    _, _, _, zero_model, _ = setup(str(tmp_path), syn, lecdsr_use_profiles=False, lecdsr_user_vector="zero")
    assert zero_model.user_vector == "zero" and not hasattr(zero_model, "user_embedding")
    zero_model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "user_embedding.weight"})
    zero_model.eval()
    with torch.no_grad():
        model.user_embedding.weight[tb["user_id"]] = 0.0
    assert torch.allclose(model.full_sort_predict(tb), zero_model.full_sort_predict(tb), atol=1e-6)


def test_model_selection_is_validation_mrr_at_10_over_999_sampled_negatives(tmp_path, syn):
    from recbole_cdsr.evaluation.protocol import metrics_from_ranks
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    cfg = CDSRConfig("LeCDSR", "tiny-cdsr", config_dict=base_config(str(tmp_path), data_path=syn))
    assert cfg["valid_metric"] == "mrr@10" and cfg["model_selection"] == "per_domain"
    assert cfg["freeze_stopped_domains"] is False  # public: both domains' bests update until the last epoch
    assert cfg["eval_protocol"][0] == "sampled" and cfg["eval_neg_num"] == 999  # public: target + 999 negatives
    cfg2, ds, _, model, _ = setup(str(tmp_path), syn)
    trainer = CDSRTrainer(cfg2, model)
    trainer.domain_names = list(ds.domain_names)
    assert trainer.selection_keys() == {dom: f"{dom}/mrr@10" for dom in ds.domain_names}
    # mrr@10 is the public MRR: 1/rank when the target is among the 10 best candidates, else 0
    ranks = torch.tensor([1, 3, 10, 11, 500])
    assert metrics_from_ranks(ranks, ["MRR"], [10])["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 5)


def test_a_run_waits_while_another_builds_the_datasets_stages_then_builds_them_itself(tmp_path):
    """Runs side by side (the benchmark's ``jobs: N``) build a dataset's stages once: while
    another process holds the stages lock, a run says it waits and writes nothing; once it
    is let go, it builds the profiles, trains, and lets go of the lock in turn."""
    import glob
    import time

    from dataset_converters.filelock import FileLock
    from recbole_cdsr.quick_start import run_recbole_cdsr

    data = str(tmp_path / "data")
    write_synthetic_cdsr(data, "tiny-cdsr", seed=3)
    folder = os.path.join(data, "tiny-cdsr")
    lock_path = os.path.join(folder, ".tiny-cdsr.stages.lock")
    holder = FileLock(lock_path).acquire()  # the other run, building the stages
    lines, out, errors = [], {}, []

    def run():
        try:
            out.update(run_recbole_cdsr("LeCDSR", "tiny-cdsr", config_dict=base_config(
                str(tmp_path), data_path=data, epochs=1, **SMALL), verbose=False, report=lines.append))
        except Exception as e:  # surfaced by the assertions below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not any("waiting for another run building the stages of tiny-cdsr" in ln for ln in lines):
        assert t.is_alive() and time.monotonic() < deadline, (errors, lines)
        time.sleep(0.2)
    waiting = next(ln for ln in lines if "waiting for another run" in ln)
    assert f"pid {os.getpid()}" in waiting and lock_path in waiting
    time.sleep(1.5)  # a waiting run builds nothing
    assert t.is_alive() and not glob.glob(os.path.join(folder, "tiny-cdsr.profiles-*"))
    holder.release()
    t.join(300)
    assert not t.is_alive() and not errors, errors
    assert len(glob.glob(os.path.join(folder, "tiny-cdsr.profiles-*.npz"))) == 1
    assert out["results"]["timing"]["train_steps"] > 0
    assert not os.path.exists(lock_path)  # let go: the next run takes it at once


def test_a_dataset_folder_that_refuses_the_stages_lock_still_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    from dataset_converters.filelock import FileLock
    from recbole_cdsr.quick_start import stages_lock

    def refuse(self):
        raise PermissionError(30, "Read-only file system", self.path)

    monkeypatch.setattr(FileLock, "acquire", refuse)
    ran = []
    with caplog.at_level("WARNING", logger="recbole_cdsr"):
        with stages_lock({"data_path": str(tmp_path), "dataset": "ro", "model": "LeCDSR"}):
            ran.append(True)
    assert ran == [True]
    assert "cannot create the stages lock" in caplog.text and "Read-only file system" in caplog.text


def test_the_after_training_stage_runs_under_the_stages_lock(tmp_path, monkeypatch):
    """An after-training stage (URLLM's LLM: LoRA adapters, generation files and title
    vectors cached next to the dataset) runs while its run holds the dataset's stages lock,
    so a second run on the same dataset cannot write those files at the same time; the lock
    is let go afterwards, and the stage's record reaches the results."""
    from dataset_converters.filelock import FileLock, LockBusy
    import recbole_cdsr.quick_start as qs

    data = str(tmp_path / "data")
    write_synthetic_cdsr(data, "tiny-cdsr", seed=3)
    lock_path = os.path.join(data, "tiny-cdsr", ".tiny-cdsr.stages.lock")
    seen = []

    def after(config, trainer, train_data, valid_data, test_data):
        try:
            FileLock(lock_path).acquire().release()
            seen.append("free")
        except LockBusy as e:
            seen.append(f"held by {e.holder}")
        return {"stage": "ran"}

    monkeypatch.setattr(qs, "get_after_training", lambda model: after)
    out = qs.run_recbole_cdsr("SASRec", "tiny-cdsr", config_dict=base_config(
        str(tmp_path), data_path=data, epochs=1, hidden_size=16, inner_size=16, n_layers=1, eval_neg_num=20),
        verbose=False)
    assert len(seen) == 1 and seen[0].startswith("held by") and f"pid {os.getpid()}" in seen[0], seen
    assert out["results"]["after_training"] == {"stage": "ran"}
    assert not os.path.exists(lock_path)
    FileLock(lock_path).acquire().release()  # let go: the next run takes it at once


def test_fast_path_equals_the_old_path_on_real_food_kitchen_rows(tmp_path, slice_data):
    """fast_layers: the candidates' scores as one batched product with a sparse table
    gradient, the FFTs over the [B, d, L] view: the same loss, gradients and scores as the
    path before them, on real Food-Kitchen rows (the same negatives)."""
    def build(tmp, **kw):
        cfg = CDSRConfig("LeCDSR", "fk-slice", config_dict=base_config(tmp, data_path=slice_data, **dict(SMALL, **kw)))
        for k, v in prepare_lecdsr(cfg)[0].items():
            cfg[k] = v
        init_seed(cfg["seed"], True)
        ds = create_cdsr_dataset(cfg, cfg.model_class)
        loaders = cdsr_data_preparation(cfg, ds)
        return loaders, LeCDSR(cfg, loaders[0].dataset)

    (train, _, test), old = build(str(tmp_path / "old"), fast_layers=False)
    _, new = build(str(tmp_path / "new"))
    assert new.fast and not old.fast
    new.load_state_dict(old.state_dict())
    batch = next(iter(train))
    neg = old.sample_negatives(batch["item_id"], 7)
    losses, grads = [], []
    for net in (old, new):
        net.train()
        loss = net.calculate_loss(batch, neg=neg)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and losses[0] > 0
    assert set(grads[0]) == set(grads[1]) and grads[1]["out_embedding.weight"].abs().sum() > 0
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name
    rows = test.dataset.inter_feat[:32]
    with torch.no_grad():
        old.eval()
        new.eval()
        assert torch.allclose(old.full_sort_predict(rows), new.full_sort_predict(rows), atol=1e-5)
