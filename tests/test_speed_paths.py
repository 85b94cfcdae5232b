"""Dynamic padding, whole-sequence training and the fused losses compute what RecBole's own
paths compute: per model, on real rows of Food-Kitchen."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.dataset import TARGET_LIST_FIELD, _prefix_rows, _window_rows
from recbole_cdsr.data.length_groups import (
    EXACT_UNDER_TRIMMING,
    NEG_TARGET_LIST_FIELD,
    NOT_EXACT_REASON,
    grouped_batches,
)
from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
from recbole_cdsr.model.fused_ce import linear_cross_entropy
from recbole_cdsr.trainer.whole_sequence import (
    FUSED_CE_MODELS,
    SEQUENCE_MODELS,
    bert4rec_loss,
    fused_prefix_loss,
    sequence_loss,
)
from recbole_cdsr.registry import UNSUPPORTED_RECBOLE_MODELS, recbole_sequential_models

from conftest import base_config

MODELS = [m for m in recbole_sequential_models() if m not in UNSUPPORTED_RECBOLE_MODELS]


def _seed(s=0):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# -- the fused cross-entropy -------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_full_logits(bias):
    _seed(1)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 101, (37,))
    ref = F.cross_entropy(h @ w.t() + (b if bias else 0), t)
    gref = torch.autograd.grad(ref * 3.0, [h, w] + ([b] if bias else []))
    out = linear_cross_entropy(h, w, t, bias=b, chunk=5)  # 8 chunks, the last one short
    g = torch.autograd.grad(out * 3.0, [h, w] + ([b] if bias else []))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(g, gref):
        assert r.abs().sum() > 0 and torch.allclose(a, r, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_by_hand_and_bad_input():
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # logits [0, 2], target 1: loss = log(1 + e^2) - 2
    out = linear_cross_entropy(h, w, torch.tensor([1]))
    assert abs(out.item() - (np.log(1 + np.exp(2.0)) - 2.0)) < 1e-6
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(h, w, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(h[:0], w, torch.tensor([], dtype=torch.long))


# -- batches -----------------------------------------------------------------------------
def test_grouped_batches_cover_every_row_once_sorted_within_chunks_and_seeded():
    rng = np.random.RandomState(0)
    lengths = rng.randint(1, 51, size=1000)
    g = torch.Generator().manual_seed(7)
    batches = grouped_batches(lengths, 32, 4, g)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert [len(b) for b in batches].count(32) == 31 and len(batches) == 32
    # a chunk of 4 batches is sorted by length, so a batch's lengths are a narrow band
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 20  # unsorted batches of 32 span ~45 of the 50 lengths
    again = grouped_batches(lengths, 32, 4, torch.Generator().manual_seed(7))
    assert all((a == b).all() for a, b in zip(batches, again))
    other = grouped_batches(lengths, 32, 4, torch.Generator().manual_seed(8))
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(batches, other))
    # evaluation: in length order, no randomness
    ev = grouped_batches(lengths, 100, 1, shuffle=False)
    assert (np.diff(lengths[np.concatenate(ev)]) >= 0).all()


def test_grouped_batches_by_target_budget():
    lengths = np.array([3, 1, 4, 2, 5])
    weights = np.array([3, 1, 4, 2, 5])
    ev = grouped_batches(lengths, 5, 1, weights=weights, shuffle=False)
    # length order 1, 2, 3, 4, 5 -> [1+2 (+3 > 5)], [3], [4], [5]
    assert [lengths[b].tolist() for b in ev] == [[1, 2], [3], [4], [5]]


# -- the whole-sequence view -------------------------------------------------------------
def test_window_rows_by_hand():
    # a sequence of 6 items with L = 3: first window [1 2 3] predicts 2 3 4; the targets 5
    # and 6 get rows [2 3 4] -> 5 and [3 4 5] -> 6 (as their prefix rows)
    uid, mat, length, last, tg = _window_rows(
        np.array([9]), [np.array([1, 2, 3, 4, 5])], np.array([6]), max_len=3
    )
    assert mat.tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert tg.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 6]]
    assert length.tolist() == [3, 3, 3] and last.tolist() == [4, 5, 6] and uid.tolist() == [9, 9, 9]
    # train_min_history 3: targets with fewer than 3 items before them are dropped
    _, _, _, _, tg = _window_rows(np.array([9]), [np.array([1, 2, 3, 4, 5])], np.array([6]), 3, 3)
    assert tg.tolist() == [[0, 0, 4], [0, 0, 5], [0, 0, 6]]


def test_windows_hold_exactly_the_prefix_targets_on_real_data(fk_data):
    import os

    path = os.path.join(fk_data, "food-kitchen", "food-kitchen.train.inter")
    uid, hist, tgt, ids = [], [], [], {}
    with open(path) as f:
        f.readline()
        for i, ln in enumerate(f):
            if i >= 3000:
                break
            _, h, t = ln.rstrip("\n").split("\t")
            uid.append(i)
            hist.append(np.array([ids.setdefault(x, len(ids) + 1) for x in h.split()]))
            tgt.append(ids.setdefault(t, len(ids) + 1))
    uid, tgt = np.array(uid), np.array(tgt)
    for L in (50, 4):  # 4: many sequences need tail rows
        pu, pm, pl, pt = _prefix_rows(uid, hist, tgt, L)
        wu, wm, wl, _, wt = _window_rows(uid, hist, tgt, L)
        assert (wt > 0).sum() == len(pt)
        prefix = sorted(zip(pu.tolist(), (tuple(r[:n]) for r, n in zip(pm, pl)), pt.tolist()))
        window = []
        for u, r, n, tg in zip(wu, wm, wl, wt):
            for p in range(n):
                if tg[p]:
                    window.append((int(u), tuple(r[: p + 1]), int(tg[p])))
        assert sorted(window) == prefix


# -- per-model exactness of trimmed batches ----------------------------------------------
@pytest.fixture(scope="module")
def model_env(tmp_path_factory, slice_data):
    return str(tmp_path_factory.mktemp("speedpaths")), slice_data


def _build(model, tmp, data, **kw):
    kw.setdefault("dynamic_padding", "off")
    cfg = base_config(tmp, data_path=data, train_batch_size=24, eval_batch_size=24, eval_neg_num=20,
                      pretrain_epochs=1, **kw)
    config = CDSRConfig(model, "fk-slice", config_dict=cfg)
    _seed(config["seed"])
    ds = create_cdsr_dataset(config, config.model_class)
    train, valid, _ = cdsr_data_preparation(config, ds)
    net = config.model_class(config, train._dataset)
    if model == "S3Rec":
        net.train_stage = "finetune"
        net.loss_fct = torch.nn.CrossEntropyLoss()
    return config, ds, train, valid, net


def _trim_all(inter, width, longest):
    from recbole.data.interaction import Interaction

    d = {}
    for k, v in inter.interaction.items():
        d[k] = v[:, :longest].clone() if (v.dim() == 2 and v.size(1) == width) else v.clone()
    return Interaction(d)


def _same(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_trimming_exactness_decides_auto(model_env, model):
    """Loss of a fixed training batch and full_sort_predict scores of real validation rows,
    with histories padded to 50 and cut to the batch's longest: equal exactly for the models
    in EXACT_UNDER_TRIMMING (dynamic_padding: auto turns it on for them), different (or
    failing) for the others."""
    tmp, data = model_env
    config, ds, train, valid, net = _build(model, tmp, data)
    L = config["MAX_ITEM_LIST_LENGTH"]
    net.eval()
    lengths = train._dataset.inter_feat["item_length"].numpy()
    idx = np.nonzero(lengths <= 6)[0][:24]  # short histories: most of 50 is padding
    _seed(3)
    batch = train.collate_fn(idx)
    longest = int(batch["item_length"].max())
    trimmed = _trim_all(batch, L, longest)
    ok = True
    try:
        with torch.no_grad():
            _seed(5)
            full_loss = net.calculate_loss(batch)
            _seed(5)
            trim_loss = net.calculate_loss(trimmed)
        ok = bool(torch.isfinite(full_loss)) and _same(full_loss.view(1), trim_loss.view(1))
        vi = valid._dataset.inter_feat
        rows = torch.from_numpy(np.nonzero(vi["item_length"].numpy() <= 6)[0][:24])
        inter = vi[rows]
        with torch.no_grad():
            _seed(5)
            s_full = net.full_sort_predict(inter)
            _seed(5)
            s_trim = net.full_sort_predict(_trim_all(inter, L, int(inter["item_length"].max())))
        ok = ok and _same(s_full, s_trim)
    except Exception:  # noqa: BLE001 - a model that cannot run trimmed is not exact
        ok = False
    assert ok == (model in EXACT_UNDER_TRIMMING), (
        f"{model}: trimmed batches {'match' if ok else 'differ'}; update EXACT_UNDER_TRIMMING"
    )
    if not ok:
        assert model in NOT_EXACT_REASON


# -- fused losses equal the models' own --------------------------------------------------
@pytest.mark.parametrize("model", sorted(FUSED_CE_MODELS) + ["BERT4Rec", "BERT4Rec-BPR"])
def test_fused_losses_equal_calculate_loss(model_env, model):
    tmp, data = model_env
    name = model.split("-")[0]
    kw = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}} if model.endswith("BPR") else {}
    config, ds, train, valid, net = _build(name, tmp, data, **kw)
    net.eval()
    _seed(3)
    batch = train.collate_fn(np.arange(48))
    fn = bert4rec_loss if name == "BERT4Rec" else fused_prefix_loss
    ref = net.calculate_loss(batch)
    gref = torch.autograd.grad(ref, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
    out = fn(net, batch)
    g = torch.autograd.grad(out, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out.item(), ref.item())
    nonzero = 0
    for a, r in zip(g, gref):
        if r is None:
            assert a is None or a.abs().sum() == 0
            continue
        nonzero += int(r.abs().sum() > 0)
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-6)
    assert nonzero >= 2


def test_fast_caser_equals_recboles_caser(model_env):
    """fast_layers gives Caser a forward with 1-d convolutions: on real rows, the training
    loss (dropout on, same seed), every parameter's gradient and the full-sort scores equal
    RecBole's own forward; the parameters and state dict stay RecBole's."""
    import copy

    from recbole_cdsr.model.layers import _caser_conv_forward, fast_caser

    tmp, data = model_env
    config, ds, train, valid, net = _build("Caser", tmp, data)
    fast = fast_caser(copy.deepcopy(net))
    assert fast.forward.__func__ is _caser_conv_forward and net.forward.__func__ is not _caser_conv_forward
    assert list(fast.state_dict()) == list(net.state_dict())
    lengths = train._dataset.inter_feat["item_length"].numpy()
    idx = np.concatenate([np.nonzero(lengths <= 3)[0][:16], np.nonzero(lengths >= 20)[0][:16]])
    assert len(idx) == 32
    batch = train.collate_fn(idx)
    losses, grads = [], []
    for m in (net, fast):
        m.train()
        _seed(7)
        loss = m.calculate_loss(batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), (losses[0].item(), losses[1].item())
    nonzero = 0
    for (name, _), a, r in zip(net.named_parameters(), grads[1], grads[0]):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-6), name
        nonzero += int(r.abs().sum() > 0)
    assert nonzero >= len(grads[0]) - 1  # every conv_h height, conv_v, fc1, fc2 and the embeddings
    vi = valid._dataset.inter_feat
    inter = vi[torch.arange(40)]
    net.eval(), fast.eval()
    with torch.no_grad():
        ref, got = net.full_sort_predict(inter), fast.full_sort_predict(inter)
    assert ref.shape == got.shape and torch.allclose(ref, got, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ref[0], ref[1])


# -- whole-sequence training equals the prefix rows --------------------------------------
@pytest.mark.parametrize("model", sorted(SEQUENCE_MODELS))
@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_sequence_loss_equals_mean_of_prefix_rows(model_env, model, loss_type):
    tmp, data = model_env
    kw = {"loss_type": loss_type}
    if loss_type == "BPR":
        kw["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
    cs, dss, trs, _, net = _build(model, tmp, data, train_view="sequence", **kw)
    cp, dsp, trp, _, _ = _build(model, tmp, data, train_view="prefix", **kw)
    assert dss.train_view == "sequence" and dss.windows and dsp.train_view == "prefix"
    net.eval()
    seq_feat = trs._dataset.inter_feat
    users = seq_feat["user_id"][:40]
    # the sequence batch: these users' window rows, trimmed, with per-target negatives
    rows = np.nonzero(np.isin(seq_feat["user_id"].numpy(), users.numpy()))[0]
    loader = type(trs)(cs, trs._dataset, trs._sampler, shuffle=False, trim=True, target_budget=True)
    _seed(4)
    sb = loader.collate_fn(rows)
    assert sb[TARGET_LIST_FIELD].size(1) == int(sb["item_length"].max()) < 50
    # the prefix rows of the same users, with the same negatives
    pfeat = trp._dataset.inter_feat
    prow = np.nonzero(np.isin(pfeat["user_id"].numpy(), users.numpy()))[0]
    pb = pfeat[torch.from_numpy(prow)]
    assert len(prow) == int((sb[TARGET_LIST_FIELD] > 0).sum())
    if loss_type == "BPR":
        neg_of = {}
        for u, n, tg, ng in zip(sb["user_id"].tolist(), sb["item_length"].tolist(),
                                sb[TARGET_LIST_FIELD].tolist(), sb[NEG_TARGET_LIST_FIELD].tolist()):
            for p in range(n):
                if tg[p]:
                    neg_of[(u, p + 1)] = ng[p]
        from recbole.data.interaction import Interaction

        negs = torch.tensor([neg_of[(u, n)] for u, n in zip(pb["user_id"].tolist(), pb["item_length"].tolist())])
        pb.update(Interaction({"neg_item_id": negs}))
    params = [p for p in net.parameters() if p.requires_grad]
    ref = net.calculate_loss(pb)  # RecBole's own loss: mean over the prefix rows
    gref = torch.autograd.grad(ref, params, allow_unused=True)
    for fused in (True, False):
        out = sequence_loss(net, sb, fused=fused)
        g = torch.autograd.grad(out, params, allow_unused=True)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (fused, out.item(), ref.item())
        for a, r in zip(g, gref):
            if r is not None:
                assert torch.allclose(a, r, rtol=1e-4, atol=1e-6)
    assert sum(int(r is not None and r.abs().sum() > 0) for r in gref) >= 3


@pytest.mark.parametrize("model", sorted(SEQUENCE_MODELS))
def test_sequence_states_never_see_later_items(model_env, model):
    from recbole_cdsr.trainer.whole_sequence import SEQUENCE_MODELS as S

    tmp, data = model_env
    _, _, _, _, net = _build(model, tmp, data, train_view="sequence")
    net.eval()
    seq = torch.tensor([[5, 9, 3, 7, 2, 8]])
    later = seq.clone()
    later[0, 3:] = torch.tensor([11, 12, 13])
    with torch.no_grad():
        a, b = S[model](net, seq), S[model](net, later)
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6)
    assert not torch.allclose(a[0, 3:], b[0, 3:], atol=1e-3)


def test_sequence_view_refuses_models_without_a_path(model_env):
    tmp, data = model_env
    cfg = base_config(tmp, data_path=data, train_view="sequence")
    config = CDSRConfig("NARM", "fk-slice", config_dict=cfg)
    with pytest.raises(ValueError, match="train_view: sequence is not available for NARM"):
        create_cdsr_dataset(config, config.model_class)


# -- runs ----------------------------------------------------------------------------------
def test_fast_run_is_seeded_and_recorded(model_env):
    from recbole_cdsr.quick_start import run_recbole_cdsr

    tmp, data = model_env
    outs = []
    for _ in range(2):
        cfg = base_config(tmp, data_path=data, epochs=1, steps_per_epoch=3, train_batch_size=32,
                          eval_batch_size=32, eval_neg_num=50)
        outs.append(run_recbole_cdsr("SASRec", "fk-slice", config_dict=cfg, saved=False, verbose=False))
    speed = outs[0]["results"]["speed"]
    assert speed == {"fast_layers": True, "dynamic_padding": True, "dynamic_padding_setting": "auto",
                     "train_view": "sequence", "loss_path": "sequence_fused_ce", "length_group_batches": 50}
    assert outs[0]["test_result"] == outs[1]["test_result"]
    assert outs[0]["results"]["test_instances"] == outs[1]["results"]["test_instances"]


def test_trimmed_evaluation_gives_the_same_ranks(model_env):
    """The protocol's ranks of a model, with and without dynamic padding in evaluation."""
    from recbole_cdsr.evaluation.protocol import ProtocolEvaluator
    from recbole_cdsr.data.utils import CDSREvalDataLoader

    tmp, data = model_env
    config, ds, train, valid, net = _build("SASRec", tmp, data)
    ev = ProtocolEvaluator(config, ds.domain_mask())
    full = ev.rank(net, valid)
    trimmed_loader = CDSREvalDataLoader(config, valid._dataset, valid.split, valid.candidates, 7, trim=True)
    seen = []
    for inter, rows in trimmed_loader:
        assert inter["item_id_list"].size(1) == int(inter["item_length"].max())
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(valid.n))
    trimmed = ev.rank(net, trimmed_loader)
    for p in full:
        assert torch.equal(full[p], trimmed[p])


