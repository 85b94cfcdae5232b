"""A benchmark's runs: each (dataset, model, seed) with its full config and its identity.

- :func:`prepare_datasets` makes sure each dataset's atomic files exist and fingerprints
  them (:func:`dataset_fingerprint`);
- :func:`run_config` is the config of one model entry on one dataset under a budget (the
  priority of its parts is in ``spec.py``); the searches (``hyper.py``) and the runs both
  build their configs with it;
- :func:`calibrate_budgets` turns a budget in minutes into a step count per model
  (``calibration.py``);
- :func:`plan_runs` lists every run of the matrix, each a plain dict with its
  :func:`config_hash`: the config (less :data:`NON_HASHED_KEYS`), the config files' contents
  and the dataset's fingerprint. A run whose key and hash ``results.jsonl`` holds as finished
  is not run again (see ``store.py``).

The code is not part of the config hash: a fix in one model must not void a finished
matrix. Instead every results line records the code it came from, and the leaderboard says
which code versions its rows come from.
"""

import hashlib
import json
import os
import sys

from recbole_cdsr.benchmark.calibration import calibrated_steps
from recbole_cdsr.benchmark.spec import BenchmarkError, BenchmarkSpec
from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.utils import ensure_atomic_files
from recbole_cdsr.utils import sha256_file

#: config keys that say where files go or how much is printed: not part of the config hash
NON_HASHED_KEYS = ("checkpoint_dir", "results_dir", "show_progress", "state", "data_path")
ATOMIC_SUFFIXES = ("item", "user", "train.inter", "valid.inter", "test.inter")


def _sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


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
            present[suffix] = sha256_file(p)
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
            return "manifest:" + sha256_file(manifest)
        changed = sorted(set(listed) ^ set(present) | {k for k in present if listed.get(k, present[k]) != present[k]})
        print(f"WARNING dataset {dataset!r}: atomic files differ from the converter's manifest "
              f"({', '.join(f'{dataset}.{c}' for c in changed) or 'no file list in the manifest'}); the benchmark fingerprints "
              "their contents, and runs recorded against the converted files run again",
              file=stream or sys.stderr, flush=True)
    return "files:" + _sha256_bytes("\n".join(f"{k}:{v}" for k, v in present.items()).encode())


def config_hash(run, fingerprint):
    """16 hex digits naming what a run computes: model, dataset, seed, config (less
    :data:`NON_HASHED_KEYS`), the config files' contents and the data ``fingerprint``."""
    ident = {
        "model": run["model"],
        "dataset": run["dataset"],
        "seed": run["seed"],
        "config": {k: v for k, v in run["config"].items() if k not in NON_HASHED_KEYS},
        "config_files": [sha256_file(f) for f in run["config_files"]],
        "data": fingerprint,
    }
    return _sha256_bytes(json.dumps(ident, sort_keys=True, default=str).encode())[:16]


def run_config(spec, entry, budget, tuned=None, steps=None):
    """The config dict of model ``entry`` under ``budget`` (no seed): the file's ``config``,
    the budget (``steps``: the step count that a budget in minutes came to), protocols and
    threads, the model's ``overrides`` and own ``config``, then the ``tuned`` values."""
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
    out = {}
    for ds in spec.datasets:
        entry = spec.models[0]
        cfg = run_config(spec, entry, spec.budget)
        config = CDSRConfig(entry.model, ds, spec.config_files or None, cfg)
        try:
            ensure_atomic_files(config)
        except FileNotFoundError as e:
            raise BenchmarkError(f"dataset {ds!r}: {e}") from None
        out[ds] = dataset_fingerprint(cfg["data_path"], ds)
    return out


def calibrate_budgets(spec, fingerprints, tuned=None, budget=None, names=None, stream=None, measure=None):
    """``{(dataset, name): max_train_steps}`` for a budget in minutes (else empty).

    ``budget``: default the benchmark's; ``names``: only these models; ``measure``: the
    models that may be timed now (default: all), the others only when their measurement is
    cached (else they are left out)."""
    budget = budget or spec.budget
    if budget.get("minutes") is None:
        return {}
    tuned = tuned or {}
    out = {}
    for ds in spec.datasets:
        for entry in spec.models:
            if names is not None and entry.name not in names:
                continue
            cfg = run_config(spec, entry, budget, tuned.get((ds, entry.name)))
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
    ``check``: build each run's CDSRConfig, so a wrong key or value fails before anything
    runs; ``names``: plan only these models (default: all)."""
    tuned = tuned or {}
    steps = steps or {}
    runs = []
    for ds in spec.datasets:
        for entry in spec.models:
            if names is not None and entry.name not in names:
                continue
            for seed in spec.seeds:
                key = (ds, entry.name)
                cfg = run_config(spec, entry, spec.budget, tuned.get(key), steps.get(key))
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
                if check:
                    try:
                        CDSRConfig(entry.model, ds, spec.config_files or None, dict(cfg))
                    except ValueError as e:
                        raise BenchmarkError(f"{spec.path or spec.name}: run {run['run_key']}: {e}") from None
                run["config_hash"] = config_hash(run, fingerprints[ds])
                runs.append(run)
    return runs
