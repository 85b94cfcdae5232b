"""Run a benchmark's matrix (datasets x models x seeds), resumably, locally or on Ray.

``run_benchmark("benchmarks/food-kitchen.yaml")``:

1. checks the file (models, config keys and budget, before anything runs) and makes sure
   each dataset's atomic files exist (converting a release when ``raw_path`` is set);
2. runs the hyper-parameter searches the file asks for (cached, see ``hyper.py``) and, for
   a budget in minutes, turns it into a step count per model (cached, ``calibration.py``);
3. plans every run with its full config and a config hash (the config, the config files'
   contents and the dataset files' fingerprint), and skips every run that
   ``results.jsonl`` already holds as finished with the same hash;
4. runs the rest, appending one line per run to ``results.jsonl`` as it ends (a run that
   raises is recorded as ``failed`` with its error, and the others go on; failed runs are
   tried again by the next invocation). Locally each run has a child process of its own
   (``isolate_runs``, default true), so a run the OS kills, out of memory say, is recorded
   as failed too, and no run inherits another's memory; ``jobs: N`` runs N of them side by
   side. A run's process ends when the benchmark's process does (killed included): no run
   goes on unrecorded;
5. writes the leaderboards (Markdown, CSV, PNG) from ``results.jsonl``.

One output folder has one writer: an invocation holds a lock on ``<output_dir>/.lock`` from
start to end, and a second invocation on the same folder stops at once, naming the first's
process. The lock is the operating system's (``flock``), so a killed process leaves none.

A line of ``results.jsonl`` is the run's results file (see ``quick_start``) plus
``benchmark``, ``name`` (the leaderboard label), ``run_key`` (``dataset/name/seedN``),
``config_hash``, ``status``, ``wall_seconds`` and ``code`` (:func:`code_fingerprint` of the
plugin's sources and defaults). Deleting a line reruns exactly that run.

The code is not part of the config hash: a fix in one model must not void a finished
matrix. Instead the leaderboard says which code versions its rows come from, and warns
when they are more than one (delete the lines of the runs to redo).
"""

import hashlib
import json
import os
import sys
import traceback
from datetime import datetime, timezone
from time import time

from dataset_converters.filelock import FileLock, LockBusy
from recbole_cdsr.benchmark.spec import BenchmarkError, BenchmarkSpec, load_benchmark
from recbole_cdsr.utils import code_fingerprint

LOCK_FILE = ".lock"


class OutputLock:
    """Exclusive lock on a benchmark output folder (``<folder>/.lock``) for the life of one
    invocation; a killed invocation leaves none (see ``dataset_converters.filelock``)."""

    def __init__(self, folder):
        self.folder = folder
        self._lock = FileLock(os.path.join(folder, LOCK_FILE))

    def __enter__(self):
        try:
            self._lock.acquire()
        except LockBusy as e:
            raise BenchmarkError(
                f"benchmark output folder {self.folder} is in use by another invocation"
                + (f" ({e.holder})" if e.holder else "")
                + ": wait for it to end, or give this benchmark another output_dir "
                "(to run models side by side, use one invocation with jobs: N)"
            ) from None
        return self

    def __exit__(self, *exc):
        self._lock.release()


#: config keys that say where files go or how much is printed: not part of the config hash
NON_HASHED_KEYS = ("checkpoint_dir", "results_dir", "show_progress", "state", "data_path")
RESULTS_FILE = "results.jsonl"


# -- planning ------------------------------------------------------------------------
def _sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def _file_sha(path):
    from recbole_cdsr.utils import sha256_file

    return sha256_file(path)


ATOMIC_SUFFIXES = ("item", "user", "train.inter", "valid.inter", "test.inter")


