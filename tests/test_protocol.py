import hashlib
import math
import os

import numpy as np
import pytest
import torch

from recbole.model.abstract_recommender import SequentialRecommender

from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.candidates import CandidateStore, draw_candidates
from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
from recbole_cdsr.evaluation.protocol import domain_results, full_ranks, sampled_ranks
from recbole_cdsr.quick_start import run_recbole_cdsr
from recbole_cdsr.trainer.trainer import CDSRTrainer

from conftest import base_config


def test_ranks_by_hand():
    # items 0 (padding), A = {1, 2, 3}, B = {4, 5}
    scores = torch.tensor(
        [
            [9.0, 5.0, 3.0, 3.0, 1.0, 8.0],  # target 2 (A): 5 beats it, 3 ties, 8 is the other domain
            [9.0, 1.0, 1.0, 1.0, 2.0, 0.5],  # target 5 (B): 4 beats it
            [0.0, 7.0, 1.0, 2.0, 0.0, 0.0],  # target 1 (A): best of its domain
        ]
    )
    targets = torch.tensor([2, 5, 1])
    negatives = torch.tensor([[1, 3], [4, 4], [2, 3]])
    assert sampled_ranks(scores, targets, negatives).tolist() == [3, 3, 1]
    in_dom = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert full_ranks(scores, targets, in_dom).tolist() == [3, 2, 1]
    # history exclusion removes item 3 from the first ranking
    hist = torch.tensor([[3, 0], [0, 0], [0, 0]])
    assert full_ranks(scores, targets, in_dom, hist).tolist() == [2, 2, 1]


