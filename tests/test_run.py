import json
import os
import re

import pytest
import torch

import run_recbole_cdsr
from recbole_cdsr.quick_start import cpu_model, run_recbole_cdsr as run

from conftest import Killed, base_config, killer_after


@pytest.mark.slow
def test_cli_on_real_food_kitchen_converts_trains_and_prints_domains(tmp_path, fk_raw, capsys):
    data = tmp_path / "data"
    rc = run_recbole_cdsr.main(
        [
            "--model=SASRec",
            "--dataset=food-kitchen",
            f"--raw_path={fk_raw}",  # atomic files are missing: the run converts the release
            f"--data_path={data}",
            f"--checkpoint_dir={tmp_path / 'saved'}",
            f"--results_dir={tmp_path / 'results'}",
            "--epochs=2",
            "--steps_per_epoch=3",
            "--train_batch_size=256",
            "--show_progress=False",
            "--state=WARNING",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert os.path.isfile(data / "food-kitchen" / "food-kitchen.manifest.json")
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(sampled|full)\s+(A|B|overall)\s+([\d. ]+)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = [float(x) for x in m.group(3).split()]
    assert set(rows) == {(p, d) for p in ("sampled", "full") for d in ("A", "B", "overall")}
    for vals in rows.values():
        assert len(vals) == 12 and all(0.0 <= v <= 1.0 for v in vals)
    # sampled ranking against 999 negatives is never harder than ranking the whole domain
    assert rows[("sampled", "A")][3] >= rows[("full", "A")][3]

    files = os.listdir(tmp_path / "results")
    assert len(files) == 1
    res = json.loads((tmp_path / "results" / files[0]).read_text())
    assert res["model"] == "SASRec" and res["seed"] == 2020 and res["train_view"] == "sequence"
    # the main job's defaults: whole sequences, trimmed batches, the fused loss (recorded)
    assert res["speed"]["dynamic_padding"] is True and res["speed"]["loss_path"] == "sequence_fused_ce"
    # 351,104 targets in batches of up to 256 targets: at least 1,372 batches, a few more
    # where a whole sequence does not fit in a batch's remaining room
    assert 1372 <= res["timing"]["batches_per_epoch"] <= 1372 * 1.03
    assert res["config"]["eval_neg_num"] == 999 and res["config"]["steps_per_epoch"] == 3
    assert res["versions"]["recbole"] == "1.2.1" and res["versions"]["torch"] == torch.__version__
    assert res["device"]["device"] == "cpu" and res["device"]["cpu_threads"] == torch.get_num_threads()
    assert res["device"]["cpu_model"] == cpu_model()
    assert res["selection"]["model_selection"] == "per_domain"
    assert set(res["selection"]["best_epochs"]) == {"A", "B"}
    assert res["instances"]["test"] == {"A": 300, "B": 637}
    for split in ("valid", "test"):
        for p in ("sampled", "full"):
            for d in ("A", "B", "overall"):
                assert 0.0 <= res[split][p][f"{d}/ndcg@10"] <= 1.0
    assert len(res["timing"]["train_epoch_seconds"]) == 2
    assert res["timing"]["train_steps"] == 6
    # checkpoints load with weights_only=True (torch >= 2.6 default)
    ck = torch.load(res["selection"]["checkpoints"]["A"], weights_only=True)
    assert "state_dict" in ck and ck["selection_key"] == "A"


def test_cpu_model_is_the_first_model_name_of_cpuinfo(monkeypatch):
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_model(text) == "AMD EPYC 7B13 64-Core Processor"
    # no model name line (some ARM kernels): what the platform module says, or None
    monkeypatch.setattr("platform.processor", lambda: "aarch64")
    assert cpu_model("processor\t: 0\nBogoMIPS\t: 50.00\n") == "aarch64"
    monkeypatch.setattr("platform.processor", lambda: "")
    assert cpu_model("model name\t:   \n") is None


def _short(tmp, data, seed, **kw):
    opts = dict(epochs=2, steps_per_epoch=4, train_batch_size=32, eval_neg_num=50, seed=seed)
    opts.update(kw)
    cfg = base_config(tmp, data_path=data, **opts)
    return run("SASRec", "fk-slice", config_dict=cfg, saved=False, verbose=False)


def test_same_seed_same_metrics(tmp_path, slice_data):
    a = _short(str(tmp_path / "a"), slice_data, 7)
    b = _short(str(tmp_path / "b"), slice_data, 7)
    assert a["test_result"] == b["test_result"]
    assert a["best_valid_result"] == b["best_valid_result"]
    c = _short(str(tmp_path / "c"), slice_data, 8)
    assert c["test_result"] != a["test_result"]


def test_joint_selection_is_recorded(tmp_path, slice_data):
    out = _short(str(tmp_path), slice_data, 1, model_selection="joint", valid_metric="ndcg@10")
    sel = out["results"]["selection"]
    assert sel["model_selection"] == "joint" and sel["selection_keys"] == {"joint": "overall/ndcg@10"}
    assert list(sel["best_epochs"]) == ["joint"]


def test_per_domain_selection_takes_each_domain_from_its_best_epoch(tmp_path, slice_data):
    out = _short(str(tmp_path), slice_data, 3, epochs=4)
    hist = out["results"]["valid_history"]
    best = out["results"]["selection"]["best_epochs"]
    for d in ("A", "B"):
        scores = [h["result"][f"{d}/hit@10"] for h in hist]
        assert hist[scores.index(max(scores))]["epoch"] == best[d]
        assert out["best_valid_result"][f"{d}/hit@10"] == max(scores)


@pytest.mark.parametrize("freeze", [True, False])
def test_a_domain_that_has_stopped_keeps_its_best_epoch(tmp_path, slice_data, monkeypatch, freeze):
    """Per-domain early stopping as the public LLMCDSR code: once A has gone stopping_step
    evaluations without improving it is frozen, even if a later epoch (trained because B
    still improves) scores higher on A; with freeze_stopped_domains False it takes that epoch."""
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    script_a = [0.1, 0.2, 0.15, 0.15, 0.9, 0.3]  # best at epoch 1; stale 2 after epoch 3; 0.9 at epoch 4
    script_b = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # improves every epoch: training goes on
    real = CDSRTrainer.evaluate
    seen = []

    def scripted(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = real(self, eval_data, load_best_model, model_file, show_progress)
        if not load_best_model and model_file is None:  # a validation inside fit
            i = len(seen)
            seen.append(i)
            result = dict(result, **{"A/hit@10": script_a[i], "B/hit@10": script_b[i]})
        return result

    monkeypatch.setattr(CDSRTrainer, "evaluate", scripted)
    out = _short(str(tmp_path), slice_data, 3, epochs=6, stopping_step=2, freeze_stopped_domains=freeze)
    best = out["results"]["selection"]["best_epochs"]
    assert len(seen) == 6 and best["B"] == 5
    assert best["A"] == (1 if freeze else 4)
    assert out["best_valid_result"] is not None


def test_cli_with_config_files(tmp_path, slice_data, capsys):
    yaml = tmp_path / "my.yaml"
    yaml.write_text(
        "\n".join(
            [
                f"data_path: {slice_data}",
                f"checkpoint_dir: {tmp_path / 'saved'}",
                f"results_dir: {tmp_path / 'results'}",
                "epochs: 1",
                "steps_per_epoch: 2",
                "train_batch_size: 32",
                "eval_neg_num: 50",
                "eval_protocol: [full]",
                "model_selection: joint",
                "show_progress: False",
                "state: WARNING",
            ]
        )
    )
    rc = run_recbole_cdsr.main(["--model=NARM", "--dataset=fk-slice", f"--config_files={yaml}", "--seed=11"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "selection: joint" in out and re.search(r"^full\s+A\s", out, re.M) and "sampled" not in out
    res = json.loads(open(os.path.join(tmp_path / "results", os.listdir(tmp_path / "results")[0])).read())
    assert res["seed"] == 11 and res["protocols"] == ["full"] and res["model"] == "NARM"


def test_cli_unknown_model_is_one_clear_error(tmp_path, capsys):
    rc = run_recbole_cdsr.main(["--model=SASRecc", "--dataset=food-kitchen"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown model 'SASRecc'" in err and "GRU4Rec" in err


def test_load_data_and_model_from_checkpoint(tmp_path, slice_data):
    from recbole_cdsr.quick_start import load_data_and_model
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    cfg = base_config(str(tmp_path), data_path=slice_data, epochs=1, steps_per_epoch=2, train_batch_size=32,
                      eval_neg_num=50, model_selection="joint")
    out = run("GRU4Rec", "fk-slice", config_dict=cfg, verbose=False)
    ckpt = out["results"]["selection"]["checkpoints"]["joint"]
    config, model, ds, train, valid, test = load_data_and_model(ckpt)
    res = CDSRTrainer(config, model).evaluate(test, load_best_model=False)
    assert res == out["test_result"]


def test_results_say_why_training_stopped(tmp_path, slice_data, monkeypatch):
    """epoch cap, early stopping, and an interruption (Ctrl-C during the second epoch's
    validation report): the interrupted run still ranks the test split with its best epoch
    and writes a results file that says so."""
    capped = _short(str(tmp_path / "cap"), slice_data, 1, epochs=2)["results"]["timing"]
    assert (capped["stop_reason"], capped["epochs_trained"]) == ("epoch_cap", 2)

    from recbole_cdsr.trainer.trainer import CDSRTrainer

    real = CDSRTrainer.evaluate

    def flat(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = real(self, eval_data, load_best_model, model_file, show_progress)
        if not load_best_model and model_file is None:  # validation never improves after epoch 1
            result = dict(result, **{"A/hit@10": 0.5, "B/hit@10": 0.5})
        return result

    monkeypatch.setattr(CDSRTrainer, "evaluate", flat)
    early = _short(str(tmp_path / "early"), slice_data, 1, epochs=20, stopping_step=2)["results"]["timing"]
    assert (early["stop_reason"], early["epochs_trained"]) == ("early_stopping", 3)
    monkeypatch.setattr(CDSRTrainer, "evaluate", real)

    said = []

    def interrupt(line):
        said.append(line)
        if len(said) == 2:
            raise KeyboardInterrupt

    cfg = base_config(str(tmp_path / "int"), data_path=slice_data, epochs=5, steps_per_epoch=4,
                      train_batch_size=32, eval_neg_num=50, seed=1)
    out = run("SASRec", "fk-slice", config_dict=cfg, saved=True, verbose=False, report=interrupt)
    res = json.loads(open(out["results_file"]).read())
    assert (res["timing"]["stop_reason"], res["timing"]["epochs_trained"]) == ("interrupted", 2)
    assert len(res["valid_history"]) == 2 and res["test"]["full"]["A/hit@10"] == out["test_result"]["full:A/hit@10"]
    assert set(res["selection"]["best_epochs"]) == {"A", "B"}


@pytest.mark.slow
@pytest.mark.parametrize("model,opts", [
    ("SASRec", {}),  # whole-sequence view, dropout (torch stream), length-grouped loader (its generator)
    ("GRU4Rec", {"loss_type": "BPR", "train_view": "prefix",  # negatives from numpy's stream
                 "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}),
])
def test_an_interrupted_run_continues_after_its_last_finished_epoch(tmp_path, slice_data, model, opts):
    """resumable: a run killed during its third epoch's validation, started again with the
    same config, continues after epoch 2 and ends exactly as the uninterrupted run: the same
    validation history, best epochs and test figures; the state file is gone at the end. A
    run with another config does not take the state; a damaged state is one clear error."""
    cfg = dict(epochs=5, steps_per_epoch=4, train_batch_size=32, eval_neg_num=50, seed=3, **opts)

    def go(tmp, report=None, **kw):
        c = base_config(tmp, data_path=slice_data, resumable=True, **dict(cfg, **kw))
        return run(model, "fk-slice", config_dict=c, saved=False, verbose=False, report=report)

    whole = go(str(tmp_path / "whole"))
    assert whole["results"]["timing"]["resumed_at"] == []

    tmp = str(tmp_path / "cut")
    with pytest.raises(Killed):
        go(tmp, report=killer_after(3))
    states = [f for f in os.listdir(os.path.join(tmp, "saved")) if f.endswith(".resume.pth")]
    assert len(states) == 1 and states[0].startswith(f"{model}-fk-slice-seed3-")
    assert not [f for f in os.listdir(os.path.join(tmp, "saved")) if f.endswith(".tmp")]
    said = []
    again = go(tmp, report=said.append)
    assert said[0].startswith("continuing after epoch 2 of an interrupted run")
    assert len(said) == 1 + 3  # the line above, then the validations of epochs 3-5
    r, w = again["results"], whole["results"]
    assert [h["epoch"] for h in r["valid_history"]] == [0, 1, 2, 3, 4]
    assert r["valid_history"] == w["valid_history"]
    assert r["selection"]["best_epochs"] == w["selection"]["best_epochs"]
    assert again["test_result"] == whole["test_result"]
    assert r["test_instances"] == w["test_instances"]
    assert [x["epoch"] for x in r["timing"]["resumed_at"]] == [2]
    assert (r["timing"]["epochs_trained"], r["timing"]["stop_reason"]) == (5, "epoch_cap")
    assert len(r["timing"]["train_epoch_seconds"]) == 5 and r["timing"]["train_steps"] == 20
    assert not [f for f in os.listdir(os.path.join(tmp, "saved")) if f.endswith(".resume.pth")]

    with pytest.raises(Killed):
        go(tmp, report=killer_after(3))
    other = go(tmp, learning_rate=0.002)  # another config: its own run from the first epoch
    assert other["results"]["timing"]["resumed_at"] == []
    path = os.path.join(tmp, "saved", states[0])
    assert os.path.exists(path)
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(RuntimeError, match="cannot be read.*delete it"):
        go(tmp)
