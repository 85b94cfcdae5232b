import hashlib
import os

import numpy as np
import pytest
import torch

from recbole.utils import init_seed

from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
from recbole_cdsr.llm.encoders import read_item_titles
from recbole_cdsr.llm.pseudo_items import write_pseudo_items
from recbole_cdsr.data.atomic import read_training_sequences
from recbole_cdsr.stages.llmcdsr import pretrain_tables
from recbole_cdsr.stages.llmcdsr_inputs import stage1_inputs
from recbole_cdsr.quick_start import run_recbole_cdsr
from recbole_cdsr.trainer.llmcdsr import LLMCDSRTrainer

from conftest import Killed, base_config, killer_after, pretrain_hp


class HashEncoder:
    """Deterministic stand-in vectors (a test double for the text encoder's interface)."""

    dim = 12

    def identity(self):
        return {"name": "hash-vectors-for-tests"}

    def encode(self, texts):
        out = [np.frombuffer(hashlib.sha256(t.encode()).digest()[: self.dim], dtype=np.uint8) for t in texts]
        v = np.asarray(out, dtype=np.float32) / 255.0 - 0.5
        return v / np.linalg.norm(v, axis=1, keepdims=True)


side_info_expected = {}


@pytest.fixture(scope="module")
def side_info(slice_data):
    d = os.path.join(slice_data, "fk-slice")
    users, overlapped = stage1_inputs(d, "fk-slice")
    # "generations": the other-domain titles of an overlapped user, one per single user
    records = {}
    for i, (u, dom, _) in enumerate(users):
        names = overlapped[dom][i % len(overlapped[dom])][1][:6]
        records[u] = {"user": u, "domain": dom, "status": "ok", "names": names}
    enc = HashEncoder()
    pseudo = write_pseudo_items(d, "fk-slice", records, enc, {"test": "synthetic"})
    tokens, doms, _ = read_item_titles(os.path.join(d, "fk-slice.item"))
    text = enc.encode([str(t) for t in tokens])
    seqs = list(read_training_sequences(d, "fk-slice").values())
    out = pretrain_tables(d, "fk-slice", enc, seqs, tokens, doms, text,
                          hp=pretrain_hp(hidden_size=64, epochs=2, patience=1, batch_size=64))
    tables = {dom: v["path"] for dom, v in out.items()}
    side = {"pseudo_items": pseudo, "recall_tables": tables}
    side_info_expected["users_with_pseudo"] = sum(1 for r in records.values() if len(r["names"]) > 2)
    return side


def _setup(tmp, slice_data, side_info, **kw):
    cfg = CDSRConfig("LLMCDSR", "fk-slice", config_dict=base_config(
        tmp, data_path=slice_data, eval_neg_num=50, train_batch_size=16, aug_batch_size=8,
        meta_batch_size=16, **side_info, **kw))
    init_seed(cfg["seed"], True)
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    train, valid, test = cdsr_data_preparation(cfg, ds)
    model = cfg.model_class(cfg, train.dataset)
    return cfg, ds, (train, valid, test), model


def test_sequence_view_and_side_information_loaded(tmp_path, slice_data, side_info):
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    assert ds.train_view == "sequence" and len(train.dataset) == 399  # one row per training user
    assert ds.pseudo_items["index"].shape[1] == 6 and (ds.pseudo_items["count"] > 0).sum() == side_info_expected["users_with_pseudo"] > 200
    assert set(ds.recall_tables) == {"A", "B"} and ds.recall_tables["A"]["proj"].shape == (64, 12)


def test_meta_step_moves_only_the_poolers(tmp_path, slice_data, side_info):
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    poolers_before = [p.weight.clone() for p in model.poolers]
    batch, aug, meta = next(iter(train)), next(trainer._aug_iter), next(trainer._meta_iter)
    assert (len(batch), len(aug), len(meta)) == (16, 8, 16)  # train, aug and meta batch sizes
    assert cfg["train_batch_size"] == 16
    trainer.meta_step(batch, aug, meta)
    grads = [p.weight.grad for p in model.poolers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # second-order signal reached both
    assert all(not torch.equal(p.weight, b) for p, b in zip(model.poolers, poolers_before))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters())


