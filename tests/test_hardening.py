"""Doors closed against bad input: no configuration string runs as code, values out of
range and unknown keys, data fingerprints, one writer per benchmark folder, run processes
that end with their benchmark, truncated releases and odd output folders, and candidate
files whose contents do not match their manifest."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml

import run_recbole_cdsr
from dataset_converters import ConversionError, convert_llmcdsr_release, write_synthetic_cdsr
from dataset_converters.llmcdsr_release import main as convert_main
from recbole_cdsr.benchmark.hyper import read_space_file
from recbole_cdsr.benchmark.plan import dataset_fingerprint, plan_runs, prepare_datasets
from recbole_cdsr.benchmark.runner import run_benchmark
from recbole_cdsr.benchmark.spec import BenchmarkError, load_benchmark
from recbole_cdsr.benchmark.store import OutputLock
from recbole_cdsr.config import CDSRConfig, ConfigError, literal_value
from recbole_cdsr.data.candidates import CandidateStore, arrays_sha256, draw_candidates
from recbole_cdsr.data.utils import create_cdsr_dataset
from recbole_cdsr.quick_start import load_data_and_model, run_recbole_cdsr as run_one

from conftest import REPO, base_config

TINY = {"eval_neg_num": 20, "train_batch_size": 256, "MAX_ITEM_LIST_LENGTH": 12, "hidden_size": 16,
        "inner_size": 32, "stopping_step": 2, "state": "WARNING", "use_gpu": False}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn-hard"))
    write_synthetic_cdsr(d, "tiny-cdsr", seed=0)
    return d


def payload(marker):
    """Python that, if ever evaluated, creates ``marker``."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def write_spec(tmp_path, data_path, name="hard", **kw):
    raw = {"name": name, "datasets": ["tiny-cdsr"], "models": ["GRU4Rec"], "seeds": [1],
           "budget": {"epochs": 1}, "threads": 1, "config": dict(TINY, data_path=data_path),
           "output_dir": str(tmp_path / "out"), "save_checkpoints": False}
    raw.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# -- 1. no string is evaluated as Python ----------------------------------------------
def test_literal_values_without_eval():
    assert literal_value("5") == 5 and literal_value("1e-3") == 0.001
    assert literal_value("[0.9, 0.98]") == [0.9, 0.98] and literal_value("{'A': 'a.npz'}") == {"A": "a.npz"}
    assert literal_value("None") is None and literal_value("~") is None
    assert literal_value("True") is True and literal_value("false") is False
    assert literal_value("retrieval") == "retrieval" and literal_value("'2020'") == "2020"
    code = "__import__('os').getcwd()"
    assert literal_value(code) == code


def test_command_line_value_is_never_evaluated(tmp_path, syn):
    marker = tmp_path / "PWNED-cmd"
    c = CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(str(tmp_path), data_path=syn),
                   cmd_args=[f"--checkpoint_dir={payload(marker)}", "--epochs=3"])
    assert not marker.exists()
    assert c["checkpoint_dir"] == payload(marker) and c["epochs"] == 3


def test_config_dict_value_is_never_evaluated(tmp_path, syn):
    marker = tmp_path / "PWNED-dict"
    c = CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(str(tmp_path), data_path=syn,
                                                                   checkpoint_dir=payload(marker)))
    assert not marker.exists() and c["checkpoint_dir"] == payload(marker)


def test_benchmark_file_config_string_is_never_evaluated(tmp_path, syn):
    marker = tmp_path / "PWNED-bench"
    path = write_spec(tmp_path, syn, config=dict(TINY, data_path=syn, checkpoint_dir=payload(marker)))
    spec = load_benchmark(path)
    runs = plan_runs(spec, prepare_datasets(spec))  # builds a CDSRConfig from the file's config
    assert not marker.exists() and runs[0]["config"]["checkpoint_dir"] == payload(marker)


