"""Every RecBole 1.2.1 sequential model that can be scored runs under the protocol."""

import pytest

from recbole_cdsr.quick_start import run_recbole_cdsr
from recbole_cdsr.registry import UNSUPPORTED_RECBOLE_MODELS, recbole_sequential_models

from conftest import base_config

MODELS = [m for m in recbole_sequential_models() if m not in UNSUPPORTED_RECBOLE_MODELS]


def test_model_list_is_complete():
    assert len(MODELS) == len(recbole_sequential_models()) - len(UNSUPPORTED_RECBOLE_MODELS)
    assert {"SASRec", "GRU4Rec", "BERT4Rec", "NARM", "STAMP", "Caser", "SRGNN", "CORE",
            "LightSANs", "FEARec", "NextItNet", "FPMC", "S3Rec", "FDSA"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_model_runs_one_short_epoch(tmp_path, slice_data, model):
    cfg = base_config(
        str(tmp_path), data_path=slice_data, epochs=1, steps_per_epoch=2,
        train_batch_size=32, eval_batch_size=32, eval_neg_num=50, pretrain_epochs=1,
    )
    out = run_recbole_cdsr(model, "fk-slice", config_dict=cfg, saved=False, verbose=False)
    res = out["test_result"]
    for d in ("A", "B", "overall"):
        for k in ("hit@10", "ndcg@10", "mrr@10"):
            assert 0.0 <= res[f"{d}/{k}"] <= 1.0
            assert 0.0 <= res[f"full:{d}/{k}"] <= 1.0
    # the protocol saw every instance of the slice: 60 test rows
    n = out["results"]["instances"]["test"]
    assert n["A"] + n["B"] == 60