def test_inserted_items_are_context_only(tmp_path, slice_data, side_info):
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    aug = next(trainer._aug_iter)
    inputs, targets, ok, emb, inserted_in = model.augmented(aug)
    assert inputs.shape[1] == cfg["MAX_ITEM_LIST_LENGTH"] and emb.shape[:2] == inputs.shape
    seq = model.whole_sequence(aug)
    own = set(seq[seq > 0].tolist())
    dom = torch.as_tensor(ds.item_domain)
    user_dom = dom[seq[:, 0]]
    # every inserted input is of the other domain; targets the loss uses are never inserted
    ins_items = inputs[inserted_in]
    assert len(ins_items) > 0 and (dom[ins_items] != user_dom.repeat_interleave(inserted_in.sum(1))).all()
    used_targets = targets[ok]
    assert (dom[used_targets] == user_dom.repeat_interleave(ok.sum(1))).all()
    assert set(used_targets.tolist()) <= own
    real = (seq > 0).sum(1)
    assert (ok.sum(1) <= real).all()  # a real first item becomes a target only after inserted context
    # the real items keep their order
    for b in range(len(seq)):
        kept = [x for x, i in zip(torch.cat([inputs[b], targets[b, -1:]]).tolist(),
                                  torch.cat([inserted_in[b], torch.tensor([False])]).tolist()) if x and not i]
        full = [x for x in seq[b].tolist() if x]
        assert kept == full[-len(kept):]


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path, slice_data, side_info):
    def short(tag, **kw):
        cfg = base_config(str(tmp_path / tag), data_path=slice_data, epochs=1, steps_per_epoch=3,
                          train_batch_size=16, aug_batch_size=8, meta_batch_size=16, eval_neg_num=50,
                          **side_info, **kw)
        return run_recbole_cdsr("LLMCDSR", "fk-slice", config_dict=cfg, saved=False, verbose=False)

    a, b = short("a"), short("b")
    assert a["test_result"] == b["test_result"]


@pytest.mark.slow
def test_ablation_modes_do_what_they_say(tmp_path, slice_data, side_info):
    """Three training steps per mode from the same seed: only ``full`` trains the poolers
    (meta step); ``no_meta`` still augments (its backbone moves away from the backbone-only
    one); ``random_recall`` recalls other items than the (mean-pooled) learned recall."""
    trained = {}
    for mode in ("full", "backbone_only", "random_recall", "no_meta"):
        cfg, _, (train, _, _), model = _setup(str(tmp_path / mode), slice_data, side_info, llmcdsr_mode=mode,
                                              steps_per_epoch=3)
        init_seed(cfg["seed"], True)
        LLMCDSRTrainer(cfg, model)._train_epoch(train, 0)
        trained[mode] = model

    def poolers(m):
        return torch.cat([p.weight.detach().flatten() for p in m.poolers])

    assert poolers(trained["full"]).abs().sum() > 0
    for mode in ("backbone_only", "random_recall", "no_meta"):
        assert not poolers(trained[mode]).any(), mode
    assert not trained["backbone_only"].has_recall and not hasattr(trained["backbone_only"], "pseudo_emb")
    emb = {m: trained[m].backbone.item_embedding.weight.detach() for m in trained}
    assert not torch.allclose(emb["no_meta"], emb["backbone_only"])
    batch = next(iter(train))
    with torch.no_grad():
        learned, _ = trained["no_meta"].recall(batch, with_grad=False)
        random_ids, _ = trained["random_recall"].recall(batch, with_grad=False)
    assert learned.shape == random_ids.shape and not torch.equal(learned, random_ids)


