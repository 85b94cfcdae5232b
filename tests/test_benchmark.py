"""The benchmark runner: resumable matrix, failures, leaderboard statistics, chart, Ray,
hyper-parameter search on validation only, time budgets."""

import csv
import json
import math
import os
import signal
import statistics

import numpy as np
import pytest
import yaml

from dataset_converters import write_synthetic_cdsr
from recbole_cdsr.benchmark.leaderboard import METRICS
from recbole_cdsr.benchmark.plan import plan_runs, prepare_datasets
from recbole_cdsr.benchmark.runner import Progress, execute_run, run_benchmark, run_local
from recbole_cdsr.benchmark.spec import BenchmarkError, load_benchmark
from recbole_cdsr.benchmark.store import ResultsStore

TINY = {  # small enough for seconds per run, big enough to learn something
    "eval_neg_num": 20,
    "train_batch_size": 256,
    "MAX_ITEM_LIST_LENGTH": 12,
    "hidden_size": 16,
    "inner_size": 32,
    "embedding_size": 16,
    "stopping_step": 2,
    "state": "WARNING",
    "use_gpu": False,
}


@pytest.fixture(scope="module")
def syn_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn"))
    write_synthetic_cdsr(d, "tiny-cdsr", seed=0)
    return d


def write_spec(tmp_path, data_path, name="tiny", models=("SASRec", "GRU4Rec"), seeds=(1, 2), out="out", **kw):
    raw = {
        "name": name,
        "datasets": ["tiny-cdsr"],
        "models": list(models),
        "seeds": list(seeds),
        "protocols": ["sampled", "full"],
        "budget": {"epochs": 2},
        "threads": 1,
        "config": dict(TINY, data_path=data_path),
        "output_dir": str(tmp_path / out),
        "save_checkpoints": False,
    }
    raw.update(kw)
    path = tmp_path / f"{name}-{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def read_lines(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f]


@pytest.mark.slow
def test_matrix_runs_rerun_does_nothing_and_a_deleted_line_reruns_exactly_that_run(tmp_path, syn_data):
    spec = write_spec(tmp_path, syn_data)
    out = run_benchmark(spec)
    assert (out["runs"], out["skipped"], out["ran"], out["failed"]) == (4, 0, 4, [])
    res = out["results_file"]
    lines = read_lines(res)
    assert sorted(ln["run_key"] for ln in lines) == [
        "tiny-cdsr/GRU4Rec/seed1", "tiny-cdsr/GRU4Rec/seed2", "tiny-cdsr/SASRec/seed1", "tiny-cdsr/SASRec/seed2"
    ]
    for ln in lines:
        assert ln["status"] == "ok" and ln["benchmark"] == "tiny" and len(ln["config_hash"]) == 16
        assert ln["seed"] == int(ln["run_key"][-1]) and ln["config"]["epochs"] == 2
        assert set(ln["test"]) == {"sampled", "full"}
        assert len(ln["test_instances"]["ranks"]["full"]) == 60  # the synthetic test split

    before = open(res, "rb").read()
    again = run_benchmark(spec)
    assert (again["skipped"], again["ran"]) == (4, 0)
    assert open(res, "rb").read() == before

    # delete SASRec seed 2's line: exactly that run comes back, with the same numbers
    victim = next(ln for ln in lines if ln["run_key"] == "tiny-cdsr/SASRec/seed2")
    with open(res, "w") as f:
        f.writelines(json.dumps(ln) + "\n" for ln in lines if ln is not victim)
    third = run_benchmark(spec)
    assert (third["skipped"], third["ran"]) == (3, 1)
    new = read_lines(res)
    assert len(new) == 4 and new[-1]["run_key"] == "tiny-cdsr/SASRec/seed2"
    assert new[-1]["test"] == victim["test"]  # same seed, same config: same metrics
    assert new[-1]["test_instances"] == victim["test_instances"]

    # every line names the code it came from; the leaderboard says so, and warns on a mix
    from recbole_cdsr.utils import code_fingerprint

    code = code_fingerprint()
    assert {ln["code"] for ln in new} == {code} and len(code) == 12
    md = tmp_path / "out" / "leaderboard-tiny-cdsr.md"
    assert f"every run from recbole-cdsr sources {code}" in md.read_text() and "Warning" not in md.read_text()
    new[0]["code"] = "0123456789ab"  # as if that run had been made before a code change
    with open(res, "w") as f:
        f.writelines(json.dumps(ln) + "\n" for ln in new)
    assert run_benchmark(spec)["ran"] == 0
    text = md.read_text()
    assert "runs come from 2 versions of the code" in text and f"0123456789ab: 1 runs (e.g. {new[0]['run_key']})" in text

    # --report rewrites the leaderboards from the recorded lines and runs nothing, even with a
    # line missing (that run is listed as without a result)
    from run_recbole_cdsr import main

    os.remove(md)
    with open(res, "w") as f:
        f.writelines(json.dumps(ln) + "\n" for ln in new[1:])
    assert main([f"--benchmark={spec}", "--report"]) == 0
    assert len(read_lines(res)) == 3 and md.read_text() != text
    assert f"without a finished result (failed or not run yet): {new[0]['run_key']}" in md.read_text()
    assert "| stopped by | epochs |" in md.read_text() and "| cap x2 | 2 |" in md.read_text()


def test_stop_reasons_and_epochs_of_a_models_runs():
    from recbole_cdsr.benchmark.leaderboard import stopping

    lines = [{"timing": {"stop_reason": "early_stopping", "epochs_trained": 24}},
             {"timing": {"stop_reason": "early_stopping", "epochs_trained": 31}},
             {"timing": {"train_epoch_seconds": [1.0] * 30}, "config": {"epochs": 30}},  # before reasons: cap
             {"timing": {"train_epoch_seconds": [1.0] * 12}, "config": {"epochs": 30}},  # ... early
             {"timing": {"stopped_by_budget": True, "train_epoch_seconds": [1.0] * 2}},
             {"timing": {"stop_reason": "interrupted", "epochs_trained": 5}}]
    assert stopping(lines) == ("early x3, cap x1, budget x1, interrupted x1", "2-31")
    assert stopping(lines[:1]) == ("early x1", "24")


@pytest.mark.slow
def test_failing_model_is_recorded_and_the_others_finish(tmp_path, syn_data, capsys):
    from run_recbole_cdsr import main

    bad = {"model": "SASRec", "name": "SASRec-bad", "config": {"n_heads": 3}}  # 16 % 3 != 0
    spec = write_spec(tmp_path, syn_data, models=["GRU4Rec", bad], seeds=[1])
    assert main([f"--benchmark={spec}"]) == 1
    err = capsys.readouterr().err
    assert "1 runs failed" in err and "tiny-cdsr/SASRec-bad/seed1" in err
    lines = {ln["run_key"]: ln for ln in read_lines(tmp_path / "out" / "results.jsonl")}
    assert lines["tiny-cdsr/GRU4Rec/seed1"]["status"] == "ok"
    failed = lines["tiny-cdsr/SASRec-bad/seed1"]
    assert failed["status"] == "failed"
    assert "hidden size" in failed["error"] and "attention heads" in failed["error"]
    assert "Traceback" in failed["traceback"]
    md = (tmp_path / "out" / "leaderboard-tiny-cdsr.md").read_text()
    assert "| GRU4Rec |" in md and "SASRec-bad/seed1" in md.split("Runs without a finished result")[1]
    # the failed run is tried again (and fails again), the finished one is not
    out = run_benchmark(spec)
    assert (out["skipped"], out["ran"], out["failed"]) == (1, 1, ["tiny-cdsr/SASRec-bad/seed1"])