@pytest.mark.parametrize("view", ["prefix", "sequence"])
def test_length_grouped_loader_epochs(model_env, view):
    """Every training row once per epoch, each batch cut to its longest history (and, on the
    whole-sequence view, at most train_batch_size targets); epochs differ; the same seed
    gives the same batches."""
    from recbole_cdsr.data.length_groups import LengthGroupedTrainDataLoader

    tmp, data = model_env
    epochs = []
    for _ in range(2):
        config, ds, train, _, _ = _build("SASRec", tmp, data, train_view=view, dynamic_padding="auto",
                                         length_group_batches=4)
        assert isinstance(train, LengthGroupedTrainDataLoader) and train.dynamic_padding
        n_rows = len(train._dataset)
        runs = []
        for _ in range(2):
            n = len(train)
            batches = list(train)
            assert len(batches) == n
            users, count = [], 0
            for b in batches:
                assert b["item_id_list"].size(1) == int(b["item_length"].max())
                if view == "sequence":
                    assert b[TARGET_LIST_FIELD].shape == b["item_id_list"].shape
                    t = int((b[TARGET_LIST_FIELD] > 0).sum())
                    assert t <= 24 or len(b) == 1
                    count += t
                users.extend(b["user_id"].tolist())
            assert len(users) == n_rows
            runs.append(users)
        assert runs[0] != runs[1] and sorted(runs[0]) == sorted(runs[1])
        epochs.append(runs)
        if view == "sequence":
            assert count == int((train._dataset.inter_feat[TARGET_LIST_FIELD] > 0).sum())
    assert epochs[0] == epochs[1]


