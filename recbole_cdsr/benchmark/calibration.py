"""A budget in minutes, turned into a fixed number of training steps per model.

A wall-clock budget makes every run depend on the machine's load at that moment. Instead,
each model (with its run config) is timed once: ``calibration_steps`` batches of warm-up,
then ``calibration_steps`` timed batches, no evaluation. ``minutes * 60 / seconds_per_step``
steps (at least 1) is then the run's ``max_train_steps`` for every seed. The measurement is
kept in ``<output_dir>/calibration.json`` and reused while the model's config, the data and
``calibration_steps`` are unchanged, so reruns and resumed benchmarks train exactly as many
steps as before. Delete that file to measure again (on another machine, say).
"""

import hashlib
import json
import os
import platform
import sys
from datetime import datetime, timezone

from recbole_cdsr.utils import atomic_write_json, code_fingerprint, sha256_file

CALIBRATION_VERSION = 1
CALIBRATION_FILE = "calibration.json"
#: keys that do not change the cost of a training step
_IGNORED = ("seed", "epochs", "steps_per_epoch", "max_train_steps", "train_time_budget", "eval_step",
            "checkpoint_dir", "results_dir", "show_progress", "state", "data_path")


def _identity(model, dataset, cfg, config_files, fingerprint, calib_steps):
    ident = {
        "version": CALIBRATION_VERSION, "model": model, "dataset": dataset,
        "config": {k: v for k, v in cfg.items() if k not in _IGNORED},
        "config_files": [sha256_file(f) for f in config_files], "data": fingerprint,
        "calibration_steps": calib_steps,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_seconds_per_step(model, dataset, cfg, config_files, calib_steps):
    """Seconds per training step of ``model`` under ``cfg`` (after one warm-up epoch)."""
    from recbole_cdsr.quick_start import run_recbole_cdsr

    c = dict(cfg)
    c.update(epochs=2, steps_per_epoch=calib_steps, eval_step=0, max_train_steps=None,
             train_time_budget=None, show_progress=False)
    out = run_recbole_cdsr(model, dataset, config_files or None, c, saved=False, save_results=False,
                           verbose=False, evaluate_test=False)
    t = out["results"]["timing"]
    first = min(calib_steps, t["batches_per_epoch"])
    second = t["train_steps"] - first
    if second > 0:
        return t["train_epoch_seconds"][1] / second, second
    return t["train_epoch_seconds"][0] / first, first


def calibrated_steps(output_dir, key, model, dataset, cfg, config_files, fingerprint, minutes,
                     calib_steps, stream=None, measure=True):
    """``(max_train_steps, record)`` for a budget of ``minutes`` (measured once, then cached).

    With ``measure=False`` a model without a cached measurement gives ``(None, None)``."""
    stream = stream or sys.stdout
    path = os.path.join(output_dir, CALIBRATION_FILE)
    cache = {}
    if os.path.isfile(path):
        with open(path) as f:
            cache = json.load(f)
    ident = _identity(model, dataset, cfg, config_files, fingerprint, calib_steps)
    key = f"{key}@{ident}"  # one entry per config: a tuned and an untuned config both stay
    rec = cache.get(key)
    if rec is None and not measure:
        return None, None
    if rec is None:
        sps, n = measure_seconds_per_step(model, dataset, cfg, config_files, calib_steps)
        rec = {
            "identity": ident, "model": model, "dataset": dataset, "seconds_per_step": sps,
            "timed_steps": n, "num_threads": cfg.get("num_threads"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code": code_fingerprint(),
        }
        cache[key] = rec
        atomic_write_json(path, cache)
        print(f"calibration {key}: {sps:.3f} s per training step", file=stream, flush=True)
    steps = max(1, int(minutes * 60.0 / rec["seconds_per_step"]))
    return steps, rec