def kill_seed_2(run):
    """A run whose process the OS kills (as the out-of-memory killer does) for seed 2."""
    if run["seed"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return execute_run(run)


@pytest.mark.slow
def test_a_run_killed_by_the_os_is_recorded_as_failed_and_the_others_finish(tmp_path, syn_data, capsys):
    # worker: 1 (RecBole's data loader processes): a run's process may start its own
    path = write_spec(tmp_path, syn_data, models=["GRU4Rec"], seeds=[1, 2, 3], config=dict(TINY, data_path=syn_data, worker=1))
    spec = load_benchmark(path)
    runs = plan_runs(spec, prepare_datasets(spec))
    assert runs[0]["config"]["worker"] == 1
    store = ResultsStore(os.path.join(spec.output_dir, "results.jsonl"))
    run_local(runs, store, Progress(3, 0), execute=kill_seed_2)  # each run in its own process
    lines = {ln["run_key"]: ln for ln in store.read()}
    assert [lines[f"tiny-cdsr/GRU4Rec/seed{s}"]["status"] for s in (1, 2, 3)] == ["ok", "failed", "ok"]
    dead = lines["tiny-cdsr/GRU4Rec/seed2"]
    assert dead["error"].startswith("RunProcessDied: the run's process ended without a result: "
                                    "it was killed by signal 9 (SIGKILL)")
    assert dead["wall_seconds"] > 0 and dead["config_hash"] == runs[1]["config_hash"]
    assert "[2/3] tiny-cdsr/GRU4Rec/seed2: FAILED (RunProcessDied" in capsys.readouterr().out
    # a child process gives the numbers of a run in this process
    here = execute_run(runs[0])
    assert here["test"] == lines["tiny-cdsr/GRU4Rec/seed1"]["test"]
    assert here["test_instances"] == lines["tiny-cdsr/GRU4Rec/seed1"]["test_instances"]
    # the next invocation runs exactly the killed run again
    out = run_benchmark(path)
    assert (out["skipped"], out["ran"], out["failed"]) == (2, 1, [])


def test_isolate_runs_must_be_a_bool(tmp_path, syn_data):
    with pytest.raises(BenchmarkError, match=r"key 'isolate_runs' must be true or false, got 'yes'"):
        load_benchmark(write_spec(tmp_path, syn_data, isolate_runs="yes"))
    assert load_benchmark(write_spec(tmp_path, syn_data)).isolate_runs is True


def test_readme_markers_get_the_main_tables_of_the_leaderboard(tmp_path, syn_data):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nintro\n\n<!-- leaderboard:tiny-cdsr:start -->\nold table\n"
                      "<!-- leaderboard:tiny-cdsr:end -->\n\nafter\n")
    path = write_spec(tmp_path, syn_data, models=["GRU4Rec"], seeds=[1], readme="README.md", isolate_runs=False)
    out = run_benchmark(path)
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n<!-- leaderboard:tiny-cdsr:start -->\n")
    assert text.endswith("<!-- leaderboard:tiny-cdsr:end -->\n\nafter\n") and "old table" not in text
    block = text.split("<!-- leaderboard:tiny-cdsr:start -->\n")[1].split("<!-- leaderboard:tiny-cdsr:end -->")[0]
    md = (tmp_path / "out" / "leaderboard-tiny-cdsr.md").read_text()
    rows = [ln for ln in block.splitlines() if ln.startswith("| GRU4Rec |")]
    assert len(rows) == 2 and all(r in md for r in rows)  # the sampled and full main rows, as in the leaderboard
    line = read_lines(out["results_file"])[0]
    assert f"{line['test']['full']['A/hit@10']:.4f}" in rows[1].split(" | ")[1]
    assert "Sampled protocol (target vs the same 20 sampled negatives of its domain), mean ± std over seeds 1;" in block
    n = line["instances"]["test"]
    assert n["A"] + n["B"] == 60 and f"test instances: A {n['A']}, B {n['B']}:" in block
    assert "[leaderboard-tiny-cdsr.md](out/leaderboard-tiny-cdsr.md)" in block
    before = readme.stat().st_mtime_ns
    run_benchmark(path)  # nothing new: the file is not rewritten
    assert readme.stat().st_mtime_ns == before and readme.read_text() == text

    readme.write_text("no markers here\n")
    with pytest.raises(BenchmarkError, match=r"README.md: no '<!-- leaderboard:tiny-cdsr:start -->' \.\.\. "
                                             r"'<!-- leaderboard:tiny-cdsr:end -->' markers"):
        run_benchmark(path)
    with pytest.raises(BenchmarkError, match=r"key 'readme' .*nowhere.md does not exist"):
        load_benchmark(write_spec(tmp_path, syn_data, readme="nowhere.md"))


def test_named_readme_markers_and_validation_curves(tmp_path, syn_data, capsys):
    """A benchmark named ``head`` writes into ``leaderboard:head/<dataset>`` markers when the
    README has them (another benchmark's ``leaderboard:<dataset>`` block is left alone), and
    every benchmark draws each run's validation HR@10 per epoch."""
    import matplotlib.image

    from recbole_cdsr.benchmark.leaderboard import valid_curves
    from recbole_cdsr.benchmark.spec import load_benchmark as load

    readme = tmp_path / "README.md"
    text = ("<!-- leaderboard:tiny-cdsr:start -->\nmain table\n<!-- leaderboard:tiny-cdsr:end -->\n\n"
            "<!-- leaderboard:head/tiny-cdsr:start -->\nold\n<!-- leaderboard:head/tiny-cdsr:end -->\n")
    readme.write_text(text)
    path = write_spec(tmp_path, syn_data, name="head", models=["GRU4Rec"], seeds=[1], readme="README.md",
                      isolate_runs=False, budget={"epochs": 3})
    out = run_benchmark(path)
    new = readme.read_text()
    assert new.startswith("<!-- leaderboard:tiny-cdsr:start -->\nmain table\n") and "\nold\n" not in new
    assert "| GRU4Rec |" in new.split("<!-- leaderboard:head/tiny-cdsr:start -->")[1]
    line = read_lines(out["results_file"])[0]
    # no path of this machine in the line: the results file relative to the output folder,
    # the dataset folder relative to the data folder
    assert line["results_file"].startswith("runs" + os.sep) and (tmp_path / "out" / line["results_file"]).is_file()
    assert line["config"]["data_path"] == "tiny-cdsr" and line["config"]["checkpoint_dir"] == "checkpoints"
    hist = line["valid_history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    # while it ran, the run said where it stood after every validation
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"  {line['run_key']}: epoch ")]
    assert len(said) == 3 and said[1].startswith(f"  {line['run_key']}: epoch 2/3: train ")
    assert f"B/hit@10 {hist[1]['result']['B/hit@10']:.4f}" in said[1] and said[2].endswith("at most 0.0 min to go")
    curves = valid_curves(load(path), {"GRU4Rec": [line]})
    assert set(curves) == {("sampled", "A"), ("sampled", "B"), ("full", "A"), ("full", "B")}
    assert curves[("sampled", "B")][("GRU4Rec", 1)] == [(h["epoch"], h["result"]["B/hit@10"]) for h in hist]
    assert curves[("full", "A")][("GRU4Rec", 1)] == [(h["epoch"], h["result"]["full:A/hit@10"]) for h in hist]
    png = tmp_path / "out" / "valid-curves-tiny-cdsr.png"
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01
    readme.write_text("<!-- leaderboard:tiny-cdsr:start -->\nx\n<!-- leaderboard:tiny-cdsr:end -->\n")
    run_benchmark(path)  # no named markers: the dataset's own markers, as before
    assert "| GRU4Rec |" in readme.read_text()


