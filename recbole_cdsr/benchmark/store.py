"""A benchmark's output folder: ``results.jsonl`` and the lock that gives it one writer.

A line of ``results.jsonl`` is the run's results file (see ``quick_start``) plus
``benchmark``, ``name`` (the leaderboard label), ``run_key`` (``dataset/name/seedN``),
``config_hash`` (``plan.py``), ``status``, ``wall_seconds``, ``finished_at`` and ``code``
(:func:`~recbole_cdsr.utils.code_fingerprint` of the plugin's sources and defaults). A run
that raised, or whose process died, has a ``failed`` line with its ``error`` (and
traceback) instead of results. Lines are only appended; deleting a line reruns exactly
that run, and a run counts as finished when a line with its key and hash says ``ok``.

Paths in a line are this machine's no more (:func:`portable_paths`): a file of the output
folder is written relative to that folder (``runs/...json``, ``checkpoints``), a file of the
data folder relative to it (``food-kitchen``, ``food-kitchen/food-kitchen.itemtext-...npz``),
so committed results name no machine's folders.

One output folder has one writer: an invocation holds a lock on ``<output_dir>/.lock`` from
start to end, and a second invocation on the same folder stops at once, naming the first's
process. The lock is the operating system's (``flock``), so a killed process leaves none.
"""

import json
import os
import sys

from dataset_converters.filelock import FileLock, LockBusy
from recbole_cdsr.benchmark.spec import BenchmarkError
from recbole_cdsr.utils import code_fingerprint

LOCK_FILE = ".lock"
RESULTS_FILE = "results.jsonl"


def portable_paths(line, output_dir, data_root):
    """``line`` with every string that is a path inside ``output_dir`` or ``data_root``
    (absolute) written relative to that folder, at any depth (results file, config folders,
    stage artefacts). Other strings, relative paths included, stay as they are."""
    roots = [os.path.abspath(r) for r in (output_dir, data_root) if r]

    def rel(value):
        if isinstance(value, dict):
            return {k: rel(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rel(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            for root in roots:
                if value == root or value.startswith(root + os.sep):
                    return os.path.relpath(value, root)
        return value

    return rel(line)


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
    """``{(run_key, config_hash)}`` of the runs that ``lines`` hold as finished (``ok``)."""
    return {(ln["run_key"], ln["config_hash"]) for ln in lines if ln.get("status") == "ok"}


def run_fields(run):
    """The fields that every line of ``run`` has, whatever its status."""
    return {
        "benchmark": run["benchmark"], "name": run["name"], "run_key": run["run_key"],
        "config_hash": run["config_hash"], "code": code_fingerprint(),
    }


def failed_line(run, error, tb=None):
    """The line of a run that ended with ``error`` (``tb``: its traceback) instead of results."""
    line = {
        "model": run["model"], "dataset": run["dataset"], "seed": run["seed"],
        "status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": tb,
    }
    line.update(run_fields(run))
    return line
