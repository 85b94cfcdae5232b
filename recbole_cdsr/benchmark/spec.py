"""Benchmark files: which datasets, models, seeds, protocols and budget to run.

A benchmark file is YAML::

    name: food-kitchen                # names the benchmark in results.jsonl
    datasets: [food-kitchen]
    models:                           # plugin models and RecBole's sequential models
      - LLMCDSR
      - SASRec
      - {model: SASRec, name: SASRec-BPR, config: {loss_type: BPR}}   # a variant
    seeds: [2020, 2021, 2022]
    protocols: [sampled, full]        # the first selects models (eval_protocol)
    budget: {epochs: 20, steps: ~, minutes: ~, steps_per_epoch: ~, calibration_steps: 5}
    config: {stopping_step: 3}        # config keys for every run
    config_files: []                  # YAML files for every run (relative to this file)
    overrides: {SASRec: {hidden_dropout_prob: 0.3}}   # config keys per model name
    baselines: ~                      # names compared by the significance test (default:
                                      # every RecBole model in the list)
    threads: ~                        # torch CPU threads per run (Ray: CPUs per task)
    output_dir: ~                     # default saved/benchmarks/<name> (from the working
                                      # directory); a relative path is relative to this file
    save_checkpoints: true
    equal_epochs: ~                   # N: the leaderboard adds an equal-epoch comparison, every
                                      # run's validation after its first N epochs (per-domain
                                      # selection within them), for rows capped at N epochs
    readme: ~                         # a Markdown file (relative to this file) whose
                                      # <!-- leaderboard:<name>/<dataset>:start/end --> markers
                                      # (or, without those, <!-- leaderboard:<dataset>:... -->)
                                      # get the main tables after every invocation
    isolate_runs: true                # local executor: each run in a fresh child process, so a
                                      # run the OS kills (out of memory) is recorded as failed
                                      # and every run starts with the memory of a new process
    jobs: 1                           # local executor: runs side by side (each its own child
                                      # process; with threads: 1 on a 2-core machine, jobs: 2)
    hyper:                            # optional search before the runs (see hyper.py)
      models: [SASRec]
      algo: random                    # exhaustive | random | bayes (RecBole's HyperTuning)
      max_evals: 8
      early_stop: 10                  # HyperTuning stops after this many trials without a gain
      budget: {epochs: 5}             # default: the benchmark's budget
      seed: ~                         # default: the first seed

The budget caps each run at ``epochs`` (of ``steps_per_epoch`` batches when given), at
``steps`` optimiser steps, and at ``minutes`` of training: minutes are turned into a step
count per model by timing ``calibration_steps`` steps of that model once (``calibration.py``,
cached in the output folder), so a run stops after a fixed number of steps and the same seed
gives the same numbers; early stopping on validation still applies within the budget.

Values that become config keys (``config``, ``overrides``, a model's ``config``,
``protocols``, ``threads``, the budget's ``epochs``, ``steps`` and ``steps_per_epoch``, the
search's ``seed``) are checked by the config's own checker
(:func:`recbole_cdsr.config.check_value`); the rest of the file is checked here.

Priority of config keys within one run, lowest first: config_files < ``config`` < budget
and protocols < ``overrides`` < the model entry's own ``config`` < tuned hyper-parameters
(a key of the search space takes the value the search found); the seed comes from
``seeds``.
"""

import os

import yaml

from recbole_cdsr import registry
from recbole_cdsr.config import ConfigError, check_value, warn_unknown_keys

TOP_KEYS = {
    "name", "datasets", "models", "seeds", "protocols", "budget", "config", "config_files",
    "overrides", "baselines", "threads", "output_dir", "save_checkpoints", "hyper", "isolate_runs",
    "readme", "jobs", "equal_epochs",
}
#: budget key -> config key (``minutes`` becomes ``max_train_steps`` through calibration)
BUDGET_KEYS = {"epochs": "epochs", "steps": "max_train_steps", "steps_per_epoch": "steps_per_epoch",
               "minutes": None, "calibration_steps": None}
