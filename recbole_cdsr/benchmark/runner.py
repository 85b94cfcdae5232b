"""Run a benchmark's matrix (datasets x models x seeds), resumably, locally or on Ray.

``run_benchmark("benchmarks/food-kitchen.yaml")``:

1. checks the file (models, config keys and budget, before anything runs: ``spec.py``) and
   makes sure each dataset's atomic files exist (converting a release when ``raw_path`` is
   set);
2. runs the hyper-parameter searches the file asks for (cached, see ``hyper.py``) and, for
   a budget in minutes, turns it into a step count per model (cached, ``calibration.py``);
3. plans every run with its full config and config hash (``plan.py``), and skips every run
   that ``results.jsonl`` already holds as finished with the same hash (``store.py``);
4. runs the rest, appending one line per run to ``results.jsonl`` as it ends (a run that
   raises is recorded as ``failed`` with its error, and the others go on; failed runs are
   tried again by the next invocation). Locally each run has a child process of its own
   (``isolate_runs``, default true), so a run the OS kills, out of memory say, is recorded
   as failed too, and no run inherits another's memory; ``jobs: N`` runs N of them side by
   side. A run's process ends when the benchmark's process does (killed included): no run
   goes on unrecorded;
5. writes the leaderboards (Markdown, CSV, PNG, and the tables into the file's ``readme``)
   from ``results.jsonl`` (``leaderboard.py``).

The whole invocation holds the output folder's lock (``store.OutputLock``): one writer per
folder.
"""

import os
import sys
import traceback
from datetime import datetime, timezone
from time import time

from recbole_cdsr.benchmark.hyper import tune_benchmark
from recbole_cdsr.benchmark.leaderboard import write_leaderboards
from recbole_cdsr.benchmark.plan import calibrate_budgets, plan_runs, prepare_datasets
from recbole_cdsr.benchmark.spec import BenchmarkError, BenchmarkSpec, load_benchmark
from recbole_cdsr.benchmark.store import (
    RESULTS_FILE, OutputLock, ResultsStore, failed_line, finished_keys, portable_paths, run_fields,
)


# -- executing one run ---------------------------------------------------------------
def execute_run(run):
    """Train and test one run; return its results.jsonl line (never raises for a run error)."""
    from recbole_cdsr.quick_start import run_recbole_cdsr

    t0 = time()
    cfg = dict(run["config"])
    cfg["checkpoint_dir"] = os.path.join(run["output_dir"], "checkpoints")
    cfg["results_dir"] = os.path.join(run["output_dir"], "runs")
    cfg["show_progress"] = False
    cfg.setdefault("resumable", True)  # a run cut short continues after its last finished epoch
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
    seconds = time() - t0
    line.update(run_fields(run), wall_seconds=seconds,
                finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return portable_paths(line, run["output_dir"], run["config"].get("data_path"))


class Progress:
    """One line per ended run: ``[done/total] run_key: ok|FAILED in s; left, ETA``."""

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
                  jobs=None, report_only=False):
    """Run (or resume) a benchmark; return a summary dict: ``runs`` (planned), ``skipped``
    (already finished), ``ran``, ``failed`` (run keys of the selected models without a
    finished line), ``results_file``, ``reports`` (:func:`write_leaderboards`), ``tuned``
    and ``steps`` (the searches' parameters and the calibrated step counts).

    Args:
        spec: a path to a benchmark file or a :class:`BenchmarkSpec`.
        executor: ``local`` (one run after the other, each in a child process of its own
            unless the file says ``isolate_runs: false``) or ``ray``.
        ray_address: the Ray cluster to join (default: start a local Ray).
        report_only: run, time and search nothing; write the leaderboards from the results
            already recorded (a model without a cached calibration is left out).
        write_reports: write the leaderboards (and the readme's tables) at the end.
        stream: where progress goes (default stdout).
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
        return _run_locked(spec, executor, ray_address, write_reports, stream, only, selected, names, jobs,
                           report_only)


def _run_locked(spec, executor, ray_address, write_reports, stream, only, selected, names, jobs,
                report_only=False):
    fingerprints = prepare_datasets(spec)
    tuned = {}
    planned = set(names)
    if spec.hyper and not report_only:
        tuned = tune_benchmark(spec, fingerprints, stream=stream, names=selected)
        planned -= set(spec.hyper["models"]) - selected  # a search of its own, not run now
    steps = calibrate_budgets(spec, fingerprints, tuned, names=planned, stream=stream,
                              measure=set() if report_only else selected)
    if spec.budget.get("minutes") is not None:
        planned = {n for n in planned if all((ds, n) in steps for ds in spec.datasets)}
    runs = plan_runs(spec, fingerprints, tuned, steps, names=planned)
    store = ResultsStore(os.path.join(spec.output_dir, RESULTS_FILE))
    done = finished_keys(store.read())
    pending = [r for r in runs if (r["run_key"], r["config_hash"]) not in done and r["name"] in selected
               and not report_only]
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
    done = finished_keys(lines)
    failed = [r["run_key"] for r in runs if r["name"] in selected and (r["run_key"], r["config_hash"]) not in done]
    reports = {}
    if write_reports:
        reports = write_leaderboards(spec, runs, lines)
        for ds, files in reports.items():
            print(f"leaderboard {ds}: {files['markdown']}", file=stream, flush=True)
    return {
        "runs": len(runs), "skipped": skipped, "ran": len(pending), "failed": failed,
        "results_file": store.path, "reports": reports, "tuned": tuned, "steps": steps,
    }