def test_checkpoint_config_is_data_never_code(tmp_path, syn):
    cfg = base_config(str(tmp_path), data_path=syn, epochs=1, steps_per_epoch=2, model_selection="joint", **TINY)
    out = run_one("GRU4Rec", "tiny-cdsr", config_dict=cfg, verbose=False)
    ckpt_path = out["results"]["selection"]["checkpoints"]["joint"]
    ckpt = torch.load(ckpt_path, weights_only=True)
    marker = tmp_path / "PWNED-ckpt"
    ckpt["config"]["checkpoint_dir"] = payload(marker)  # what a shared, doctored checkpoint may hold
    ckpt["config"]["results_dir"] = payload(marker)
    evil = str(tmp_path / "evil.pth")
    torch.save(ckpt, evil)
    config, model, *_ = load_data_and_model(evil)
    assert not marker.exists()
    assert config["checkpoint_dir"] == payload(marker)
    # and it is validated against the schema like any config
    ckpt["config"]["eval_neg_num"] = -5
    torch.save(ckpt, evil)
    with pytest.raises(ConfigError, match=r"'eval_neg_num' must be >= 1, got -5"):
        load_data_and_model(evil)


def test_config_file_with_python_tags_is_refused(tmp_path, syn):
    marker = tmp_path / "PWNED-yaml"
    f = tmp_path / "evil.yaml"
    f.write_text(f"epochs: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    with pytest.raises(ConfigError, match=r"evil.yaml: not valid YAML for a config file"):
        CDSRConfig("GRU4Rec", "tiny-cdsr", config_file_list=[str(f)], config_dict=base_config(str(tmp_path), data_path=syn))
    assert not marker.exists()
    f.write_text("learning_rate: 1e-3\nadam_betas: [0.9, 0.98]\n")  # RecBole's float reading is kept
    c = CDSRConfig("GRU4Rec", "tiny-cdsr", config_file_list=[str(f)], config_dict=base_config(str(tmp_path), data_path=syn))
    assert c["learning_rate"] == 0.001


def test_hyper_space_file_is_never_evaluated(tmp_path):
    marker = tmp_path / "PWNED-hyper"
    f = tmp_path / "evil.hyper"
    f.write_text(f"learning_rate choice {payload(marker)} or [0.1]\n")
    with pytest.raises(BenchmarkError, match=r"evil.hyper, line 1: choice values must be a non-empty list literal"):
        read_space_file(str(f))
    assert not marker.exists()
    f.write_text("learning_rate choice [0.001, 0.0005]\nhidden_dropout_prob uniform 0.1,0.5\n"
                 "# a comment\nrecall_k choice [5, 10]\n")
    assert read_space_file(str(f)) == {"choice": {"learning_rate": [0.001, 0.0005], "recall_k": [5, 10]},
                                       "uniform": {"hidden_dropout_prob": [0.1, 0.5]}}
    f.write_text("learning_rate uniform 0.5,0.1\n")
    with pytest.raises(BenchmarkError, match=r"line 1: uniform low 0.5 must be below high 0.1"):
        read_space_file(str(f))


def test_no_eval_left_in_the_plugin():
    # RecBole's eval() sites are all behind our overrides; the plugin calls none of its own
    import ast

    hits = []
    for root in ("recbole_cdsr", "dataset_converters"):
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call):
                        f = node.func
                        called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                        builtin = isinstance(f, ast.Name) and called in ("eval", "exec", "compile", "__import__")
                        if builtin or called in ("unsafe_load", "_build_space_from_file") or (
                                called == "load" and isinstance(f, ast.Attribute)
                                and getattr(f.value, "id", "") in ("pickle", "yaml")
                                and not any(getattr(k.value, "id", "") == "SafeYamlLoader" for k in node.keywords)
                                and not any(getattr(a, "id", "") == "SafeYamlLoader" for a in node.args[1:])):
                            hits.append((name, node.lineno, called))
    assert hits == []


