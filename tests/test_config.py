import os
import sys

import pytest
import torch

from recbole_cdsr.config import CDSRConfig, ConfigError
from recbole_cdsr.data.utils import ensure_atomic_files
from recbole_cdsr.registry import get_model, get_trainer, model_names
from recbole_cdsr.trainer.s3rec import S3RecCDSRTrainer
from recbole_cdsr.trainer.trainer import CDSRTrainer

from conftest import base_config


def test_plugin_properties_and_priorities(tmp_path):
    c = CDSRConfig("SASRecF", "food-kitchen", config_dict=base_config(str(tmp_path)))
    assert c["eval_neg_num"] == 999 and c["eval_protocol"] == ["sampled", "full"]
    assert c["selected_features"] == ["domain"]  # properties/model/SASRecF.yaml
    assert c["cdsr_release"] == "food-kitchen"  # properties/dataset/food-kitchen.yaml
    assert c["n_layers"] == 2  # RecBole's own model defaults still apply
    yaml = tmp_path / "my.yaml"
    yaml.write_text("epochs: 7\neval_neg_num: 99\n")
    c = CDSRConfig(
        "SASRec", "food-kitchen", config_file_list=[str(yaml)],
        config_dict=base_config(str(tmp_path), eval_neg_num=49), cmd_args=["--epochs=3"],
    )
    assert c["epochs"] == 3 and c["eval_neg_num"] == 49


def test_sys_argv_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--epochs=77", "-x"])
    c = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path)))
    assert c["epochs"] != 77


def test_ce_turns_off_negative_sampling(tmp_path):
    c = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path)))
    assert c["loss_type"] == "CE" and c["train_neg_sample_args"]["distribution"] == "none"
    with pytest.raises(ConfigError, match="train_neg_sample_args"):
        CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(
            str(tmp_path), train_neg_sample_args={"distribution": "uniform", "sample_num": 1}))


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("eval_neg_num", "many", "'eval_neg_num' must be int"),
        ("model_selection", "best", "'model_selection' must be one of per_domain, joint"),
        ("eval_protocol", ["sampled", "uni100"], "eval_protocol"),
        ("metrics", ["Hit", "AUC"], "AUC"),
        ("epochs", 2.5, "'epochs' must be int"),
        ("eval_exclude_history", "yes", "'eval_exclude_history' must be bool"),
    ],
)
def test_wrong_types_give_one_clear_error(tmp_path, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), **{key: value}))


def test_cmd_line_values_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="'eval_neg_num' must be int"):
        CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path)), cmd_args={"eval_neg_num": "abc"})
    c = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path)), cmd_args={"eval_neg_num": "99"})
    assert c["eval_neg_num"] == 99


def test_registry():
    assert get_model("SASRec").__name__ == "SASRec"
    assert not torch.is_anomaly_enabled()  # importing RecBole's models turned it on; we turn it off
    with pytest.raises(ValueError, match="Did you mean SASRec") as e:
        get_model("sasrec")
    assert "GRU4Rec" in str(e.value) and "SASRecCPR" not in str(e.value)
    with pytest.raises(ValueError, match="unknown model 'BPR'"):
        get_model("BPR")
    with pytest.raises(ValueError, match="SASRecCPR cannot be evaluated"):
        get_model("SASRecCPR")
    assert get_trainer("SASRec") is CDSRTrainer and get_trainer("S3Rec") is S3RecCDSRTrainer
    assert "NARM" in model_names()


def test_missing_dataset_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("RECBOLE_CDSR_RAW_PATH", raising=False)
    c = CDSRConfig("SASRec", "my-cdsr", config_dict=base_config(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="atomic files not found"):
        ensure_atomic_files(c)
    c = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), raw_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="does not exist"):
        ensure_atomic_files(c)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        CDSRConfig("SASRec", "food-kitchen", config_file_list=[str(tmp_path / "nope.yaml")])


def test_short_config_print_lists_only_what_differs_and_use_gpu_says_what_is_used(tmp_path):
    cfg = CDSRConfig("SASRec", "food-kitchen", config_dict=base_config(str(tmp_path), epochs=7, hidden_size=64),
                     cmd_args=["--learning_rate=0.01"])
    text = cfg.summary()
    lines = text.splitlines()
    assert lines[0].startswith("model SASRec, dataset food-kitchen, device cpu, seed ")
    changed = [ln.strip() for ln in lines if ln.startswith("  ")]
    # hidden_size 64 is SASRec's default: not a difference; show_progress/state/paths are
    assert "epochs = 7" in changed and "learning_rate = 0.01" in changed
    assert not any(ln.startswith("hidden_size") for ln in changed)
    assert len(lines) < 15 and "--show_config=True" in lines[-1]
    on_gpu = CDSRConfig("SASRec", "food-kitchen", config_dict=dict(base_config(str(tmp_path)), use_gpu=True))
    assert on_gpu["use_gpu"] is torch.cuda.is_available()  # what is used, not what was asked for
    assert str(on_gpu["device"]).startswith("cuda") is torch.cuda.is_available()