@pytest.mark.slow
def test_one_command_runs_all_stages_and_caches_them(tmp_path, slice_data, capsys):
    import json
    import shutil

    import run_recbole_cdsr

    data = tmp_path / "data"
    shutil.copytree(os.path.join(slice_data, "fk-slice"), data / "fk-slice",
                    ignore=shutil.ignore_patterns("*.pseudo-*", "*.pretrain-*", "*.gen-*"))
    args = ["--model=LLMCDSR", "--dataset=fk-slice", f"--data_path={data}", f"--checkpoint_dir={tmp_path / 's'}",
            f"--results_dir={tmp_path / 'r'}", "--epochs=1", "--steps_per_epoch=2", "--train_batch_size=16",
            "--aug_batch_size=8", "--meta_batch_size=16", "--eval_neg_num=50", "--pretrain_epochs=1",
            "--show_progress=False", "--state=WARNING"]
    assert run_recbole_cdsr.main(args) == 0
    files = os.listdir(data / "fk-slice")
    assert any(".gen-" in f for f in files) and any(".pseudo-" in f for f in files)
    assert sum(".pretrain-" in f and f.endswith(".npz") for f in files) == 2
    res = json.loads(open(os.path.join(tmp_path / "r", os.listdir(tmp_path / "r")[0])).read())
    assert res["stages"]["generator"] == "retrieval" and "NOT an LLM" in res["stages"]["stage1"]["note"]
    assert res["train_view"] == "sequence" and 0 <= res["test"]["sampled"]["A/hit@10"] <= 1
    stamps = {f: os.path.getmtime(data / "fk-slice" / f) for f in os.listdir(data / "fk-slice")
              if any(x in f for x in (".gen-", ".pseudo-", ".pretrain-", ".textemb-"))}
    assert run_recbole_cdsr.main(args) == 0  # second run: every stage reused
    assert stamps == {f: os.path.getmtime(data / "fk-slice" / f) for f in stamps}


@pytest.mark.slow
def test_quiet_run_reports_its_stages_progress(tmp_path, slice_data, caplog):
    """A quiet run with a ``report`` callback (how the benchmark runs) hands the stages'
    progress lines to ``report`` (stage 1's generation count, each stage-2 epoch of both
    domains), then the training's; stage 1's warning still goes to the log, not to ``report``;
    the package logger is as before once the run ends."""
    import logging
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.join(slice_data, "fk-slice"), data / "fk-slice",
                    ignore=shutil.ignore_patterns("*.pseudo-*", "*.pretrain-*", "*.gen-*"))
    cfg = base_config(str(tmp_path), data_path=str(data), epochs=1, steps_per_epoch=2, train_batch_size=16,
                      aug_batch_size=8, meta_batch_size=16, eval_neg_num=50, pretrain_epochs=1)
    lines = []
    with caplog.at_level(logging.WARNING):
        run_recbole_cdsr("LLMCDSR", "fk-slice", config_dict=cfg, saved=False, verbose=False, report=lines.append)
    stage1 = [x for x in lines if x.startswith("stage 1: retrieval stand-in (not an LLM): ")]
    assert stage1 and stage1[-1].split(": ")[2].startswith(f"{len(stage1_inputs(str(data / 'fk-slice'), 'fk-slice')[0])} of ")
    for dom, k in (("A", 1), ("B", 2)):
        assert sum(x.startswith(f"stage 2 [domain {dom}, {k} of 2]: epoch 1/1: ") for x in lines) == 1
    assert lines[-1].startswith("epoch 1/1: train ")
    assert lines.index(stage1[-1]) < min(i for i, x in enumerate(lines) if x.startswith("stage 2"))
    assert not any("RETRIEVAL STAND-IN" in x for x in lines) and "RETRIEVAL STAND-IN" in caplog.text
    pkg = logging.getLogger("recbole_cdsr")
    assert pkg.propagate and pkg.level == logging.NOTSET and not pkg.handlers


@pytest.mark.parametrize("inner,aug_input_grad", [("adam", False), ("sgd", False), ("adam_fresh", False),
                                                  ("adam", True)])