def test_dynamic_padding_settings(model_env, caplog):
    from recbole_cdsr.data.length_groups import resolve_dynamic_padding

    tmp, data = model_env
    for value, model, expected in (("auto", "SASRec", True), ("auto", "Caser", False), ("off", "SASRec", False),
                                   (False, "SASRec", False), ("on", "SASRec", True)):
        cfg = CDSRConfig(model, "fk-slice", config_dict=base_config(tmp, data_path=data, dynamic_padding=value))
        assert resolve_dynamic_padding(cfg, model) is expected
    with caplog.at_level("WARNING"):
        cfg = CDSRConfig("Caser", "fk-slice", config_dict=base_config(tmp, data_path=data, dynamic_padding="on"))
        assert resolve_dynamic_padding(cfg, "Caser") is True
    assert "as tall as the padded length" in caplog.text
    from recbole_cdsr.config import ConfigError

    with pytest.raises(ConfigError, match="dynamic_padding"):
        CDSRConfig("SASRec", "fk-slice", config_dict=base_config(tmp, data_path=data, dynamic_padding="sometimes"))
    with pytest.raises(ConfigError, match="length_group_batches"):
        CDSRConfig("SASRec", "fk-slice", config_dict=base_config(tmp, data_path=data, length_group_batches=0))