HYPER_KEYS = {"models", "algo", "max_evals", "budget", "seed", "early_stop"}
HYPER_ALGOS = ("exhaustive", "random", "bayes")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be run; the message names the file and the key."""


class ModelEntry:
    """One row of the leaderboard: a model class name, its label and its own config."""

    def __init__(self, model, name=None, config=None):
        self.model = model
        self.name = name or model
        self.config = dict(config or {})

    def __repr__(self):
        return f"ModelEntry({self.name!r}, model={self.model!r})"


class BenchmarkSpec:
    def __init__(self, raw, path=None):
        self.path = os.path.abspath(path) if path else None
        self.base_dir = os.path.dirname(self.path) if path else os.getcwd()
        self._where = path or "benchmark"
        if not isinstance(raw, dict):
            self._fail(None, f"must be a mapping of keys, got {type(raw).__name__}")
        unknown = sorted(set(raw) - TOP_KEYS)
        if unknown:
            self._fail(unknown[0], f"unknown key; valid keys: {', '.join(sorted(TOP_KEYS))}")
        self.name = self._str(raw, "name", required=True)
        self.datasets = self._str_list(raw, "datasets")
        self.seeds = self._int_list(raw, "seeds")
        protocols = raw.get("protocols", ["sampled", "full"])
        protocols = [protocols] if isinstance(protocols, str) else protocols
        self._check_value("protocols", "eval_protocol", protocols)
        self.protocols = list(protocols)
        self.models = self._models(raw.get("models"))
        self.budget = self._budget(raw.get("budget"), "budget", required=True)
        self.config = self._mapping(raw, "config")
        self.overrides = self._mapping(raw, "overrides")
        names = {m.name for m in self.models}
        for k, v in self.overrides.items():
            if k not in names:
                self._fail("overrides", f"{k!r} is not a model name of this benchmark ({', '.join(sorted(names))})")
            if not isinstance(v, dict):
                self._fail(f"overrides.{k}", f"must be a mapping of config keys, got {v!r}")
            for key, value in v.items():
                self._check_key(f"overrides.{k}.{key}", key, value)
        self.config_files = []
        files = raw.get("config_files") or []
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            self._fail("config_files", f"must be a list of paths, got {files!r}")
        for f in files:
            full = f if os.path.isabs(f) else os.path.join(self.base_dir, f)
            if not os.path.isfile(full):
                self._fail("config_files", f"{f} does not exist (looked for {full})")
            self.config_files.append(os.path.abspath(full))
        baselines = raw.get("baselines")
        if baselines is None:
            self.baselines = [m.name for m in self.models if m.model not in registry.PLUGIN_MODELS]
        else:
            if not isinstance(baselines, list) or any(b not in names for b in baselines):
                self._fail("baselines", f"must list model names of this benchmark, got {baselines!r}")
            self.baselines = list(baselines)
        threads = raw.get("threads")
        self._check_value("threads", "num_threads", threads)
        self.threads = threads
        out = raw.get("output_dir")
        if out is None:
            out = os.path.join("saved", "benchmarks", self.name)
        elif not isinstance(out, str) or not out:
            self._fail("output_dir", f"must be a path, got {out!r}")
        elif not os.path.isabs(out):
            out = os.path.join(self.base_dir, out)  # like config_files: relative to this file
        self.output_dir = os.path.abspath(out)
        save = raw.get("save_checkpoints", True)
        if not isinstance(save, bool):
            self._fail("save_checkpoints", f"must be true or false, got {save!r}")
        self.save_checkpoints = save
        isolate = raw.get("isolate_runs", True)
        if not isinstance(isolate, bool):
            self._fail("isolate_runs", f"must be true or false, got {isolate!r}")
        self.isolate_runs = isolate
        jobs = raw.get("jobs", 1)
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            self._fail("jobs", f"must be a positive integer (runs side by side), got {jobs!r}")
        if jobs > 1 and not isolate:
            self._fail("jobs", "runs side by side need isolate_runs: true (each run its own process)")
        self.jobs = jobs
        readme = raw.get("readme")
        if readme is not None:
            if not isinstance(readme, str) or not readme:
                self._fail("readme", f"must be a path to a Markdown file or ~, got {readme!r}")
            readme = os.path.abspath(os.path.join(self.base_dir, readme))
            if not os.path.isfile(readme):
                self._fail("readme", f"{readme} does not exist")
        self.readme = readme
        equal = raw.get("equal_epochs")
        if equal is not None and (not isinstance(equal, int) or isinstance(equal, bool) or equal < 1):
            self._fail("equal_epochs", f"must be a positive number of epochs or ~, got {equal!r}")
        self.equal_epochs = equal
        self.hyper = self._hyper(raw.get("hyper"), names)
        for key, value in self.config.items():
            self._check_key(f"config.{key}", key, value)

    # -- parsing helpers -------------------------------------------------------------
    def _fail(self, key, msg):
        where = f"{self._where}: " + (f"key '{key}' " if key else "")
        raise BenchmarkError(where + msg)

    def _str(self, raw, key, required=False):
        v = raw.get(key)
        if v is None and required:
            self._fail(key, "is missing")
        if v is not None and (not isinstance(v, str) or not v.strip() or "/" in v):
            self._fail(key, f"must be a non-empty name without '/', got {v!r}")
        return v

    def _str_list(self, raw, key):
        v = raw.get(key)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            self._fail(key, f"must be a non-empty list of names, got {v!r}")
        if len(set(v)) != len(v):
            self._fail(key, f"lists a name twice: {v!r}")
        return list(v)

    def _int_list(self, raw, key):
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            self._fail(key, f"must be a non-empty list of integers, got {v!r}")
        if len(set(v)) != len(v):
            self._fail(key, f"lists a value twice: {v!r}")
        return list(v)

    def _mapping(self, raw, key):
        v = raw.get(key) or {}
        if not isinstance(v, dict):
            self._fail(key, f"must be a mapping, got {v!r}")
        return dict(v)

    def _check_value(self, where, key, value):
        """``value`` of the benchmark's ``where`` becomes config key ``key``: check it as the
        config does (:func:`recbole_cdsr.config.check_value`)."""
        msg = check_value(key, value)
        if msg:
            self._fail(where, msg)

    def _check_key(self, where, key, value):
        self._check_value(where, key, value)
        warn_unknown_keys([key], f"{self._where}: {where}")

    def _models(self, v):
        if not isinstance(v, list) or not v:
            self._fail("models", f"must be a non-empty list, got {v!r}")
        out = []
        for i, m in enumerate(v):
            if isinstance(m, str):
                out.append(ModelEntry(m))
            elif isinstance(m, dict):
                bad = sorted(set(m) - {"model", "name", "config"})
                if bad or not isinstance(m.get("model"), str):
                    self._fail(f"models[{i}]", "needs 'model' (a model name) and optionally 'name' and 'config'")
                cfg = m.get("config") or {}
                if not isinstance(cfg, dict):
                    self._fail(f"models[{i}].config", f"must be a mapping, got {cfg!r}")
                name = m.get("name")
                if name is not None and (not isinstance(name, str) or not name or "/" in name):
                    self._fail(f"models[{i}].name", f"must be a name without '/', got {name!r}")
                for key, value in cfg.items():
                    self._check_key(f"models[{i}].config.{key}", key, value)
                out.append(ModelEntry(m["model"], name, cfg))
            else:
                self._fail(f"models[{i}]", f"must be a model name or a mapping, got {m!r}")
        names = [m.name for m in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            self._fail("models", f"name {dup[0]!r} appears twice: give variants a distinct 'name'")
        for m in out:
            try:
                registry.get_model(m.model)
            except ValueError as e:
                self._fail("models", str(e))
        return out

    def _budget(self, v, key, required):
        if v is None:
            if required:
                self._fail(key, "is missing: give epochs and/or minutes per run, e.g. {epochs: 20}")
            return None
        if not isinstance(v, dict) or not v:
            self._fail(key, f"must be a mapping with epochs, minutes, steps_per_epoch; got {v!r}")
        bad = sorted(set(v) - set(BUDGET_KEYS))
        if bad:
            self._fail(f"{key}.{bad[0]}", f"unknown; valid: {', '.join(BUDGET_KEYS)}")
        out = {}
        for k in ("epochs", "steps", "steps_per_epoch"):
            x = v.get(k)
            if x is not None:
                self._check_value(f"{key}.{k}", BUDGET_KEYS[k], x)
            out[k] = x
        x = v.get("calibration_steps")
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 1):
            self._fail(f"{key}.calibration_steps", f"must be a positive integer, got {x!r}")
        out["calibration_steps"] = x
        x = v.get("minutes")
        if x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool) or x <= 0):
            self._fail(f"{key}.minutes", f"must be a positive number of minutes, got {x!r}")
        out["minutes"] = x
        if out["epochs"] is None and out["minutes"] is None and out["steps"] is None:
            self._fail(key, "needs epochs, steps or minutes")
        if out["calibration_steps"] is None:
            out["calibration_steps"] = 5
        return out

    def _hyper(self, v, names):
        if v is None:
            return None
        if not isinstance(v, dict):
            self._fail("hyper", f"must be a mapping, got {v!r}")
        bad = sorted(set(v) - HYPER_KEYS)
        if bad:
            self._fail(f"hyper.{bad[0]}", f"unknown; valid: {', '.join(sorted(HYPER_KEYS))}")
        models = v.get("models")
        if not isinstance(models, list) or not models or any(m not in names for m in models):
            self._fail("hyper.models", f"must list model names of this benchmark, got {models!r}")
        algo = v.get("algo", "random")
        if algo not in HYPER_ALGOS:
            self._fail("hyper.algo", f"must be one of {', '.join(HYPER_ALGOS)}, got {algo!r}")
        max_evals = v.get("max_evals", 10)
        if not isinstance(max_evals, int) or isinstance(max_evals, bool) or max_evals < 1:
            self._fail("hyper.max_evals", f"must be a positive integer, got {max_evals!r}")
        early_stop = v.get("early_stop", 10)
        if not isinstance(early_stop, int) or isinstance(early_stop, bool) or early_stop < 1:
            self._fail("hyper.early_stop", f"must be a positive integer, got {early_stop!r}")
        seed = v.get("seed")
        seed = self.seeds[0] if seed is None else seed
        self._check_value("hyper.seed", "seed", seed)
        budget = self._budget(v.get("budget"), "hyper.budget", required=False) or dict(self.budget)
        return {"models": list(models), "algo": algo, "max_evals": max_evals, "early_stop": early_stop,
                "seed": seed, "budget": budget}

    # -- use ---------------------------------------------------------------------------
    def entry(self, name):
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @staticmethod
    def budget_config(budget, calibrated_steps=None):
        """Config keys of a budget: ``epochs``, ``max_train_steps``, ``steps_per_epoch``.

        ``calibrated_steps``: the step count that ``minutes`` came to for this model; the
        smaller of it and ``steps`` applies."""
        out = {}
        for k, ck in BUDGET_KEYS.items():
            if ck and budget.get(k) is not None:
                out[ck] = budget[k]
        if calibrated_steps is not None:
            out["max_train_steps"] = min(calibrated_steps, out.get("max_train_steps", calibrated_steps))
        if budget.get("epochs") is None:
            out["epochs"] = 10 ** 6  # the step budget alone ends training
        return out


def load_benchmark(path):
    """Read and check a benchmark file (one clear error naming the file and key)."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"benchmark file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise BenchmarkError(f"{path}: not valid YAML ({e})") from None
    try:
        return BenchmarkSpec(raw, path)
    except ConfigError as e:
        raise BenchmarkError(f"{path}: {e}") from None