def test_split_meta_gradient_equals_the_full_second_order_one(tmp_path, slice_data, side_info, inner,
                                                              aug_input_grad):
    import higher

    # a large inner step, so that every row the meta loss reads visibly moves (a row left
    # stale, or a missing second-order path, changes the meta loss and its gradient)
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info, meta_inner_optimizer=inner,
                                           meta_inner_lr=0.05, meta_inner_aug_input_grad=aug_input_grad)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    loader = iter(train)
    for _ in range(2):  # the backbone's Adam has moments and a step count (carried into the inner step)
        trainer.optimizer.zero_grad()
        model.calculate_loss(next(loader)).backward()
        trainer.optimizer.step()
    batch, aug, meta = next(loader), next(trainer._aug_iter), next(trainer._meta_iter)
    for p in model.poolers:  # away from the symmetric zero start
        torch.nn.init.normal_(p.weight, std=0.5)
    # float64: the first Adam step of adam_fresh, lr g / (|g| + eps), turns float32 rounding
    # of tiny gradients into visible differences between two exact computations
    model.double()
    for st in trainer.optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and k != "step":
                st[k] = v.double()
    if inner == "adam":
        opt = trainer.optimizer
    elif inner == "adam_fresh":  # the public code: an Adam that never stepped
        opt = torch.optim.Adam(model.backbone.parameters(), lr=cfg["meta_inner_lr"], betas=(0.9, 0.98))
    else:
        opt = torch.optim.SGD(model.backbone.parameters(), lr=cfg["meta_inner_lr"])
    torch.manual_seed(5)
    with higher.innerloop_ctx(model.backbone, opt, copy_initial_weights=True,
                              override={"lr": [cfg["meta_inner_lr"]]}) as (fnet, diffopt):
        # the public inner loss: ONE mean over the original and augmented rows; the augmented
        # inputs' embeddings come from outside the functional copy (no gradient into it)
        loss = model.joint_mean(model.orig_loss(batch, net=fnet),
                                model.aug_loss(aug, net=fnet, detach_inputs=not aug_input_grad))
        diffopt.step(loss)
        ref_loss = model.calculate_loss(meta, net=fnet)
        ref_loss.backward()
    reference = [p.weight.grad.clone() for p in model.poolers]
    state = {p: {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in model.backbone.parameters()}
    torch.manual_seed(5)
    trainer.meta_step(batch, aug, meta)
    for p, st in state.items():  # the backbone optimiser's moments and step counts are only read
        assert all(torch.equal(trainer.optimizer.state[p][k], v) for k, v in st.items())
    assert abs(trainer.last_meta_loss - ref_loss.item()) < 1e-6 * max(1.0, abs(ref_loss.item()))
    for p, r in zip(model.poolers, reference):
        assert r.abs().sum() > 0
        assert torch.allclose(p.weight.grad, r, rtol=1e-4, atol=1e-7)


def test_dropping_all_padding_columns_changes_no_real_position(tmp_path, slice_data, side_info):
    """seq_loss runs the backbone on columns up to the longest row only; with left-aligned
    rows and causal attention that must leave every real position's output unchanged."""
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    model.eval()
    seq = model.whole_sequence(next(iter(train)))[:, :-1]
    n = int((seq > 0).sum(1).max())
    assert n < seq.size(1)  # the case the trimming is for
    full = model.backbone(seq)[:, :n]
    short = model.backbone(seq[:, :n])
    real = seq[:, :n] > 0
    assert torch.allclose(full[real], short[real], atol=1e-5)


def test_length_buckets_are_the_cheapest_split_and_cover_every_row():
    import itertools
    import random

    from recbole_cdsr.model.layers import plan_length_buckets

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 11)
        lens = [rng.randint(1, 20) for _ in range(n)]
        overhead, k_max = rng.choice([0, 3, 10]), rng.randint(1, 4)
        groups = plan_length_buckets(torch.tensor(lens), k_max, overhead)
        assert len(groups) <= k_max
        assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(n))
        assert all(L == max(lens[i] for i in r.tolist()) for r, L in groups)
        s = sorted(lens)
        best = min(
            sum((b[i + 1] - b[i]) * s[b[i + 1] - 1] + overhead for i in range(k))
            for k in range(1, k_max + 1)
            for b in ([0, *c, n] for c in itertools.combinations(range(1, n), k - 1))
        )
        assert sum(len(r) * L + overhead for r, L in groups) == best
    # a batch of short rows and one long row: the long row runs alone
    groups = plan_length_buckets(torch.tensor([3, 4, 50, 2, 5, 4]), 3, 0)
    assert [L for _, L in groups][-1] == 50 and groups[-1][0].tolist() == [2]