def test_metrics_by_hand():
    ranks = torch.tensor([1, 2, 4, 11])
    dom = torch.tensor([0, 0, 1, 1])
    r = domain_results(ranks, dom, ["A", "B"], ["Hit", "NDCG", "MRR"], [1, 3, 5, 10])
    assert r["A/hit@1"] == 0.5 and r["A/hit@3"] == 1.0
    assert r["A/ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert r["A/mrr@3"] == pytest.approx(0.75)
    assert r["B/hit@3"] == 0.0 and r["B/hit@5"] == 0.5 and r["B/hit@10"] == 0.5
    assert r["B/ndcg@5"] == pytest.approx(1 / math.log2(5) / 2)
    assert r["B/mrr@10"] == pytest.approx(0.125)
    assert r["overall/hit@10"] == 0.75
    assert r["overall/mrr@10"] == pytest.approx((1 + 0.5 + 0.25) / 4)
    assert r["overall/ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)


def test_constant_scores_get_the_worst_rank():
    scores = torch.zeros(2, 6)
    targets = torch.tensor([2, 5])
    neg = torch.tensor([[1, 3], [4, 4]])
    assert sampled_ranks(scores, targets, neg).tolist() == [3, 3]
    in_dom = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert full_ranks(scores, targets, in_dom).tolist() == [3, 2]
    nan = torch.full((2, 6), float("nan"))
    assert sampled_ranks(nan, targets, neg).tolist() == [3, 3]


class ConstantModel(SequentialRecommender):
    """Scores every item the same; counts how it is called."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.full_calls = 0
        self.predict_calls = 0

    def calculate_loss(self, interaction):
        return (self.w ** 2).sum()

    def predict(self, interaction):
        self.predict_calls += 1
        raise AssertionError("the protocol must not call predict")

    def full_sort_predict(self, interaction):
        self.full_calls += 1
        return torch.zeros(len(interaction), self.n_items) + self.w


def _prepared(tmp, data_path, dataset, model="SASRec", **kw):
    cfg = CDSRConfig(model, dataset, config_dict=base_config(tmp, data_path=data_path, **kw))
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    return cfg, ds, cdsr_data_preparation(cfg, ds)


def test_constant_model_scores_zero_and_predict_is_never_called(tmp_path, slice_data):
    cfg, ds, (train, valid, test) = _prepared(
        str(tmp_path), slice_data, "fk-slice", eval_neg_num=50, eval_batch_size=16
    )
    model = ConstantModel(cfg, train.dataset)
    trainer = CDSRTrainer(cfg, model)
    res = trainer.evaluate(test, load_best_model=False)
    assert model.predict_calls == 0
    assert model.full_calls == math.ceil(len(test.dataset) / 16)  # each sequence scored once
    for k, v in res.items():
        if "@" in k:
            assert v == 0.0, k
    ranks = trainer.last_ranks
    assert (ranks["sampled"] == 51).all()
    # full: rank = size of the target's domain
    sizes = torch.tensor([len(x) for x in ds.domain_items])
    assert torch.equal(ranks["full"], sizes[test.target_domain])


@pytest.mark.slow
def test_real_candidates_in_domain_never_target_and_reproducible(tmp_path, fk_data):
    cfg, ds, (train, valid, test) = _prepared(str(tmp_path), fk_data, "food-kitchen")
    cand = test.candidates
    assert cand.shape == (937, 999)
    targets = test.dataset.inter_feat["item_id"]
    dom = torch.as_tensor(ds.item_domain)
    assert (dom[cand] == dom[targets].unsqueeze(1)).all()
    assert not (cand == targets.unsqueeze(1)).any()
    assert all(len(set(row.tolist())) == 999 for row in cand[:50])
    assert valid.candidates.shape == (960, 999)
    # the per-domain target counts of the release
    assert [(test.target_domain == d).sum().item() for d in (0, 1)] == [300, 637]
    assert [(valid.target_domain == d).sum().item() for d in (0, 1)] == [363, 597]
    # drawn once: loading again reuses the file; rebuilding from scratch gives the same bytes
    store = CandidateStore(cfg, ds)
    npz, man = store.paths("test")
    digest = hashlib.sha256(open(npz, "rb").read()).hexdigest()
    os.remove(npz)
    os.remove(man)
    again = store.load("test", test.dataset)
    assert hashlib.sha256(open(npz, "rb").read()).hexdigest() == digest
    assert torch.equal(again, cand)


def test_candidates_exclude_history_option():
    tokens = np.array([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    doms = np.array(["A"] * 10 + ["B"] * 10)
    hists = [["a1", "a2", "b3"], ["b0"]]
    toks, neg, tgt = draw_candidates(tokens, doms, ["a0", "b9"], hists, 7, 5, exclude_history=True)
    got0 = set(toks[neg[0]])
    assert got0 <= {f"a{i}" for i in range(3, 10)} and len(got0) == 7
    assert "b0" not in set(toks[neg[1]]) and "b9" not in set(toks[neg[1]])
    with pytest.raises(ValueError, match="eval_neg_num=8 is too large"):
        draw_candidates(tokens, doms, ["a0"], [hists[0]], 8, 5, exclude_history=True)


@pytest.mark.slow
def test_candidate_files_identical_across_runs_and_models(tmp_path, slice_data):
    digests = []
    for model in ("GRU4Rec", "SASRec", "GRU4Rec"):
        out = run_recbole_cdsr(
            model,
            "fk-slice",
            config_dict=base_config(
                str(tmp_path), data_path=slice_data, epochs=1, steps_per_epoch=1,
                train_batch_size=32, eval_neg_num=50,
            ),
            saved=False,
            verbose=False,
        )
        d = os.path.join(slice_data, "fk-slice")
        files = sorted(f for f in os.listdir(d) if ".cand-n50-" in f)
        assert len(files) == 4  # valid + test, npz + manifest
        digests.append({f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in files})
        assert 0.0 <= out["test_result"]["A/hit@10"] <= 1.0
    assert digests[0] == digests[1] == digests[2]


@pytest.mark.slow
def test_views_of_real_food_kitchen(tmp_path, fk_data):
    cfg = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), data_path=fk_data, train_view="prefix"))
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    train, valid, test = ds.build()
    # RecBole-style augmentation: one row per prefix, sum(len - 1) over 51,164 sequences
    assert len(train) == 402268 - 51164
    assert (len(valid), len(test)) == (960, 937)
    lengths = train.inter_feat["item_length"]
    assert lengths.min() == 1 and lengths.max() == 50
    # the first user of train_A.txt has 13 items: 12 prefix rows, the k-th predicting item k
    uid = train.inter_feat["user_id"]
    first = uid == uid[0]
    assert first.sum() == 12
    seq = train.inter_feat["item_id_list"][first][-1][:12].tolist() + [train.inter_feat["item_id"][first][-1].item()]
    for j, row in enumerate(torch.nonzero(first).view(-1).tolist()):
        assert train.inter_feat["item_length"][row] == j + 1
        assert train.inter_feat["item_id_list"][row][: j + 1].tolist() == seq[: j + 1]
        assert train.inter_feat["item_id"][row] == seq[j + 1]
        assert (train.inter_feat["item_id_list"][row][j + 1 :] == 0).all()

    cfg_auto = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), data_path=fk_data))
    seq_ds = create_cdsr_dataset(cfg_auto, type("M", (), {"TRAIN_VIEW": "sequence"}))
    tr2, va2, te2 = seq_ds.build()
    assert len(tr2) == 51164
    assert torch.equal(va2.inter_feat["item_id_list"], valid.inter_feat["item_id_list"])

    # RecBole's SASRec on the whole-sequence view: the same 351,104 targets in 51,164 first
    # windows plus one row per target beyond the 51st item of the 84 longer sequences
    cfg3 = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), data_path=fk_data, train_view="sequence"))
    win = create_cdsr_dataset(cfg3, cfg3.model_class)
    tr3, va3, _ = win.build()
    assert win.windows and int((tr3.inter_feat["target_id_list"] > 0).sum()) == 402268 - 51164
    assert len(tr3) == 52503
    assert torch.equal(va3.inter_feat["item_id_list"], valid.inter_feat["item_id_list"])


def test_training_negatives_come_from_the_positive_domain(tmp_path, slice_data):
    cfg, ds, (train, valid, test) = _prepared(
        str(tmp_path), slice_data, "fk-slice", model="GRU4Rec", loss_type="BPR",
        train_neg_sample_args={"distribution": "uniform", "sample_num": 1},
    )
    batch = next(iter(train))
    assert "neg_item_id" in batch
    pos, neg = batch["item_id"], batch["neg_item_id"]
    dom = torch.as_tensor(ds.item_domain)
    assert (dom[pos] == dom[neg]).all() and not (pos == neg).any()
    pos_all = torch.as_tensor(np.repeat(np.concatenate(ds.domain_items), 20))
    negs = train._sampler.sample_by_user_ids(np.zeros(len(pos_all)), pos_all.numpy(), 1)
    assert (dom[negs] == dom[pos_all]).all() and not (negs == pos_all).any()


def test_count_true_equals_the_int64_sum_past_the_int16_range():
    from recbole_cdsr.evaluation.protocol import count_true

    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 70000, generator=g) < torch.tensor([[0.0], [1.0], [0.5]])
    c = count_true(m)
    assert c.dtype == torch.long and c.tolist() == m.sum(dim=1).tolist()
    assert c[0] == 0 and c[1] == 70000  # a whole row of True: beyond int16 in one block
    assert count_true(torch.tensor([[True, False, True]])).tolist() == [2]