def test_portable_paths_by_hand_and_in_the_committed_results():
    """Paths inside the output or data folder become relative to it, at any depth; other
    strings stay; no committed results.jsonl holds an absolute path."""
    import glob

    from recbole_cdsr.benchmark.store import portable_paths

    line = {"results_file": "/m/out/runs/a.json", "note": "/elsewhere/x", "rel": "runs/b",
            "config": {"data_path": "/m/data/fk", "checkpoint_dir": "/m/out/checkpoints", "k": 3},
            "stages": {"files": ["/m/data/fk/fk.npz", "/m/outside"]}}
    got = portable_paths(line, "/m/out", "/m/data")
    assert got == {"results_file": "runs/a.json", "note": "/elsewhere/x", "rel": "runs/b",
                   "config": {"data_path": "fk", "checkpoint_dir": "checkpoints", "k": 3},
                   "stages": {"files": ["fk/fk.npz", "/m/outside"]}}
    assert line["results_file"] == "/m/out/runs/a.json"  # the input is left as it was
    here = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "results")
    files = glob.glob(os.path.join(here, "*", "results.jsonl"))
    assert len(files) >= 3
    for f in files:
        for ln in read_lines(f):
            def walk(x):
                if isinstance(x, dict):
                    return [s for v in x.values() for s in walk(v)]
                if isinstance(x, list):
                    return [s for v in x for s in walk(v)]
                return [x] if isinstance(x, str) and x.startswith(("/work", "/tmp", "/root", "/home")) else []
            assert walk({k: v for k, v in ln.items() if k != "traceback"}) == [], (f, ln.get("run_key"))


def test_validation_curves_one_line_per_model_with_a_seed_band(tmp_path):
    """The curves picture draws per model the mean over seeds at each epoch and a band from
    the lowest to the highest seed (by hand: three seeds, one of them stopped early); 20 rows
    fit beside one legend that covers no panel."""
    import matplotlib.image

    from recbole_cdsr.benchmark.leaderboard import curve_bands, plot_valid_curves

    runs = {1: [(0, 0.1), (1, 0.3), (2, 0.4)], 2: [(0, 0.2), (1, 0.5)], 3: [(0, 0.3), (1, 0.4), (2, 0.2)]}
    got = curve_bands(runs)
    assert [b[0] for b in got] == [0, 1, 2] and [(b[2], b[3]) for b in got] == [(0.1, 0.3), (0.3, 0.5), (0.2, 0.4)]
    assert [round(b[1], 6) for b in got] == [0.2, 0.4, 0.3]

    class Spec:
        protocols, seeds = ["sampled", "full"], [1, 2, 3]

    def line(name, seed, n):
        hist = [{"epoch": e, "result": {"A/hit@10": 0.1 + 0.01 * e + 0.001 * seed, "B/hit@10": 0.2,
                                        "full:A/hit@10": 0.05, "full:B/hit@10": 0.02 * seed}} for e in range(n)]
        return {"model": "SASRec", "seed": seed, "valid_history": hist, "run_key": f"d/{name}/seed{seed}"}

    by_name = {f"M{k}": [line(f"M{k}", s, 5 + k) for s in (1, 2, 3)] for k in range(20)}
    png = plot_valid_curves(Spec, "tiny-cdsr", by_name, str(tmp_path / "curves.png"))
    img = matplotlib.image.imread(png)
    assert img.shape[1] > img.shape[0] > 500
    legend = img[:, int(img.shape[1] * 0.82):, :3]  # the legend's column: text on white, no panel frame
    assert (legend < 0.5).any() and legend.mean() > 0.9