def test_length_buckets_leave_the_loss_and_its_gradients_unchanged(tmp_path, slice_data, side_info):
    from recbole_cdsr.model.layers import plan_length_buckets

    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    model.eval()  # no dropout: both runs compute the same function
    model.bucket_overhead = 0
    for p in model.poolers:
        torch.nn.init.normal_(p.weight, std=0.5)
    batch, aug = next(iter(train)), next(trainer._aug_iter)
    seq = model.whole_sequence(batch)[:, :-1]
    assert len(plan_length_buckets((seq > 0).sum(1), 3, 0)) == 3  # the case under test
    out = {}
    for k in (1, 3):
        model.length_buckets = k
        model.zero_grad()
        torch.manual_seed(11)  # same negatives and insertion positions
        loss = model.joint_mean(model.orig_loss(batch), model.aug_loss(aug))
        loss.backward()
        out[k] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert abs(out[1][0] - out[3][0]) < 1e-5
    assert len(out[1][1]) == len(out[3][1]) and any(g.abs().sum() > 0 for g in out[3][1][-2:])
    for a, b in zip(out[1][1], out[3][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("fresh", [False, True])
def test_flat_differentiable_adam_equals_highers_per_tensor_adam(fresh, amsgrad, monkeypatch):
    import higher

    from recbole_cdsr.trainer.llmcdsr import FlatDifferentiableAdam

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.9, 0.98), weight_decay=0.01, amsgrad=amsgrad)
    if not fresh:  # moments and step counts to carry into the inner step
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(5, 6)).pow(2).sum().backward()
            opt.step()
    x, y = torch.randn(7, 6), torch.randn(4, 6)
    phi = torch.randn(6, requires_grad=True)  # the outer parameter, through the inner loss
    results = []
    per_tensor = higher.optim.DifferentiableAdam._update
    for cls in (higher.optim.DifferentiableAdam, FlatDifferentiableAdam):
        if cls is FlatDifferentiableAdam and not amsgrad:  # must take the flat path
            monkeypatch.setattr(higher.optim.DifferentiableAdam, "_update", None)
        fnet = higher.monkeypatch(net, copy_initial_weights=False)
        diffopt = cls(opt, net.parameters(), fmodel=fnet)
        diffopt.step(fnet(x * phi).pow(2).sum())
        outer = fnet(y).pow(2).sum()
        (g,) = torch.autograd.grad(outer, phi)
        results.append(([p.detach() for p in fnet.fast_params], g, outer.item()))
    monkeypatch.setattr(higher.optim.DifferentiableAdam, "_update", per_tensor)
    (p_ref, g_ref, o_ref), (p_flat, g_flat, o_flat) = results
    assert g_ref.abs().sum() > 0 and o_ref == pytest.approx(o_flat, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(p_ref, p_flat))
    assert torch.allclose(g_ref, g_flat, rtol=1e-5, atol=1e-7)


def test_the_shadow_backbone_is_reused_and_its_graph_released(tmp_path, slice_data, side_info):
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    loader = iter(train)
    trainer.meta_step(next(loader), next(trainer._aug_iter), next(trainer._meta_iter))
    shadow = trainer._fnet
    trainer.meta_step(next(loader), next(trainer._aug_iter), next(trainer._meta_iter))
    assert trainer._fnet is shadow and trainer.meta_steps == 2
    # after a step the shadow holds only the backbone's own weights: no graph kept alive
    assert len(shadow._fast_params) == 1
    assert all(a is b for a, b in zip(shadow.fast_params, model.backbone.parameters()))


