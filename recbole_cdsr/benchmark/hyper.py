"""Hyper-parameter search with RecBole's ``HyperTuning``, on the validation split only.

The search space of a model is ``properties/hyper/<Model>.hyper`` in RecBole's format (one
``name type values`` line per key: ``choice [..]``, ``uniform lo,hi``, ``quniform lo,hi,q``,
``loguniform lo,hi``). Each trial trains under the CDSR protocol with the test split never
ranked (``evaluate_test=False``); the objective is the trainer's best validation score
(with per-domain selection: the mean of the domains' best ``valid_metric``).

A search's result is a cached artefact (:mod:`recbole_cdsr.cache`),
``<output_dir>/hyper/<dataset>-<name>-<tag>.json``, whose identity is what it was built from
(space file hash, base config with its budget, config files, algorithm, evaluations, early
stop, seed, data fingerprint); it holds every trial's validation result, and the benchmark
then runs the model with the best parameters. hyperopt's own randomness is seeded (``HYPEROPT_FMIN_SEED``), so the
same inputs give the same trials.

Space files are read here (:func:`read_space_file`), not by RecBole, whose reader
runs the values of ``choice`` lines as Python code: a shared space file is data and never runs.
"""

import os
import sys

from recbole_cdsr.benchmark.plan import calibrate_budgets, run_config
from recbole_cdsr.benchmark.spec import BenchmarkError
from recbole_cdsr.cache import Artefact
from recbole_cdsr.utils import properties_dir, sha256_file, to_jsonable

HYPER_FORMAT_VERSION = 2  # 2: a cached artefact with its manifest


def space_file(model):
    path = os.path.join(properties_dir(), "hyper", f"{model}.hyper")
    if not os.path.isfile(path):
        raise BenchmarkError(
            f"no search space for {model}: write {path} (RecBole's .hyper format, e.g. "
            "'learning_rate choice [0.001,0.0005]')"
        )
    return path


SPACE_TYPES = {"choice": 0, "uniform": 2, "quniform": 3, "loguniform": 2}


def read_space_file(path):
    """A ``.hyper`` file as HyperTuning's ``params_dict`` (``{type: {name: values}}``).

    ``choice`` values are a Python literal list (``[0.001, 0.0005]``, ``['a', 'b']``), read
    with ``ast.literal_eval``; the ranges are comma-separated numbers. A malformed line is one
    error naming the file and line.
    """
    import ast

    out = {}
    seen = set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read the search space ({e.strerror})") from None
    for no, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(None, 2)
        where = f"{path}, line {no}"
        if len(parts) < 3:
            raise BenchmarkError(f"{where}: expected 'name type values', got {text!r}")
        name, kind, values = parts
        if kind not in SPACE_TYPES:
            raise BenchmarkError(f"{where}: type {kind!r} is not one of {', '.join(SPACE_TYPES)}")
        if name in seen:
            raise BenchmarkError(f"{where}: {name!r} appears twice")
        seen.add(name)
        if kind == "choice":
            try:
                parsed = ast.literal_eval(values)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                parsed = None
            if not isinstance(parsed, (list, tuple)) or not parsed:
                raise BenchmarkError(f"{where}: choice values must be a non-empty list literal such as "
                                     f"[0.001, 0.0005], got {values!r}")
            parsed = list(parsed)
        else:
            try:
                parsed = [float(x) for x in values.replace(" ", "").split(",")]
            except ValueError:
                parsed = None
            if parsed is None or len(parsed) != SPACE_TYPES[kind]:
                raise BenchmarkError(f"{where}: {kind} needs {SPACE_TYPES[kind]} comma-separated numbers, got {values!r}")
            if parsed[0] >= parsed[1]:
                raise BenchmarkError(f"{where}: {kind} low {parsed[0]} must be below high {parsed[1]}")
        out.setdefault(kind, {})[name] = parsed
    if not out:
        raise BenchmarkError(f"{path}: no search-space lines ('name type values')")
    return out