# -- 2. ranges ------------------------------------------------------------------------
@pytest.mark.parametrize("arg, needle", [
    ("--epochs=-1", "'epochs' must be >= 1, got -1"),
    ("--epochs=0", "'epochs' must be >= 1, got 0"),
    ("--train_batch_size=0", "'train_batch_size' must be >= 1, got 0"),
    ("--eval_batch_size=-8", "'eval_batch_size' must be >= 1, got -8"),
    ("--steps_per_epoch=0", "'steps_per_epoch' must be >= 1, got 0"),
    ("--eval_neg_num=0", "'eval_neg_num' must be >= 1, got 0"),
    ("--learning_rate=0", "'learning_rate' must be > 0, got 0"),
    ("--hidden_dropout_prob=1.5", r"'hidden_dropout_prob' must be in \[0, 1\), got 1.5"),
    ("--stopping_step=0", "'stopping_step' must be >= 1, got 0"),
    ("--recall_k=0", "'recall_k' must be >= 1, got 0"),
    ("--learning_rate=fast", "'learning_rate' must be"),
])
def test_values_out_of_range_are_one_clear_error(tmp_path, syn, arg, needle):
    with pytest.raises(ConfigError, match=needle):
        CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(str(tmp_path), data_path=syn), cmd_args=[arg])


def test_cli_epochs_minus_one_writes_no_results(tmp_path, syn, capsys):
    rc = run_recbole_cdsr.main(["--model=GRU4Rec", "--dataset=tiny-cdsr", f"--data_path={syn}",
                                f"--results_dir={tmp_path / 'res'}", "--epochs=-1"])
    assert rc == 2
    assert "config key 'epochs' must be >= 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_benchmark_file_values_out_of_range(tmp_path, syn):
    path = write_spec(tmp_path, syn, config=dict(TINY, data_path=syn, eval_neg_num=0))
    with pytest.raises(BenchmarkError, match=r"key 'config.eval_neg_num' must be >= 1, got 0"):
        load_benchmark(path)
    path = write_spec(tmp_path, syn, overrides={"GRU4Rec": {"train_batch_size": -1}})
    with pytest.raises(BenchmarkError, match=r"overrides.GRU4Rec.train_batch_size"):
        load_benchmark(path)


# -- 3. unknown keys ------------------------------------------------------------------
def test_unknown_key_warns_with_the_nearest_known_key(tmp_path, syn, caplog):
    with caplog.at_level(logging.WARNING, logger="recbole_cdsr.config"):
        c = CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(str(tmp_path), data_path=syn),
                       cmd_args=["--learning_rte=0.01", "--learning_rate=0.002", "--recall_k=5", "--worker=0"])
    msgs = [r.getMessage() for r in caplog.records if r.name == "recbole_cdsr.config"]
    assert msgs == ["config key 'learning_rte' is read by no part of RecBole or recbole-cdsr, so it changes "
                    "nothing: did you mean 'learning_rate'?"]
    assert c.unknown_keys == msgs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_cdsr.config"):
        load_benchmark(write_spec(tmp_path, syn, config=dict(TINY, data_path=syn, stoping_step=3)))
    assert any("key 'stoping_step'" in r.getMessage() and "did you mean 'stopping_step'?" in r.getMessage()
               for r in caplog.records)