def dataset_fingerprint(data_path, dataset, stream=None):
    """sha256 over the contents of the dataset's atomic files.

    When the converter's manifest lists every atomic file present and each one's bytes still
    hash to the listed value, the fingerprint is the manifest's hash (it names the release
    and the converter as well); an atomic file edited, added or removed since the conversion
    gives a fingerprint of the files' actual contents instead, with a warning, so the runs
    that used the old files are run again.
    """
    d = os.path.join(data_path, dataset)
    present = {}
    for suffix in ATOMIC_SUFFIXES:
        p = os.path.join(d, f"{dataset}.{suffix}")
        if os.path.isfile(p):
            present[suffix] = _file_sha(p)
    if not present:
        raise BenchmarkError(f"dataset {dataset!r}: no atomic files in {d}")
    manifest = os.path.join(d, f"{dataset}.manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                listed = json.load(f).get("output_files_sha256") or {}
        except (OSError, ValueError, AttributeError):
            listed = {}
        listed = {s: listed[f"{dataset}.{s}"] for s in ATOMIC_SUFFIXES if f"{dataset}.{s}" in listed}
        if listed == present:
            return "manifest:" + _file_sha(manifest)
        changed = sorted(set(listed) ^ set(present) | {k for k in present if listed.get(k, present[k]) != present[k]})
        print(f"WARNING dataset {dataset!r}: atomic files differ from the converter's manifest "
              f"({', '.join(f'{dataset}.{c}' for c in changed) or 'no file list in the manifest'}); the benchmark fingerprints "
              "their contents, and runs recorded against the converted files run again",
              file=stream or sys.stderr, flush=True)
    return "files:" + _sha256_bytes("\n".join(f"{k}:{v}" for k, v in present.items()).encode())


def config_hash(run, fingerprint):
    ident = {
        "model": run["model"],
        "dataset": run["dataset"],
        "seed": run["seed"],
        "config": {k: v for k, v in run["config"].items() if k not in NON_HASHED_KEYS},
        "config_files": [_file_sha(f) for f in run["config_files"]],
        "data": fingerprint,
    }
    return _sha256_bytes(json.dumps(ident, sort_keys=True, default=str).encode())[:16]


def _base_config(spec, entry, dataset, budget, tuned=None, steps=None):
    cfg = dict(spec.config)
    cfg.update(BenchmarkSpec.budget_config(budget, steps))
    cfg["eval_protocol"] = list(spec.protocols)
    if spec.threads:
        cfg["num_threads"] = spec.threads
    cfg.update(spec.overrides.get(entry.name, {}))
    cfg.update(entry.config)
    cfg.update(tuned or {})  # a searched key takes its searched value
    cfg["data_path"] = os.path.abspath(cfg.get("data_path", "dataset/"))
    return cfg


def prepare_datasets(spec):
    """Make sure every dataset's atomic files exist; return ``{dataset: fingerprint}``."""
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import ensure_atomic_files

    out = {}
    for ds in spec.datasets:
        entry = spec.models[0]
        cfg = _base_config(spec, entry, ds, spec.budget)
        config = CDSRConfig(entry.model, ds, spec.config_files or None, cfg)
        try:
            ensure_atomic_files(config)
        except FileNotFoundError as e:
            raise BenchmarkError(f"dataset {ds!r}: {e}") from None
        out[ds] = dataset_fingerprint(cfg["data_path"], ds)
    return out


def calibrate_budgets(spec, fingerprints, tuned=None, budget=None, names=None, stream=None, measure=None):
    """``{(dataset, name): max_train_steps}`` for a budget in minutes (else empty).

    ``names``: only these models; ``measure``: the models that may be timed now (default:
    all), the others only when their measurement is cached (else they are left out)."""
    from recbole_cdsr.benchmark.calibration import calibrated_steps

    budget = budget or spec.budget
    if budget.get("minutes") is None:
        return {}
    tuned = tuned or {}
    out = {}
    for ds in spec.datasets:
        for entry in spec.models:
            if names is not None and entry.name not in names:
                continue
            cfg = _base_config(spec, entry, ds, budget, tuned.get((ds, entry.name)))
            cfg["seed"] = spec.seeds[0]
            n, _ = calibrated_steps(
                spec.output_dir, f"{ds}/{entry.name}", entry.model, ds, cfg, spec.config_files,
                fingerprints[ds], budget["minutes"], budget["calibration_steps"], stream,
                measure=measure is None or entry.name in measure,
            )
            if n is not None:
                out[(ds, entry.name)] = n
    return out


def plan_runs(spec, fingerprints, tuned=None, steps=None, check=True, names=None):
    """Every run of the matrix (dataset, then model, then seed), each a plain dict.

    A model's seeds run one after another, so a benchmark stopped part way has complete
    rows (every seed) for the models it reached, and a model's cached stages (LLMCDSR's
    pre-training, LeCDSR's profiles) are needed in one stretch.

    ``tuned``: ``{(dataset, name): params}`` from the searches; ``steps``:
    ``{(dataset, name): max_train_steps}`` from the calibration of a budget in minutes;
    ``names``: plan only these models (default: all)."""
    from recbole_cdsr.config import CDSRConfig

    tuned = tuned or {}
    steps = steps or {}
    runs = []
    for ds in spec.datasets:
        for entry in spec.models:
            if names is not None and entry.name not in names:
                continue
            for seed in spec.seeds:
                key = (ds, entry.name)
                cfg = _base_config(spec, entry, ds, spec.budget, tuned.get(key), steps.get(key))
                cfg["seed"] = seed
                run = {
                    "benchmark": spec.name,
                    "dataset": ds,
                    "model": entry.model,
                    "name": entry.name,
                    "seed": seed,
                    "config": cfg,
                    "config_files": list(spec.config_files),
                    "run_key": f"{ds}/{entry.name}/seed{seed}",
                    "output_dir": spec.output_dir,
                    "save_checkpoints": spec.save_checkpoints,
                }
                if check:  # wrong keys/types fail here, before anything runs
                    try:
                        CDSRConfig(entry.model, ds, spec.config_files or None, dict(cfg))
                    except ValueError as e:
                        raise BenchmarkError(f"{spec.path or spec.name}: run {run['run_key']}: {e}") from None
                run["config_hash"] = config_hash(run, fingerprints[ds])
                runs.append(run)
    return runs


# -- results.jsonl -------------------------------------------------------------------
class ResultsStore:
    """Append-only JSON lines; a half-written last line (a crash) is dropped on reading."""

    def __init__(self, path):
        self.path = path

    def read(self):
        if not os.path.isfile(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            print(f"{self.path}: dropping a half-written last line (an interrupted run)", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        out = []
        for i, ln in enumerate(data.decode("utf-8").splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{self.path} line {i}: not a JSON object ({e}); fix or delete that line") from None
            if not isinstance(obj, dict) or "run_key" not in obj or "config_hash" not in obj:
                raise BenchmarkError(f"{self.path} line {i}: not a benchmark run line (no run_key/config_hash)")
            out.append(obj)
        return out

    def append(self, line):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        text = json.dumps(line, sort_keys=True, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def finished_keys(lines):
    return {(ln["run_key"], ln["config_hash"]) for ln in lines if ln.get("status") == "ok"}


# -- executing one run ---------------------------------------------------------------
def execute_run(run):
    """Train and test one run; return its results.jsonl line (never raises for a run error)."""
    from recbole_cdsr.quick_start import run_recbole_cdsr

    t0 = time()
    cfg = dict(run["config"])
    cfg["checkpoint_dir"] = os.path.join(run["output_dir"], "checkpoints")
    cfg["results_dir"] = os.path.join(run["output_dir"], "runs")
    cfg["show_progress"] = False
    try:
        out = run_recbole_cdsr(
            run["model"], run["dataset"], run["config_files"] or None, cfg,
            saved=run["save_checkpoints"], save_results=True, verbose=False,
            report=lambda msg: print(f"  {run['run_key']}: {msg}", flush=True),
        )
        line = dict(out["results"])
        line["results_file"] = out["results_file"]
        line["status"] = "ok"
    except Exception as e:  # a failing run is recorded, the benchmark goes on
        line = failed_line(run, e, traceback.format_exc(limit=30))
    line.update(
        benchmark=run["benchmark"], name=run["name"], run_key=run["run_key"],
        config_hash=run["config_hash"], wall_seconds=time() - t0, code=code_fingerprint(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return line


def failed_line(run, error, tb=None):
    return {
        "model": run["model"], "dataset": run["dataset"], "seed": run["seed"],
        "status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": tb,
        "benchmark": run["benchmark"], "name": run["name"], "run_key": run["run_key"],
        "config_hash": run["config_hash"], "code": code_fingerprint(),
    }


class Progress:
    def __init__(self, total, skipped, stream=None):
        self.total, self.skipped, self.done = total, skipped, 0
        self.t0 = time()
        self.stream = stream or sys.stdout

    def update(self, line):
        self.done += 1
        elapsed = time() - self.t0
        left = self.total - self.skipped - self.done
        eta = elapsed / self.done * left
        what = "ok" if line.get("status") == "ok" else f"FAILED ({line.get('error', '')[:200]})"
        print(
            f"[{self.skipped + self.done}/{self.total}] {line['run_key']}: {what} "
            f"in {line.get('wall_seconds', 0):.1f} s; {left} to go, ETA {_fmt_seconds(eta)}",
            file=self.stream, flush=True,
        )


def _fmt_seconds(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -- executors -----------------------------------------------------------------------
def _child_main(execute, run, conn):
    """Body of a run's child process: the results line goes back through ``conn``."""
    import multiprocessing as mp

    # a spawned process makes spawn its default, so the run's own processes (RecBole's
    # ``worker`` data loaders) would be spawned too, which fails on sharing its tensors:
    # give them the platform's default, as in a run in the main process
    mp.set_start_method(None, force=True)
    _exit_with_parent()
    try:
        conn.send(execute(run))
    finally:
        conn.close()


#: exit status of a run's process that ended because the benchmark's process was gone
PARENT_GONE_EXIT = 75


def _exit_with_parent():
    """End this (child) process as soon as its parent ends, however the parent ends.

    A daemon thread waits on the parent's sentinel (which becomes ready when the parent is
    gone, killed included) and exits at once: a run whose benchmark is gone would otherwise
    train on and write a results file that no ``results.jsonl`` records."""
    import multiprocessing as mp
    import threading

    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        print(f"run process {os.getpid()}: the benchmark's process is gone; stopping this run",
              file=sys.stderr, flush=True)
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _died_line(run, exitcode, seconds):
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        how = f"it was killed by signal {-exitcode} ({name})"
        if -exitcode == signal.SIGKILL:
            how += "; the kernel's out-of-memory killer sends SIGKILL (see dmesg)"
    else:
        how = f"it exited with code {exitcode}"
    err = RuntimeError(f"the run's process ended without a result: {how}")
    line = failed_line(run, err)
    line["error"] = f"RunProcessDied: {err}"
    line["wall_seconds"] = seconds
    line["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return line


def execute_isolated(run, execute=None):
    """Run ``execute(run)`` (default :func:`execute_run`) in a fresh child process (spawn);
    return its results line, or a ``failed`` line when the process dies without one (killed
    by the OS, a crash in native code). The child's memory goes back to the OS when it ends."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # not fork: a forked child inherits torch's thread pools
    recv, send = ctx.Pipe(duplex=False)
    t0 = time()
    # not a daemon: a run may start processes of its own (RecBole's ``worker`` data loaders)
    proc = ctx.Process(target=_child_main, args=(execute or execute_run, run, send))
    proc.start()
    _LIVE.add(proc)
    send.close()  # the child holds the only writer: EOF once it is gone
    line = None
    try:
        try:
            line = recv.recv()
        except EOFError:
            pass
        proc.join()
    finally:
        if proc.is_alive():  # interrupted (Ctrl-C): never leave a run behind
            proc.terminate()
            proc.join()
        _LIVE.discard(proc)
        recv.close()
    if line is None:
        return _died_line(run, proc.exitcode, time() - t0)
    return line


#: run processes started by execute_isolated and not yet ended
_LIVE = set()


def run_local(pending, store, progress, isolate=True, execute=None, jobs=1):
    """One run after the other, or ``jobs`` side by side; each in a child process unless
    ``isolate`` is False. Lines are appended by this process alone, as runs end."""
    execute = execute or execute_run
    if jobs <= 1 or len(pending) <= 1:
        for run in pending:
            line = execute_isolated(run, execute) if isolate else execute(run)
            store.append(line)
            progress.update(line)
        return
    if not isolate:
        raise BenchmarkError("runs side by side (jobs > 1) need isolate_runs: true")
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="run")
    try:
        futures = {pool.submit(execute_isolated, run, execute) for run in pending}
        while futures:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for fut in done:
                line = fut.result()
                store.append(line)
                progress.update(line)
    except BaseException:  # Ctrl-C or a failing store: stop the runs still going
        for fut in list(futures):
            fut.cancel()
        for proc in list(_LIVE):
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


def run_ray(pending, store, progress, address=None, cpus_per_run=1):
    """Each run a Ray task (``cpus_per_run`` CPUs); lines appended as runs end.

    ``address``: None starts a local Ray; an address (``ray://host:10001`` or
    ``host:6379``) joins a running cluster, whose nodes must have the package installed
    and see the same data, output and config paths.
    """
    try:
        import ray
    except ImportError:
        raise BenchmarkError("executor 'ray' needs Ray: pip install -e .[ray]") from None
    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(execute_run)
        refs = {task.remote(run): run for run in pending}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                run = refs.pop(ref)
                try:
                    line = ray.get(ref)
                except Exception as e:  # the worker itself died (out of memory, killed)
                    line = failed_line(run, e)
                    line["wall_seconds"] = None
                store.append(line)
                progress.update(line)
    finally:
        if started:
            ray.shutdown()


EXECUTORS = ("local", "ray")


def run_benchmark(spec, executor="local", ray_address=None, write_reports=True, stream=None, only=None,
                  jobs=None):
    """Run (or resume) a benchmark; return a summary dict.

    Args:
        spec: a path to a benchmark file or a :class:`BenchmarkSpec`.
        executor: ``local`` (one run after the other, each in a child process of its own
            unless the file says ``isolate_runs: false``) or ``ray``.
        only: model names (of the file) to run now; the others are neither searched,
            calibrated nor run, and appear in the leaderboard only when their calibration
            (and search) is cached and their runs are recorded. Default: every model.
        jobs: local runs side by side (default: the file's ``jobs``, else 1).
    """
    if executor not in EXECUTORS:
        raise BenchmarkError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if not isinstance(spec, BenchmarkSpec):
        spec = load_benchmark(spec)
    names = [m.name for m in spec.models]
    if only is not None:
        only = [only] if isinstance(only, str) else list(only)
        bad = [n for n in only if n not in names]
        if not only or bad:
            raise BenchmarkError(
                f"{spec.path or spec.name}: models to run must be names of the file's models "
                f"({', '.join(names)}), got {bad[0] if bad else only!r}"
            )
    selected = set(only) if only is not None else set(names)
    jobs = spec.jobs if jobs is None else jobs
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise BenchmarkError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs > 1 and not spec.isolate_runs:
        raise BenchmarkError("runs side by side (jobs > 1) need isolate_runs: true")
    stream = stream or sys.stdout
    with OutputLock(spec.output_dir):
        return _run_locked(spec, executor, ray_address, write_reports, stream, only, selected, names, jobs)


def _run_locked(spec, executor, ray_address, write_reports, stream, only, selected, names, jobs):
    fingerprints = prepare_datasets(spec)
    tuned = {}
    planned = set(names)
    if spec.hyper:
        from recbole_cdsr.benchmark.hyper import tune_benchmark

        tuned = tune_benchmark(spec, fingerprints, stream=stream, names=selected)
        planned -= set(spec.hyper["models"]) - selected  # a search of its own, not run now
    steps = calibrate_budgets(spec, fingerprints, tuned, names=planned, stream=stream, measure=selected)
    if spec.budget.get("minutes") is not None:
        planned = {n for n in planned if all((ds, n) in steps for ds in spec.datasets)}
    runs = plan_runs(spec, fingerprints, tuned, steps, names=planned)
    store = ResultsStore(os.path.join(spec.output_dir, RESULTS_FILE))
    done = finished_keys(store.read())
    pending = [r for r in runs if (r["run_key"], r["config_hash"]) not in done and r["name"] in selected]
    skipped = sum(1 for r in runs if (r["run_key"], r["config_hash"]) in done)
    print(
        f"benchmark {spec.name}: {len(runs)} runs ({len(spec.datasets)} datasets x {len(planned)} "
        f"models x {len(spec.seeds)} seeds), {skipped} already finished, {len(pending)} to run "
        f"({executor}{'; models ' + ', '.join(only) if only is not None else ''})", file=stream, flush=True,
    )
    progress = Progress(skipped + len(pending), skipped, stream)
    if pending:
        if executor == "ray":
            run_ray(pending, store, progress, ray_address, spec.threads or 1)
        else:
            run_local(pending, store, progress, isolate=spec.isolate_runs, jobs=jobs)
    lines = store.read()
    failed = [r["run_key"] for r in runs
              if r["name"] in selected and (r["run_key"], r["config_hash"]) not in finished_keys(lines)]
    reports = {}
    if write_reports:
        from recbole_cdsr.benchmark.leaderboard import write_leaderboards

        reports = write_leaderboards(spec, runs, lines)
        for ds, files in reports.items():
            print(f"leaderboard {ds}: {files['markdown']}", file=stream, flush=True)
    return {
        "runs": len(runs), "skipped": skipped, "ran": len(pending), "failed": failed,
        "results_file": store.path, "reports": reports, "tuned": tuned, "steps": steps,
    }