def tune_model(model, dataset, base_config, config_files=None, params_file=None, algo="random",
               max_evals=10, early_stop=10, seed=2020, cache_dir=None, extra_identity=None, stream=None):
    """Search ``model``'s space on ``dataset``; return the record (``best_params`` ...).

    ``base_config`` holds every fixed key (budget included); trial values override it.
    With ``cache_dir``, a record built from the same inputs is returned without running, and
    a new one is written there (``<dataset>-<model>-<tag>.json``).
    """
    from recbole.trainer import HyperTuning

    from recbole_cdsr.quick_start import run_recbole_cdsr

    stream = stream or sys.stdout
    params_file = params_file or space_file(model)
    identity = {
        "format_version": HYPER_FORMAT_VERSION, "model": model, "dataset": dataset,
        "space_sha256": sha256_file(params_file), "base_config": to_jsonable(base_config),
        "config_files": [sha256_file(f) for f in (config_files or [])], "algo": algo,
        "max_evals": max_evals, "early_stop": early_stop, "seed": seed, "extra": extra_identity,
    }
    art = Artefact(cache_dir, f"{dataset}-{model}", identity, suffix=".json") if cache_dir else None
    if art is not None and art.cached(f"hyper-parameter search of {model} on {dataset}"):
        print(f"hyper {model} on {dataset}: cached ({art.path})", file=stream, flush=True)
        return art.load_json()
    trials = []

    def objective(params, _files):
        cfg = dict(base_config)
        cfg.update(params)
        cfg["seed"] = seed
        out = run_recbole_cdsr(model, dataset, config_files or None, cfg, saved=False,
                               save_results=False, verbose=False, evaluate_test=False)
        trials.append({"params": to_jsonable(params), "best_valid_score": out["best_valid_score"],
                       "best_valid_result": to_jsonable(out["best_valid_result"])})
        print(f"hyper {model} on {dataset}: trial {len(trials)} {to_jsonable(params)} -> "
              f"valid {out['best_valid_score']:.4f}", file=stream, flush=True)
        return {"model": model, "best_valid_score": out["best_valid_score"], "valid_score_bigger": True,
                "best_valid_result": out["best_valid_result"], "test_result": None}

    old = os.environ.get("HYPEROPT_FMIN_SEED")
    os.environ["HYPEROPT_FMIN_SEED"] = str(seed)
    try:
        tuner = HyperTuning(objective, params_dict=read_space_file(params_file), algo=algo, max_evals=max_evals,
                            early_stop=early_stop)
        _quiet_print(tuner.run)
    finally:
        if old is None:
            os.environ.pop("HYPEROPT_FMIN_SEED", None)
        else:
            os.environ["HYPEROPT_FMIN_SEED"] = old
    best = max(trials, key=lambda t: t["best_valid_score"])
    rec = {
        "identity": identity, "params_file": params_file,
        "best_params": best["params"], "best_valid_score": best["best_valid_score"],
        "trials": trials, "note": "selected on the validation split; the test split was never ranked",
    }
    if art is not None:
        art.write_json(rec)
    return rec


def _quiet_print(fn):
    """HyperTuning prints every new best (its test result is None here); keep stdout clean."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def tune_benchmark(spec, fingerprints, stream=None, names=None):
    """Run (or reuse) every search of the benchmark (``names``: only those of these models);
    ``{(dataset, name): best_params}``."""
    h = spec.hyper
    models = [n for n in h["models"] if names is None or n in names]
    steps = calibrate_budgets(spec, fingerprints, budget=h["budget"], names=models, stream=stream)
    out = {}
    for ds in spec.datasets:
        for name in models:
            entry = spec.entry(name)
            base = run_config(spec, entry, h["budget"], steps=steps.get((ds, name)))
            base.pop("seed", None)
            rec = tune_model(
                entry.model, ds, base, spec.config_files, algo=h["algo"], max_evals=h["max_evals"],
                early_stop=h["early_stop"], seed=h["seed"], cache_dir=os.path.join(spec.output_dir, "hyper"),
                extra_identity={"data": fingerprints[ds]}, stream=stream,
            )
            out[(ds, name)] = rec["best_params"]
    return out