# -- 4. dataset fingerprint over the atomic files --------------------------------------
def test_fingerprint_follows_the_atomic_files_contents(tmp_path, capsys):
    d = str(tmp_path / "data")
    write_synthetic_cdsr(d, "tiny-cdsr", seed=0)
    fp = dataset_fingerprint(d, "tiny-cdsr")
    assert fp.startswith("manifest:")
    test_inter = os.path.join(d, "tiny-cdsr", "tiny-cdsr.test.inter")
    original = open(test_inter, encoding="utf-8").read()
    lines = original.splitlines()
    user, hist, target = lines[-1].split("\t")
    lines[-1] = "\t".join([user, hist, hist.split()[0]])  # another last target
    open(test_inter, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    edited = dataset_fingerprint(d, "tiny-cdsr")
    assert edited.startswith("files:") and edited != fp
    assert "atomic files differ from the converter's manifest (tiny-cdsr.test.inter)" in capsys.readouterr().err
    open(test_inter, "w", encoding="utf-8").write(original)
    assert dataset_fingerprint(d, "tiny-cdsr") == fp


@pytest.mark.slow
def test_editing_test_inter_reruns_the_runs_that_used_it(tmp_path):
    d = str(tmp_path / "data")
    write_synthetic_cdsr(d, "tiny-cdsr", seed=0)
    path = write_spec(tmp_path, d)
    assert run_benchmark(path, write_reports=False)["ran"] == 1
    assert run_benchmark(path, write_reports=False)["ran"] == 0
    with open(os.path.join(d, "tiny-cdsr", "tiny-cdsr.test.inter"), "a", encoding="utf-8") as f:
        f.write("T_extra\tA_1 A_2\tA_3\n")
    assert run_benchmark(path, write_reports=False)["ran"] == 1


# -- 5. one writer per output folder ---------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from recbole_cdsr.benchmark.store import OutputLock
    with OutputLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.mark.slow
def test_second_invocation_on_the_same_folder_stops_at_once(tmp_path, syn):
    path = write_spec(tmp_path, syn)
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(BenchmarkError, match=rf"output folder {out} is in use by another invocation "
                                                 rf"\(pid {holder.pid}, started "):
            run_benchmark(path)
        assert time.time() - t0 < 30  # stops at once: it did not run the matrix first
        assert not os.path.exists(os.path.join(out, "results.jsonl"))
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stuck lock
        holder.wait()
    with OutputLock(out):
        pass
    assert run_benchmark(path, write_reports=False)["ran"] == 1


# -- 6. a run's process ends with its benchmark ----------------------------------------
SLOW_RUN = textwrap.dedent("""
    import os, time

    def slow_run(run):
        open(run["pid_file"], "w").write(str(os.getpid()))
        time.sleep(60)
        open(run["done_file"], "w").write("finished")
        return {"status": "ok"}
""")

PARENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from slowrun import slow_run
    from recbole_cdsr.benchmark.runner import execute_isolated
    execute_isolated({"pid_file": sys.argv[2], "done_file": sys.argv[3]}, slow_run)
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_runs_process_dies_with_its_benchmark_parent(tmp_path):
    (tmp_path / "slowrun.py").write_text(SLOW_RUN)
    pid_file, done_file = tmp_path / "child.pid", tmp_path / "done"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(pid_file), str(done_file)],
                              cwd=REPO, env=env)
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 20
    while _alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(child)
    assert not done_file.exists()


@pytest.mark.slow
def test_jobs_runs_side_by_side_and_one_writer_records_every_run(tmp_path, syn):
    path = write_spec(tmp_path, syn, models=["GRU4Rec", "SASRec"], seeds=[1, 2], jobs=2)
    out = run_benchmark(path, write_reports=False)
    assert (out["ran"], out["failed"]) == (4, [])
    lines = [json.loads(ln) for ln in open(out["results_file"])]
    assert sorted(ln["run_key"] for ln in lines) == sorted(
        f"tiny-cdsr/{m}/seed{s}" for m in ("GRU4Rec", "SASRec") for s in (1, 2))
    with pytest.raises(BenchmarkError, match="key 'jobs' must be a positive integer"):
        load_benchmark(write_spec(tmp_path, syn, name="j0", jobs=0))
    with pytest.raises(BenchmarkError, match="need isolate_runs: true"):
        load_benchmark(write_spec(tmp_path, syn, name="j2", jobs=2, isolate_runs=False))


# -- 7. converter: truncated files, odd output folders, stale temporary folders -------
@pytest.fixture()
def release_copy(tmp_path, fk_raw):
    dst = tmp_path / "release"
    shutil.copytree(fk_raw, dst)
    return dst


def test_release_file_cut_mid_line_is_refused(tmp_path, release_copy):
    test_txt = release_copy / "test.txt"
    data = test_txt.read_bytes()
    test_txt.write_bytes(data[:-3])  # "...,1234\n" cut to "...,12": still parses as integers
    with pytest.raises(ConversionError, match=r"test.txt, line 937: the last line does not end with a newline, "
                                              r"so the file looks cut short"):
        convert_llmcdsr_release(str(release_copy), str(tmp_path / "out"), "food-kitchen")
    assert not (tmp_path / "out" / "food-kitchen").exists()