@pytest.mark.slow
def test_train_speed_script_prints_its_ratios(model_env, capsys):
    """benchmarks/train_speed.py runs end to end (timings are its output, not asserted)."""
    import importlib.util
    import os
    import re
    import sys

    tmp, data = model_env
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "train_speed.py")
    spec = importlib.util.spec_from_file_location("train_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = sys.argv
    sys.argv = [path, "--data_path", data, "--dataset", "fk-slice", "--models", "SASRec,Caser,C2DSR",
                "--steps", "1", "--warmup", "1", "--batch_size", "256", "--threads", "1", "--config", "eval_neg_num=20"]
    try:
        assert mod.main() == 0
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    for line in ("ratio SASRec prefix", "ratio SASRec sequence", "ratio SASRec eval", "ratio Caser prefix",
                 "ratio C2DSR fast"):
        m = re.search(rf"^{line} (\d+\.\d\d)$", out, re.M)
        assert m and float(m.group(1)) > 0, line
    assert "ratio Caser sequence" not in out  # no whole-sequence path
    assert re.search(r"^memory SASRec loss head peak RSS \d+ MB, fused \d+ MB", out, re.M)
    assert re.search(r"^SASRec\s+sequence .*sequence_fused_ce, trimmed$", out, re.M)
    assert re.search(r"^Caser\s+prefix .*fused_ce, padded$", out, re.M)
    assert re.search(r"^C2DSR\s+old .*calculate_loss$", out, re.M)  # the path before its cheaper steps
    assert re.search(r"^C2DSR\s+head .*fused heads alone: \d+% of a fast step$", out, re.M)


def test_linear_cross_entropy_with_an_extra_logit_equals_full_logits():
    """``extra``: one more class per row (C2DSR's lin_pad logit), as F.cross_entropy over the
    logits with that column appended; targets of both kinds, chunks of 5."""
    _seed(2)
    h = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    e0 = torch.randn(23, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 41, (23,))
    t[:4] = 40  # the extra class
    ref = F.cross_entropy(torch.cat([h @ w.t() + b, (3 * e0).unsqueeze(1)], 1), t)
    gref = torch.autograd.grad(ref * 2.0, [h, w, b, e0])
    out = linear_cross_entropy(h, w, t, bias=b, chunk=5, extra=3 * e0)
    g = torch.autograd.grad(out * 2.0, [h, w, b, e0])
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(g, gref):
        assert r.abs().sum() > 0 and torch.allclose(a, r, rtol=1e-10, atol=1e-12)
    # by hand: logits [0, 2] and extra 1, target the extra class: log(1 + e^2 + e) - 1
    one = linear_cross_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]]),
                               torch.tensor([2]), extra=torch.tensor([1.0]))
    assert abs(one.item() - (np.log(1 + np.exp(2.0) + np.e) - 1.0)) < 1e-6
    with pytest.raises(ValueError, match="extra must be"):
        linear_cross_entropy(h, w, t, extra=e0[:3])


def test_fast_layers_train_with_torchs_fused_adam(model_env):
    """Adam and AdamW run torch's fused kernel when fast_layers is on (the same update as
    the loop, to rounding); off, RecBole's own optimiser."""
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    tmp, data = model_env
    steps = []
    for fast in (True, False):
        config, _, _, _, net = _build("SASRec", tmp, data, fast_layers=fast)
        opt = CDSRTrainer(config, net).optimizer
        assert type(opt) is torch.optim.Adam and bool(opt.defaults["fused"]) == fast
        assert opt.defaults["betas"] == (0.9, 0.999)
        w = net.item_embedding.weight
        w.grad = torch.ones_like(w)
        before = w.detach().clone()
        opt.step()
        steps.append(w.detach() - before)
    assert steps[0].abs().sum() > 0 and torch.allclose(steps[0], steps[1], atol=1e-7)