@pytest.mark.slow
def test_leaderboard_means_stds_and_paired_test_match_a_hand_computation(tmp_path, syn_data):
    from scipy import stats

    spec = write_spec(tmp_path, syn_data, seeds=[1, 2, 3])
    out = run_benchmark(spec)
    lines = read_lines(out["results_file"])
    with open(tmp_path / "out" / "leaderboard-tiny-cdsr.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * len(METRICS)  # protocols x domains x models x metrics
    by = {(r["protocol"], r["domain"], r["model"], r["metric"]): r for r in rows}
    for protocol in ("sampled", "full"):
        for dom in ("A", "B"):
            for metric in ("hit@10", "ndcg@10", "mrr@10", "hit@1"):
                means = {}
                for model in ("SASRec", "GRU4Rec"):
                    vals = [ln["test"][protocol][f"{dom}/{metric}"] for ln in lines if ln["name"] == model]
                    assert len(vals) == 3
                    r = by[(protocol, dom, model, metric)]
                    assert float(r["mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12)
                    assert float(r["std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
                    means[model] = statistics.mean(vals)
                best = max(means, key=means.get)
                other = min(means, key=means.get)
                assert by[(protocol, dom, best, metric)]["best"] == "True"
                assert by[(protocol, dom, other, metric)]["best"] == "False"
                # paired t-test over instances, each instance's metric averaged over seeds
                name, k = metric.split("@")
                k = int(k)

                def per_instance(model):
                    per_seed = []
                    for ln in (x for x in lines if x["name"] == model):
                        doms = ln["test_instances"]["target_domain"]
                        r = np.array([rk for rk, d in zip(ln["test_instances"]["ranks"][protocol], doms) if d == dom], float)
                        hit = (r <= k).astype(float)
                        per_seed.append({"hit": hit, "ndcg": hit / np.log2(r + 1), "mrr": hit / r}[name])
                    return np.mean(per_seed, axis=0)

                x, y = per_instance(other), per_instance(best)
                row = by[(protocol, dom, other, metric)]
                assert row["best_baseline"] == best
                if np.all(x == y):
                    assert float(row["p_value"]) == 1.0
                else:
                    assert float(row["p_value"]) == pytest.approx(stats.ttest_rel(x, y).pvalue, rel=1e-9)
                assert by[(protocol, dom, best, metric)]["p_value"] == ""  # the reference itself
    # seconds per epoch: each run's median epoch time (its epochs ran whole), averaged over seeds
    sas = [ln["timing"] for ln in lines if ln["name"] == "SASRec"]
    assert all(t["train_steps"] == t["batches_per_epoch"] * len(t["train_epoch_seconds"]) for t in sas)
    spe = [statistics.median(t["train_epoch_seconds"]) for t in sas]
    assert float(by[("full", "A", "SASRec", "hit@10")]["sec_per_epoch"]) == pytest.approx(statistics.mean(spe))
    # how each model trained (the defaults: SASRec on whole sequences, batches trimmed)
    assert by[("full", "A", "SASRec", "hit@10")]["view"] == "sequence + trimmed"
    assert all(ln["speed"]["loss_path"] == "sequence_fused_ce" for ln in lines if ln["name"] == "SASRec")
    # the chart is a real PNG with content
    import matplotlib.image

    png = tmp_path / "out" / "leaderboard-tiny-cdsr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01


@pytest.mark.slow
def test_ray_executor_gives_the_same_results_as_local(tmp_path, syn_data):
    pytest.importorskip("ray")
    import higher  # noqa: F401  (this process has imported more than a fresh Ray worker)

    local = run_benchmark(write_spec(tmp_path, syn_data, out="local"), executor="local")
    ray_ = run_benchmark(write_spec(tmp_path, syn_data, out="ray"), executor="ray")
    assert ray_["ran"] == 4 and not ray_["failed"]

    def comparable(path):
        out = {}
        for ln in read_lines(path):
            for k in ("timing", "wall_seconds", "finished_at", "results_file"):
                ln.pop(k)
            for k in ("checkpoint_dir", "results_dir"):  # the two output folders differ
                ln["config"].pop(k)
            out[ln["run_key"]] = ln
        return out

    a, b = comparable(local["results_file"]), comparable(ray_["results_file"])
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert a[key] == b[key], key


@pytest.mark.slow
def test_half_written_last_line_is_dropped_and_that_run_reruns(tmp_path, syn_data, capsys):
    spec = write_spec(tmp_path, syn_data, models=["GRU4Rec"], seeds=[1, 2])
    out = run_benchmark(spec)
    res = out["results_file"]
    full = open(res).read()
    first, second = full.splitlines(keepends=True)
    open(res, "w").write(first + second[: len(second) // 2])  # a crash while writing
    again = run_benchmark(spec)
    assert "half-written" in capsys.readouterr().err
    assert (again["skipped"], again["ran"]) == (1, 1)
    assert [json.loads(x)["run_key"] for x in open(res)] == [json.loads(first)["run_key"], json.loads(second)["run_key"]]


def test_results_line_that_is_not_json_is_one_clear_error(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"run_key": "a", "config_hash": "b"}\nnot json\n{"run_key": "c", "config_hash": "d"}\n')
    with pytest.raises(BenchmarkError, match=r"results.jsonl line 2: not a JSON object"):
        ResultsStore(str(p)).read()


def test_config_hash_follows_config_and_data(tmp_path, syn_data):
    spec = load_benchmark(write_spec(tmp_path, syn_data))
    fp = prepare_datasets(spec)
    h1 = {r["run_key"]: r["config_hash"] for r in plan_runs(spec, fp)}
    assert len(set(h1.values())) == 4
    assert h1 == {r["run_key"]: r["config_hash"] for r in plan_runs(spec, fp)}
    spec.budget["epochs"] = 3
    h2 = {r["run_key"]: r["config_hash"] for r in plan_runs(spec, fp)}
    assert all(h1[k] != h2[k] for k in h1)
    spec.budget["epochs"] = 2
    h3 = {r["run_key"]: r["config_hash"] for r in plan_runs(spec, {"tiny-cdsr": "other data"})}
    assert all(h1[k] != h3[k] for k in h1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": ["SASRec", "SASRek"]}, "unknown model 'SASRek'"),
        ({"budget": {"epochs": "ten"}}, "key 'budget.epochs' must be int"),
        ({"budget": None}, "key 'budget' is missing"),
        ({"seeds": []}, "key 'seeds' must be a non-empty list of integers"),
        ({"protocols": ["sampled", "uni100"]}, "key 'protocols' must list protocols"),
        ({"colour": "red"}, "key 'colour' unknown key"),
        ({"models": ["SASRec", "SASRec"]}, "name 'SASRec' appears twice"),
        ({"overrides": {"NARM": {"epochs": 1}}}, "'NARM' is not a model name of this benchmark"),
        ({"config": {"eval_neg_num": "many"}}, "key 'config.eval_neg_num' must be int"),
        ({"hyper": {"models": ["SASRec"], "algo": "grid"}}, "key 'hyper.algo' must be one of"),
        ({"equal_epochs": 0}, "key 'equal_epochs' must be a positive number of epochs"),
        ({"equal_epochs": "ten"}, "key 'equal_epochs' must be a positive number of epochs"),
    ],
)
def test_bad_benchmark_file_is_one_clear_error(tmp_path, change, message):
    path = write_spec(tmp_path, str(tmp_path), **change)
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(path)
    assert message in str(e.value) and path in str(e.value)


def test_missing_dataset_is_one_clear_error(tmp_path):
    path = write_spec(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match="dataset 'tiny-cdsr'"):
        run_benchmark(path)


def test_time_budget_stops_training_and_still_evaluates(tmp_path, syn_data):
    from recbole_cdsr.quick_start import run_recbole_cdsr

    cfg = dict(TINY, data_path=syn_data, epochs=50, train_time_budget=1e-6, train_batch_size=64,
               checkpoint_dir=str(tmp_path / "ck"), results_dir=str(tmp_path / "res"), show_progress=False)
    out = run_recbole_cdsr("GRU4Rec", "tiny-cdsr", config_dict=cfg, saved=False, verbose=False)
    t = out["results"]["timing"]
    assert t["stopped_by_budget"] is True
    assert t["train_steps"] == 1 and len(t["train_epoch_seconds"]) == 1 and t["batches_per_epoch"] > 1
    assert len(out["results"]["valid_history"]) == 1  # the last evaluation happened
    assert out["test_result"]["A/hit@10"] >= 0


def test_hyper_search_never_ranks_test_and_feeds_the_benchmark(tmp_path, syn_data, monkeypatch):
    from recbole_cdsr.benchmark import hyper
    from recbole_cdsr.evaluation.protocol import ProtocolEvaluator

    space = tmp_path / "GRU4Rec.hyper"
    space.write_text("learning_rate choice [0.01,0.0001]\ndropout_prob choice [0.1]\n")
    monkeypatch.setattr(hyper, "space_file", lambda model: str(space))
    splits = []
    real_rank = ProtocolEvaluator.rank

    def spy(self, model, loader, show_progress=False):
        splits.append(loader.split)
        return real_rank(self, model, loader, show_progress)

    monkeypatch.setattr(ProtocolEvaluator, "rank", spy)
    spec = write_spec(tmp_path, syn_data, models=["GRU4Rec"], seeds=[1], isolate_runs=False,  # the spy is here
                      hyper={"models": ["GRU4Rec"], "algo": "exhaustive", "budget": {"epochs": 2}})
    out = run_benchmark(spec)
    files = sorted(os.listdir(tmp_path / "out" / "hyper"))
    assert len(files) == 2 and files[0].startswith("tiny-cdsr-GRU4Rec-") and files[1].endswith(".manifest.json")
    rec = json.load(open(tmp_path / "out" / "hyper" / files[0]))
    assert len(rec["trials"]) == 2 and {t["params"]["learning_rate"] for t in rec["trials"]} == {0.01, 0.0001}
    best = max(rec["trials"], key=lambda t: t["best_valid_score"])
    assert rec["best_params"] == best["params"]
    # the trials ranked only the validation split; test is ranked by the benchmark run
    # afterwards, once per domain checkpoint, at its very end
    assert splits.count("test") == 2 and splits[-2:] == ["test", "test"]
    assert len(splits) == 2 * 4 + 6  # per run: 2 epochs + best-valid per domain (+ 2 test)
    line = read_lines(out["results_file"])[0]
    assert line["config"]["learning_rate"] == best["params"]["learning_rate"]
    # a second invocation reuses the search (no trial runs) and the finished run
    splits.clear()
    again = run_benchmark(spec)
    assert splits == [] and again["ran"] == 0 and again["tuned"] == out["tuned"]


@pytest.mark.slow
def test_budget_in_minutes_becomes_a_fixed_step_count_per_model(tmp_path, syn_data):
    spec = write_spec(tmp_path, syn_data, models=["GRU4Rec", "SASRec"], seeds=[1, 2],
                      budget={"minutes": 0.02, "epochs": 10000, "calibration_steps": 2},
                      config=dict(TINY, data_path=syn_data, stopping_step=1000))
    out = run_benchmark(spec)
    cal = json.load(open(tmp_path / "out" / "calibration.json"))
    assert sorted(k.split("@")[0] for k in cal) == ["tiny-cdsr/GRU4Rec", "tiny-cdsr/SASRec"]
    for key, rec in cal.items():
        name = key.split("@")[0].split("/")[1]
        steps = max(1, int(0.02 * 60 / rec["seconds_per_step"]))
        assert out["steps"][("tiny-cdsr", name)] == steps
        for ln in read_lines(out["results_file"]):
            if ln["name"] == name:
                assert ln["config"]["max_train_steps"] == steps
                assert ln["timing"]["train_steps"] == steps and ln["timing"]["stopped_by_budget"]
    # the step counts are kept: a second invocation measures nothing and reruns nothing
    before = open(tmp_path / "out" / "calibration.json").read()
    again = run_benchmark(spec)
    assert again["ran"] == 0 and again["steps"] == out["steps"]
    assert open(tmp_path / "out" / "calibration.json").read() == before


@pytest.mark.slow
def test_models_option_runs_part_of_the_matrix_model_by_model(tmp_path, syn_data, capsys):
    from run_recbole_cdsr import main

    spec = write_spec(tmp_path, syn_data, models=["GRU4Rec", "SASRec"], seeds=[1, 2],
                      budget={"minutes": 0.02, "epochs": 100, "calibration_steps": 2},
                      config=dict(TINY, data_path=syn_data, stopping_step=1000))
    cal_path = tmp_path / "out" / "calibration.json"
    assert main([f"--benchmark={spec}", "--models=SASRec"]) == 0
    lines = read_lines(tmp_path / "out" / "results.jsonl")
    assert [ln["run_key"] for ln in lines] == ["tiny-cdsr/SASRec/seed1", "tiny-cdsr/SASRec/seed2"]
    assert [k.split("@")[0] for k in json.load(open(cal_path))] == ["tiny-cdsr/SASRec"]  # GRU4Rec not timed
    md = (tmp_path / "out" / "leaderboard-tiny-cdsr.md").read_text()
    assert "| SASRec |" in md and "| GRU4Rec |" not in md
    sasrec_cal = json.load(open(cal_path))
    # the rest of the matrix: GRU4Rec only, its seeds one after the other; SASRec is kept
    out = run_benchmark(spec)
    assert (out["runs"], out["skipped"], out["ran"], out["failed"]) == (4, 2, 2, [])
    lines = read_lines(tmp_path / "out" / "results.jsonl")
    assert [ln["run_key"] for ln in lines[2:]] == ["tiny-cdsr/GRU4Rec/seed1", "tiny-cdsr/GRU4Rec/seed2"]
    cal = json.load(open(cal_path))
    assert {k: v for k, v in cal.items() if k.startswith("tiny-cdsr/SASRec@")} == sasrec_cal
    md = (tmp_path / "out" / "leaderboard-tiny-cdsr.md").read_text()
    assert "| SASRec |" in md and "| GRU4Rec |" in md
    assert run_benchmark(spec, only=["GRU4Rec"])["ran"] == 0
    with pytest.raises(BenchmarkError, match="names of the file's models"):
        run_benchmark(spec, only=["NARM"])
    capsys.readouterr()
    assert main([f"--benchmark={spec}", "--models=SASRec,Nope"]) == 2
    assert "'Nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model=SASRec", "--dataset=tiny-cdsr", "--models=SASRec"])


def test_cli_tune_searches_the_models_space_on_validation(tmp_path, syn_data, capsys):
    from run_recbole_cdsr import main

    args = [f"--{k}={v}" for k, v in TINY.items()] + [
        "--model=GRU4Rec", "--dataset=tiny-cdsr", "--tune=random", "--max_evals=2", "--epochs=1",
        f"--data_path={syn_data}", f"--checkpoint_dir={tmp_path / 'ck'}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trial 2" in out and "best parameters (validation" in out
    best = out.split("best parameters (validation ")[1]
    assert "'learning_rate':" in best and "'dropout_prob':" in best  # properties/hyper/GRU4Rec.hyper


def test_cli_benchmark_refuses_model_arguments(tmp_path, capsys):
    from run_recbole_cdsr import main

    with pytest.raises(SystemExit):
        main(["--benchmark=x.yaml", "--model=SASRec"])
    assert "--benchmark takes its models" in capsys.readouterr().err
    assert main([f"--benchmark={tmp_path / 'missing.yaml'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_committed_food_kitchen_benchmark_file():
    """benchmarks/food-kitchen.yaml parses and holds what the leaderboard promises."""
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "food-kitchen.yaml")
    spec = load_benchmark(path)
    assert spec.datasets == ["food-kitchen"]
    assert spec.seeds == [2020, 2021, 2022]
    assert spec.protocols == ["sampled", "full"]
    names = [m.name for m in spec.models]
    required = {"SASRec", "GRU4Rec", "BERT4Rec", "NARM", "STAMP", "Caser", "SRGNN", "CORE", "LightSANs",
                "FEARec", "NextItNet", "FPMC"}
    assert required <= set(names)
    assert {"LLMCDSR", "LLMCDSR-backbone", "LeCDSR"} <= set(names)
    assert spec.entry("LLMCDSR-backbone").config == {"llmcdsr_mode": "backbone_only"}
    # the 12 RecBole models are the baselines of the significance test; ours are not
    assert set(spec.baselines) == required
    assert spec.budget["minutes"] > 0
    # results, calibration and leaderboard are committed beside the file
    here = os.path.dirname(os.path.abspath(path))
    assert spec.output_dir == os.path.join(here, "results", "food-kitchen")


def test_readme_leaderboard_is_the_committed_run_of_the_committed_benchmark_file(fk_data):
    """Every planned run of benchmarks/food-kitchen.yaml is finished in the committed
    results.jsonl (C2DSR and URLLM-DG from a later code version than the other rows), and the
    committed leaderboard and the tables of its
    readme (benchmarks/results/food-kitchen/README.md) are what those lines give (recomputed
    here, nothing written)."""
    import os

    from recbole_cdsr.benchmark.leaderboard import (
        code_versions, readme_block, readme_markers, select_lines, summarize, to_markdown,
    )
    from recbole_cdsr.benchmark.plan import calibrate_budgets

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "food-kitchen.yaml")
    spec = load_benchmark(path)
    spec.config["data_path"] = fk_data  # not part of the config hash
    fps = prepare_datasets(spec)
    steps = calibrate_budgets(spec, fps, measure=set())  # cached in calibration.json: nothing is timed
    assert len(steps) == len(spec.models) == 17
    runs = plan_runs(spec, fps, steps=steps)
    lines = ResultsStore(os.path.join(spec.output_dir, "results.jsonl")).read()
    found, missing = select_lines(runs, lines)
    assert missing == {} and sum(len(v) for v in found["food-kitchen"].values()) == 51
    by_name = found["food-kitchen"]
    code = code_versions(by_name)
    assert len(code) == 2
    rows = summarize(spec, "food-kitchen", by_name)
    base = os.path.join(spec.output_dir, "leaderboard-food-kitchen")
    with open(base + ".md", encoding="utf-8") as f:
        assert f.read() == to_markdown(spec, "food-kitchen", rows, missing.get("food-kitchen"), code, by_name=by_name)
    assert spec.readme == os.path.join(spec.output_dir, "README.md")
    link = os.path.relpath(base + ".md", os.path.dirname(spec.readme)).replace(os.sep, "/")
    assert link == "leaderboard-food-kitchen.md"
    start, end = readme_markers("food-kitchen")
    with open(spec.readme, encoding="utf-8") as f:
        readme = f.read()
    block = readme.split(start + "\n", 1)[1].split(end, 1)[0]
    assert block == readme_block(spec, "food-kitchen", rows, by_name, link)


def test_leaderboards_name_the_domains_of_the_results():
    """Domain names travel from the results (``domains``, from the converter's manifest) into
    the leaderboard's Markdown, README block, CSV and plots; lines written before results
    carried them get the known release's names."""
    import os

    from recbole_cdsr.benchmark.leaderboard import (
        domain_names, readme_block, summarize, to_csv, to_markdown,
    )

    here = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    spec = load_benchmark(os.path.join(here, "food-kitchen-converged.yaml"))
    lines = [ln for ln in read_lines(os.path.join(spec.output_dir, "results.jsonl")) if ln["name"] == "FPMC"]
    assert len(lines) == 3 and not any("domains" in ln for ln in lines)
    assert domain_names("food-kitchen", {"FPMC": lines}) == {"A": "Grocery and Gourmet Food", "B": "Home and Kitchen"}
    assert domain_names("my-data", {"FPMC": lines}) == {}
    named = [dict(ln, domains={"A": "Food", "B": "Kitchen"}) for ln in lines]
    rows = summarize(spec, "food-kitchen", {"FPMC": named})
    assert {(r["domain"], r["domain_name"]) for r in rows} == {("A", "Food"), ("B", "Kitchen")}
    assert "\nDomains: A = Food, B = Kitchen.\n" in to_markdown(spec, "food-kitchen", rows)
    assert readme_block(spec, "food-kitchen", rows, {"FPMC": named}, "x.md").startswith("Domains: A = Food, B = Kitchen.\n")
    header, first = to_csv(rows).splitlines()[:2]
    assert header.startswith("dataset,protocol,domain,domain_name,model,") and first.startswith("food-kitchen,sampled,A,Food,FPMC,")
    # the device each row trained on (the GPU's name when there is one)
    assert {r["device"] for r in rows} == {"cpu (2 threads)"}
    assert "| s/epoch | device | seeds |" in to_markdown(spec, "food-kitchen", rows)
    gpu = [dict(ln, device={"device": "cuda:0", "gpu": "NVIDIA H200", "cpu_threads": 16}) for ln in named]
    mixed = summarize(spec, "food-kitchen", {"FPMC": named[:2] + gpu[2:]})
    assert {r["device"] for r in mixed} == {"cpu (2 threads) / NVIDIA H200"}
    # one thread in the singular; the processor's name where the run recorded it
    one = [dict(ln, device={"device": "cpu", "cpu_threads": 1, "cpu_model": "AMD EPYC 7B13"}) for ln in named]
    mixed = summarize(spec, "food-kitchen", {"FPMC": named[:2] + one[2:]})
    assert {r["device"] for r in mixed} == {"cpu (2 threads) / cpu, AMD EPYC 7B13 (1 thread)"}
    # a dataset whose names are its tokens gets no legend
    plain = summarize(spec, "my-data", {"FPMC": [dict(ln, domains={"A": "A", "B": "B"}) for ln in lines]})
    assert "Domains:" not in to_markdown(spec, "my-data", plain)


def _history(a_values, b_values, full_offset=0.0):
    """A run's validation history: per-domain HR@10 as given, NDCG@10 = HR@10 / 2, and the
    full protocol's values ``full_offset`` lower."""
    out = []
    for e, (a, b) in enumerate(zip(a_values, b_values)):
        r = {}
        for d, v in (("A", a), ("B", b)):
            r[f"{d}/hit@10"], r[f"{d}/ndcg@10"] = v, v / 2
            r[f"full:{d}/hit@10"], r[f"full:{d}/ndcg@10"] = v - full_offset, (v - full_offset) / 2
        out.append({"epoch": e, "result": r})
    return out


def _equal_line(seed, a_values, b_values, patience=2, freeze=True, name="M"):
    return {"name": name, "seed": seed, "run_key": f"d/{name}/seed{seed}",
            "config": {"stopping_step": patience, "freeze_stopped_domains": freeze},
            "selection": {"selection_keys": {"A": "A/hit@10", "B": "B/hit@10"}},
            "instances": {"valid": {"A": 10, "B": 10}, "test": {"A": 10, "B": 10}},
            "valid_history": _history(a_values, b_values, full_offset=0.1)}


def test_equal_epoch_selection_replays_the_trainers_rule_by_hand():
    """Within the first N epochs: strict improvement, and a domain without improvement for
    ``stopping_step`` evaluations keeps its best (freeze_stopped_domains), as the trainer."""
    from recbole_cdsr.benchmark.leaderboard import select_within

    a = [0.1, 0.3, 0.3, 0.2, 0.5, 0.4]  # ties do not improve; A is frozen after epoch 3
    b = [0.2, 0.1, 0.4, 0.4, 0.45, 0.6]
    ln = _equal_line(1, a, b)
    pick = lambda n, line=ln: {k: (h or {}).get("epoch") for k, h in select_within(line, n).items()}  # noqa: E731
    assert pick(1) == {"A": 0, "B": 0}
    assert pick(3) == {"A": 1, "B": 2}
    assert pick(100) == {"A": 1, "B": 5}  # A's 0.5 at epoch 4 comes after it was frozen
    assert pick(0) == {"A": None, "B": None}
    thawed = _equal_line(1, a, b, freeze=False)
    assert pick(100, thawed) == {"A": 4, "B": 5}


def test_equal_epoch_replay_gives_the_committed_runs_best_epochs():
    """On the committed converged runs, the replay over their whole history selects the
    epochs the trainer selected (``selection.best_epochs`` of each line)."""
    from recbole_cdsr.benchmark.leaderboard import select_within

    here = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    spec = load_benchmark(os.path.join(here, "food-kitchen-converged.yaml"))
    lines = read_lines(os.path.join(spec.output_dir, "results.jsonl"))
    assert len(lines) >= 5
    for ln in lines:
        picked = {k: h["epoch"] for k, h in select_within(ln, 10 ** 6).items()}
        assert picked == ln["selection"]["best_epochs"], ln["run_key"]


def test_equal_epoch_rows_and_section_by_hand(tmp_path):
    """Mean and std over seeds of the validation metrics at the selected epochs, each
    protocol from its own keys, the window's epochs per row, the section in the Markdown
    and in the README block."""
    from recbole_cdsr.benchmark.leaderboard import (
        equal_epoch_rows, readme_block, summarize, to_markdown,
    )

    path = write_spec(tmp_path, str(tmp_path), models=("SASRec", "GRU4Rec"), seeds=(1, 2), equal_epochs=3)
    spec = load_benchmark(path)
    assert spec.equal_epochs == 3
    by_name = {
        # SASRec: seed 1 picks A@1 (0.3), B@2 (0.4); seed 2 picks A@2 (0.5), B@0 (0.3)
        "SASRec": [_equal_line(1, [0.1, 0.3, 0.3, 0.9], [0.2, 0.1, 0.4, 0.9], name="SASRec"),
                   _equal_line(2, [0.2, 0.4, 0.5, 0.9], [0.3, 0.2, 0.1, 0.9], name="SASRec")],
        # GRU4Rec stopped early after two epochs: A@0 (0.6), B@1 (0.2)
        "GRU4Rec": [_equal_line(1, [0.6, 0.5], [0.1, 0.2], name="GRU4Rec")],
    }
    rows = equal_epoch_rows(spec, "tiny-cdsr", by_name, 3)
    idx = {(r["protocol"], r["domain"], r["model"], r["metric"]): r for r in rows}
    r = idx[("sampled", "A", "SASRec", "hit@10")]
    assert r["mean"] == pytest.approx(0.4) and r["std"] == pytest.approx(statistics.stdev([0.3, 0.5]))
    assert idx[("sampled", "B", "SASRec", "hit@10")]["mean"] == pytest.approx(0.35)
    assert idx[("sampled", "B", "SASRec", "ndcg@10")]["mean"] == pytest.approx(0.175)
    assert idx[("full", "A", "SASRec", "hit@10")]["mean"] == pytest.approx(0.3)  # the same epochs, full keys
    g = idx[("sampled", "A", "GRU4Rec", "hit@10")]
    assert g["mean"] == pytest.approx(0.6) and math.isnan(g["std"]) and g["best"] and g["epochs"] == "2"
    assert not r["best"] and r["epochs"] == "3" and r["seeds"] == 2
    assert idx[("sampled", "B", "SASRec", "hit@10")]["best"]
    # the section: heading, both protocols, the rows' cells
    summary = summarize(spec, "tiny-cdsr", {n: [dict(ln, test={}) for ln in lines] for n, lines in by_name.items()})
    md = to_markdown(spec, "tiny-cdsr", summary, equal=rows)
    assert "## Equal epochs: validation within the first 3 epochs" in md
    assert "| SASRec | 0.4000 ± 0.1414 | 0.2000 ± 0.0707 | **0.3500 ± 0.0707** | **0.1750 ± 0.0354** | 2 | 3 |" in md
    assert "| model | A HR@10 | A NDCG@10 | B HR@10 | B NDCG@10 | seeds | validations |" in md
    assert "| GRU4Rec | **0.6000** | **0.3000** | 0.2000 | 0.1000 | 1 | 2 |" in md
    assert "Full protocol (target vs every item of its domain), validation:" in md
    assert "Equal epochs" not in to_markdown(spec, "tiny-cdsr", summary)
    block = readme_block(spec, "tiny-cdsr", summary, by_name, "x.md", rows)
    assert "#### Equal epochs: validation within the first 3 epochs" in block
    assert block.index("#### Equal epochs") < block.index("More cut-offs")
    # written by the benchmark's report: the section and its CSV
    from recbole_cdsr.benchmark.leaderboard import write_leaderboards

    runs, lines = [], []
    for n, lns in by_name.items():
        for ln in lns:
            runs.append({"run_key": ln["run_key"], "config_hash": "h", "dataset": "tiny-cdsr", "name": n})
            lines.append(dict(ln, status="ok", config_hash="h", test={}))
    rep = write_leaderboards(spec, runs, lines, out_dir=str(tmp_path / "board"))["tiny-cdsr"]
    with open(rep["markdown"], encoding="utf-8") as f:
        assert "## Equal epochs: validation within the first 3 epochs" in f.read()
    with open(rep["equal_csv"], encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 2 * 2  # protocols x domains x metrics x models
    first = table[0]
    assert (first["protocol"], first["domain"], first["model"], first["metric"]) == ("sampled", "A", "SASRec", "hit@10")
    assert float(first["mean"]) == pytest.approx(0.4) and first["epochs"] == "3" and first["best"] == "False"


#: rows of the converged board that are being trained again to early stopping (the
#: cross-domain rows): their planned runs may still be missing, and lines of their earlier or
#: next configs (another epoch cap) may sit in results.jsonl unplanned
RETRAINED_ROWS = {"C2DSR", "URLLM-DG", "LeCDSR"}
#: the code versions the converged board's runs come from (benchmarks/README.md names them):
#: the first 19 runs, the rest of the first 51, SASRec-overlap, the retrained C2DSR
BOARD_CODE = {"687dcf3bf7e7", "7340d3f7267a", "bdc6f7acadf4", "c6c773f304f5"}


def test_committed_converged_benchmark_caps_only_the_expensive_rows():
    """benchmarks/food-kitchen-converged.yaml: every row to early stopping under a cap of 300
    epochs, except the rows too costly for the CPU, capped at the equal-epoch window of 10
    epochs, URLLM-DG at its public 15 epochs, and C2DSR at its public code's 100 epochs,
    validated every epoch; the control row SASRec-overlap trains on the overlapped users."""
    from recbole_cdsr.benchmark.plan import run_config

    here = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    spec = load_benchmark(os.path.join(here, "food-kitchen-converged.yaml"))
    assert spec.equal_epochs == 10 and len(spec.models) == 18 and spec.seeds == [2020, 2021, 2022]
    configs = {m.name: run_config(spec, m, spec.budget) for m in spec.models}
    caps = {n: c["epochs"] for n, c in configs.items()}
    capped = {"Caser", "NextItNet", "LightSANs", "FEARec", "LeCDSR"}
    assert {n for n, c in caps.items() if c != 300} == capped | {"URLLM-DG", "C2DSR"}
    assert {caps[n] for n in capped} == {spec.equal_epochs} and caps["URLLM-DG"] == 15
    assert caps["C2DSR"] == 100 and configs["C2DSR"]["eval_step"] == 1
    assert configs["SASRec-overlap"]["train_min_items_per_domain"] == 2
    assert "train_min_items_per_domain" not in configs["SASRec"]
    assert spec.config["stopping_step"] == 10


def test_converged_leaderboard_is_the_committed_runs_of_the_converged_benchmark_file(fk_data):
    """The committed converged board (leaderboard Markdown, README tables, equal-epoch
    section) is what its results.jsonl gives for the planned runs (recomputed here, nothing
    written); every row is complete but those being trained again, every finished run
    records why it stopped, and the runs come from the code versions that
    benchmarks/README.md names. Lines of a row's earlier config (C2DSR capped at 10 epochs)
    stay in the file, unplanned."""
    from recbole_cdsr.benchmark.leaderboard import (
        code_versions, equal_epoch_rows, readme_block, readme_markers, select_lines, summarize, to_markdown,
    )

    here = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    spec = load_benchmark(os.path.join(here, "food-kitchen-converged.yaml"))
    spec.config["data_path"] = fk_data  # not part of the config hash
    runs = plan_runs(spec, prepare_datasets(spec))
    lines = ResultsStore(os.path.join(spec.output_dir, "results.jsonl")).read()
    found, missing = select_lines(runs, lines)
    by_name = found["food-kitchen"]
    ok = [ln for ln in lines if ln["status"] == "ok"]
    planned = {(r["run_key"], r["config_hash"]) for r in runs}
    unplanned = [ln for ln in ok if (ln["run_key"], ln["config_hash"]) not in planned]
    assert sum(len(v) for v in by_name.values()) + len(unplanned) == len(ok)
    assert {ln["name"] for ln in unplanned} <= set(RETRAINED_ROWS)  # superseded configs of retrained rows only
    code = code_versions(by_name)
    assert set(code) <= BOARD_CODE and len(code["687dcf3bf7e7"]) == 16  # the first 19, less the superseded C2DSR runs
    assert all(ln["timing"]["stop_reason"] in ("early_stopping", "epoch_cap") for ln in ok)
    assert set(missing.get("food-kitchen") or {}) <= set(RETRAINED_ROWS)
    for entry in spec.models:
        if entry.name not in RETRAINED_ROWS:
            assert len(by_name[entry.name]) == 3, entry.name
    # every planned run stopped by early stopping or at its row's epoch cap; the rows the
    # file caps below what early stopping would need stopped at the cap in every seed
    caps = {r["name"]: r["config"]["epochs"] for r in runs}
    for name, lns in by_name.items():
        stops = {(ln["timing"]["stop_reason"], ln["timing"]["epochs_trained"]) for ln in lns}
        assert all(why == "early_stopping" or (why == "epoch_cap" and n == caps[name]) for why, n in stops), name
        if caps[name] <= 15:
            assert stops == {("epoch_cap", caps[name])}, (name, stops)
        elif name not in RETRAINED_ROWS:
            assert {why for why, _ in stops} == {"early_stopping"}, (name, stops)
    rows = summarize(spec, "food-kitchen", by_name)
    equal = equal_epoch_rows(spec, "food-kitchen", by_name, spec.equal_epochs)
    base = os.path.join(spec.output_dir, "leaderboard-food-kitchen")
    with open(base + ".md", encoding="utf-8") as f:
        assert f.read() == to_markdown(spec, "food-kitchen", rows, missing.get("food-kitchen"), code, equal, by_name)
    start, end = readme_markers("food-kitchen")
    with open(spec.readme, encoding="utf-8") as f:
        block = f.read().split(start + "\n", 1)[1].split(end, 1)[0]
    assert block == readme_block(spec, "food-kitchen", rows, by_name, "leaderboard-food-kitchen.md", equal)


def test_seconds_per_epoch_skip_stretched_epochs_and_keep_devices_apart():
    """s/epoch by hand: a run whose epochs ran whole gives its median epoch (an epoch that a
    pause stretched to 900 s does not count); a run that a budget stopped within an epoch
    gives seconds per step x batches per epoch; the cell averages runs per device, in the
    device column's order."""
    from recbole_cdsr.benchmark.leaderboard import seconds_per_epoch, seconds_per_epoch_by_device

    def line(secs, steps, threads):
        return {"timing": {"train_epoch_seconds": secs, "train_steps": steps, "batches_per_epoch": 10},
                "device": {"device": "cpu", "cpu_threads": threads}}

    paused = line([100.0, 900.0, 104.0], 30, 1)
    assert seconds_per_epoch(paused) == 104.0
    assert seconds_per_epoch(line([100.0, 900.0, 104.0, 106.0], 40, 1)) == 105.0
    cut = line([50.0, 20.0], 14, 2)  # one whole epoch and 4 of 10 batches of the next: 70 s / 14 steps
    assert seconds_per_epoch(cut) == pytest.approx(50.0)
    assert seconds_per_epoch({"timing": {}}) != seconds_per_epoch({"timing": {}})  # nan
    two = line([60.0, 62.0], 20, 2)
    assert seconds_per_epoch_by_device([two, paused, cut, line([96.0], 10, 1)]) == "55.5 / 100.0"
    assert seconds_per_epoch_by_device([paused]) == "104.0"
    assert seconds_per_epoch_by_device([{"timing": {}}]) == "-"


def test_runs_section_lists_each_run_with_its_stop_epochs_and_wall_time():
    from recbole_cdsr.benchmark.leaderboard import runs_section

    def line(seed, why, n, best, wall, device):
        return {"run_key": f"d/M/seed{seed}", "timing": {"stop_reason": why, "epochs_trained": n},
                "selection": {"best_epochs": best}, "wall_seconds": wall, "device": device}

    cpu = {"device": "cpu", "cpu_threads": 2}
    gpu = {"device": "cuda:0", "gpu": "NVIDIA H200"}
    table = runs_section({"M": [line(1, "early_stopping", 24, {"A": 3, "B": 13}, 157.98, cpu),
                                line(2, "epoch_cap", 10, {"joint": 9}, 12345.6, gpu),
                                line(3, "interrupted", 2, {}, None, {})]})
    assert table.splitlines()[2:] == [
        "| d/M/seed1 | early | 24 | A 4, B 14 | 158 s | cpu (2 threads) |",
        "| d/M/seed2 | cap | 10 | joint 10 | 12,346 s | NVIDIA H200 |",
        "| d/M/seed3 | interrupted | 2 | - | - | ? |",
    ]
    resumed = line(4, "epoch_cap", 3, {"A": 2}, 50.2, cpu)
    resumed["timing"].update(resumed_at=[{"epoch": 1, "at": "t"}, {"epoch": 2, "at": "u"}],
                             train_epoch_seconds=[30.0, 31.0, 32.0], valid_eval_seconds=[1.5, 1.5, 1.0])
    assert runs_section({"M": [resumed]}).splitlines()[2] == (
        "| d/M/seed4 | cap | 3 | A 3 | 50 s in the last of 3 processes (continued after epochs 1, 2; "
        "training and validation in all: 97 s) | cpu (2 threads) |")


def _split_popularity():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "split_popularity.py")
    spec = importlib.util.spec_from_file_location("split_popularity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_popularity_ranks_are_the_protocols_ranks_of_the_counts():
    """benchmarks/split_popularity.py ranks by training counts exactly as the evaluation
    protocol ranks those scores (same sampled candidates, pessimistic ties), and a by-hand
    case: counts a=[5, 3, 3, 0], b=[2, 2]."""
    import torch

    from recbole_cdsr.data.candidates import draw_candidates
    from recbole_cdsr.evaluation.protocol import full_ranks, sampled_ranks

    mod = _split_popularity()
    tokens = np.array(["a0", "a1", "a2", "a3", "b0", "b1"])
    domains = np.array(["A", "A", "A", "A", "B", "B"])
    counts = np.array([5, 3, 3, 0, 2, 2])
    targets = np.array(["a0", "a1", "a3", "b0"])
    hists = [["b1"], ["a0"], [], ["a2"]]
    ranks = mod.pop_ranks(counts, tokens, domains, targets, hists, neg_num=1, seed=7)
    # full: a0 beats all; a1 ties a2 (pessimistic: 2 items >= it, a0 and a2); a3 last; b0 ties b1
    assert ranks["full"].tolist() == [1, 3, 4, 2]

    _, neg, tgt = draw_candidates(tokens, domains, targets, hists, 1, 7, False)
    # the protocol's score rows: column 0 is the padding item, then the items in token order
    scores = torch.as_tensor(np.r_[-1, counts], dtype=torch.float32).repeat(len(targets), 1)
    tgt_t = torch.as_tensor(tgt + 1)
    assert ranks["sampled"].tolist() == sampled_ranks(scores, tgt_t, torch.as_tensor(neg + 1, dtype=torch.long)).tolist()
    in_dom = torch.as_tensor(np.c_[np.zeros((len(tgt), 1), bool), domains[None, :] == domains[tgt][:, None]])
    assert ranks["full"].tolist() == full_ranks(scores, tgt_t, in_dom).tolist()


def test_split_popularity_of_food_kitchen(fk_data, capsys):
    """The real release's validation targets are more popular than its test targets: the
    median training count and the popularity ranking's sampled HR@10 of each split."""
    import re
    import sys

    mod = _split_popularity()
    argv = sys.argv
    sys.argv = ["split_popularity.py", "--data", os.path.join(fk_data, "food-kitchen")]
    try:
        mod.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    rows = {(m[0], m[1]): (int(m[2]), float(m[3]), float(m[4]))
            for m in re.findall(r"^\| (valid|test) \| (A|B) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert {k: v[:2] for k, v in rows.items()} == {
        ("valid", "A"): (363, 28), ("valid", "B"): (597, 16), ("test", "A"): (300, 16), ("test", "B"): (637, 11)}
    assert rows["valid", "A"][2] > 4 * rows["test", "A"][2] and rows["valid", "B"][2] > 2 * rows["test", "B"][2]