def test_out_that_is_a_file_or_not_writable_is_one_clear_error(tmp_path, release_copy, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert convert_main([str(release_copy), "--out", str(f)]) == 2
    assert f"error: output folder {f} is a file: give --out a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert convert_main([str(release_copy), "--out", str(ro)]) == 2
        assert "is not writable" in capsys.readouterr().err


def test_stale_temporary_folders_are_removed_by_the_next_conversion(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    stale = [d / ".tiny-cdsr.tmp-abc123", d / ".tiny-cdsr.old-xyz"]
    for s in stale:
        (s / "tiny-cdsr").mkdir(parents=True)
        (s / "tiny-cdsr" / "half.inter").write_text("half")
    other = d / ".other.tmp-keep"
    other.mkdir()
    write_synthetic_cdsr(str(d), "tiny-cdsr", seed=0)
    assert not any(s.exists() for s in stale)
    assert other.exists()  # another dataset's folder is not this conversion's business
    assert sorted(os.listdir(d)) == [".other.tmp-keep", "tiny-cdsr"]  # and no lock file left


def test_reconversion_keeps_the_cached_artefacts_beside_the_atomic_files(tmp_path):
    d = tmp_path / "data"
    write_synthetic_cdsr(str(d), "tiny-cdsr", seed=0)
    cache = d / "tiny-cdsr" / "tiny-cdsr.pretrain-A-0123456789ab.npz"
    cache.write_bytes(b"hours of pre-training")
    atomic = (d / "tiny-cdsr" / "tiny-cdsr.test.inter").read_bytes()
    write_synthetic_cdsr(str(d), "tiny-cdsr", seed=0)
    assert cache.read_bytes() == b"hours of pre-training"
    assert (d / "tiny-cdsr" / "tiny-cdsr.test.inter").read_bytes() == atomic
    assert sorted(os.listdir(d)) == ["tiny-cdsr"]


# -- 8. candidate files that do not match their manifest ------------------------------
def _store(tmp, data, **kw):
    cfg = CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(tmp, data_path=data, **dict(TINY, **kw)))
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    return CandidateStore(cfg, ds)


def test_candidates_drawn_with_another_seed_than_stated_are_detected(tmp_path, caplog):
    d = str(tmp_path / "data")
    write_synthetic_cdsr(d, "tiny-cdsr", seed=0)
    store = _store(str(tmp_path), d)
    store.build("test")
    assert store.check("test") == (True, None)
    npz, man = store.paths("test")
    honest = dict(np.load(npz))
    # the sets drawn with seed 7, saved under the seed-2024 name with a consistent manifest
    other = dict(honest)
    tokens = [str(t) for t in honest["item_tokens"]]
    doms = [t[0] for t in tokens]  # the synthetic items are a<i> and b<i>
    _, other["neg"], _ = draw_candidates(tokens, doms, [tokens[i] for i in honest["targets"]],
                                         [[] for _ in honest["targets"]], store.neg_num, 7, False)
    assert not np.array_equal(other["neg"], honest["neg"])
    np.savez_compressed(npz, **other)
    m = json.load(open(man))
    m["sha256"] = __import__("hashlib").sha256(open(npz, "rb").read()).hexdigest()
    m["arrays_sha256"] = arrays_sha256(other)
    json.dump(m, open(man, "w"))
    ok, reason = store.check("test")
    assert not ok and "are not the ones seed 2024 draws" in reason
    # loading warns (not info) and puts the honest sets back
    with caplog.at_level(logging.INFO, logger="recbole_cdsr.data.candidates"):
        _, _, (train, valid, test) = _prepared_cands(str(tmp_path), d)
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "tiny-cdsr.test candidate sets" in r.getMessage()]
    assert len(warn) == 1 and "drawing them again from eval_candidate_seed 2024" in warn[0].getMessage()
    assert np.array_equal(np.load(npz)["neg"], honest["neg"])
    # an npz changed after its manifest was written
    np.savez_compressed(npz, **other)
    ok, reason = store.check("test")
    assert not ok and "is not the file its manifest describes" in reason
    # never drawn: no reason, drawn silently
    os.remove(npz)
    assert store.check("test") == (False, None)


def _prepared_cands(tmp, data):
    from recbole_cdsr.data.utils import cdsr_data_preparation

    cfg = CDSRConfig("GRU4Rec", "tiny-cdsr", config_dict=base_config(tmp, data_path=data, **TINY))
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    return cfg, ds, cdsr_data_preparation(cfg, ds)