def _by_hand_bce(model, calls):
    """Sum and count of the next-item BCE of captured seq_loss calls, one row at a time,
    untrimmed, in plain Python over positions: softplus(-h.e(target)) + softplus(h.e(neg))
    at every position whose target is real and not inserted."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    emb = model.backbone.item_embedding.weight.detach()
    with torch.no_grad():
        for inputs, targets, ok, neg in calls:
            for r in range(inputs.size(0)):
                h = model.backbone(inputs[r : r + 1])[0]
                for t in range(inputs.size(1)):
                    if ok[r, t] and targets[r, t] > 0:
                        pos = float(h[t] @ emb[targets[r, t]])
                        ng = float(h[t] @ emb[neg[r, t]])
                        total += float(F.softplus(torch.tensor(-pos))) + float(F.softplus(torch.tensor(ng)))
                        count += 1
    return total, count


@pytest.mark.parametrize("reuse", [True, False])
def test_main_step_loss_is_one_mean_over_original_and_augmented_positions(tmp_path, slice_data, side_info, reuse):
    """The public code concatenates the original and the augmented rows and takes ONE mean
    of the BCE over all their target positions (not a mean per part, summed)."""
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info, meta_reuse_orig_grad=reuse)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    batch, aug, meta = next(iter(train)), next(trainer._aug_iter), next(trainer._meta_iter)
    calls = []
    real_seq_loss = model.seq_loss

    def capture(net, inputs, targets, target_ok, extra=None, neg=None, **kw):
        inputs, targets, target_ok, extra = model._trim(inputs, targets, target_ok, extra)
        if neg is None:
            neg = model.sample_negatives(targets, torch.cat([inputs, targets], dim=1))
        calls.append((inputs, targets, target_ok, neg))
        return real_seq_loss(net, inputs, targets, target_ok, extra=extra, neg=neg, **kw)

    model.seq_loss = capture
    model.eval()  # no dropout: the by-hand pass computes the same function
    reuse_args = trainer.meta_step(batch, aug, meta)
    orig_from_meta = calls[0]  # with reuse, the main step takes the original part from the meta step
    calls.clear()
    loss = trainer.main_step(batch, aug, reuse_args)
    parts = ([orig_from_meta] if reuse else []) + calls
    assert len(parts) == 2
    (s_o, n_o), (s_a, n_a) = (_by_hand_bce(model, [c]) for c in parts)
    assert n_o > 0 and n_a > 0 and n_a < n_o  # augmented rows hold fewer positions
    want = (s_o + s_a) / (n_o + n_a)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert abs(loss.item() - (s_o / n_o + s_a / n_a)) > 0.1  # not the sum of two means
    # the gradient is that of the one mean: compare with autograd on the same rows and negatives
    grads = {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}
    model.backbone.zero_grad()
    ref = model.joint_mean(*(real_seq_loss(model.backbone, i, t, o, neg=g) for i, t, o, g in parts))
    ref.backward()
    for n, p in model.backbone.named_parameters():
        if n == "item_embedding.weight":
            continue  # the augmented inputs' embeddings carry the straight-through term's rows too
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7), n


def test_recalled_items_go_before_real_items_and_are_never_targets(tmp_path, slice_data, side_info):
    """The public code inserts each recalled item before one of the n real items, chosen
    uniformly, never after the last one; inserted items are context, never targets."""
    cfg, ds, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    gaps, k = [], model.recall_k
    torch.manual_seed(0)
    for _ in range(12):
        aug = next(trainer._aug_iter)
        seq = model.whole_sequence(aug)
        inputs, targets, ok, _, ins_in = model.augmented(aug, with_grad=False)
        ids, _ = model.recall(aug, with_grad=False)
        window = torch.cat([inputs, targets[:, -1:]], dim=1)
        ins = torch.cat([ins_in, torch.zeros_like(ins_in[:, :1])], dim=1)
        ins[:, -1] = False
        # the inserted flag of the window's last column, recomputed from augmented()'s mask
        for b in range(len(seq)):
            row = window[b].tolist()
            n_items = sum(1 for x in row if x)
            last = n_items - 1
            real = [x for x in seq[b].tolist() if x]
            assert row[last] == real[-1]  # the sequence ends with its own last real item
            # targets the loss uses: real items only
            tgt_ok = ok[b].tolist()
            t_ins = ins_in[b].tolist()[1:] + [False]
            assert not any(o and i for o, i in zip(tgt_ok, t_ins))
            # recalled items of one gap keep their recall order; record each item's gap
            rec = ids[b].tolist()
            flags = ins_in[b].tolist() + [False]
            pos_real, g = 0, []
            for x, f in zip(row[: n_items], flags[: n_items]):
                if f:
                    g.append((pos_real, rec.index(x)))
                else:
                    pos_real += 1
            if len(row[: n_items]) == len(real) + k:  # nothing cut by the window
                assert len(g) == k
                gaps += [pos / len(real) for pos, _ in g]
                for (p1, r1), (p2, r2) in zip(g, g[1:]):
                    assert p1 < p2 or r1 < r2
    # uniform over "before item 0 .. before item n-1": the first gap is used, "after the last" never
    assert min(gaps) == 0.0 and max(gaps) < 1.0
    assert 0.35 < sum(gaps) / len(gaps) < 0.6


def test_public_backbone_is_the_default_and_the_ablation_uses_it(tmp_path, slice_data, side_info):
    from recbole_cdsr.model.layers import CausalSeqEncoder, PublicSASRecEncoder

    cfg, _, (train, _, _), model = _setup(str(tmp_path), slice_data, side_info)
    assert isinstance(model.backbone, PublicSASRecEncoder)
    trainer = LLMCDSRTrainer(cfg, model)
    assert trainer.meta_optimizer.param_groups[0]["betas"] == (0.9, 0.98)  # the public meta optimiser
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    _, _, _, ablation = _setup(str(tmp_path), slice_data, side_info, llmcdsr_mode="backbone_only")
    assert isinstance(ablation.backbone, PublicSASRecEncoder)
    _, _, _, rb = _setup(str(tmp_path), slice_data, side_info, backbone="recbole")
    assert isinstance(rb.backbone, CausalSeqEncoder)
    with pytest.raises(ValueError, match="'backbone' must be one of public, recbole"):
        _setup(str(tmp_path), slice_data, side_info, backbone="bert")


@pytest.mark.slow
def test_an_interrupted_llmcdsr_run_continues_where_it_stopped(tmp_path, slice_data, side_info):
    """resumable: LLMCDSR's trainer also saves its meta optimiser, its step counter and where
    its cycling augmentation and meta loaders are (mid-pass, after a wrap): a run killed in
    its third epoch's validation and started again ends exactly as the uninterrupted run."""
    def go(tmp, report=None):
        cfg = base_config(tmp, data_path=slice_data, resumable=True, epochs=4, steps_per_epoch=5,
                          train_batch_size=16, aug_batch_size=16, meta_batch_size=16, eval_neg_num=50, seed=5,
                          **side_info)
        return run_recbole_cdsr("LLMCDSR", "fk-slice", config_dict=cfg, saved=False, verbose=False, report=report)

    whole = go(str(tmp_path / "whole"))

    tmp = str(tmp_path / "cut")
    with pytest.raises(Killed):
        go(tmp, report=killer_after(3))
    states = [f for f in os.listdir(os.path.join(tmp, "saved")) if f.endswith(".resume.pth")]
    assert len(states) == 1
    own = torch.load(os.path.join(tmp, "saved", states[0]), weights_only=True)["own"]
    assert own["meta_steps"] == 10 and own["meta_optimizer"]["state"]
    assert 0 < own["aug"]["taken"] and 0 < own["meta"]["taken"] < 10, (own["aug"]["taken"], own["meta"]["taken"])
    said = []
    again = go(tmp, report=said.append)
    assert said[0].startswith("continuing after epoch 2 of an interrupted run")
    r, w = again["results"], whole["results"]
    assert r["valid_history"] == w["valid_history"] and len(r["valid_history"]) == 4
    assert r["selection"]["best_epochs"] == w["selection"]["best_epochs"]
    assert again["test_result"] == whole["test_result"]
    assert [x["epoch"] for x in r["timing"]["resumed_at"]] == [2]
