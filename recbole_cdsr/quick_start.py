"""One-call runs, shaped like RecBole's ``run_recbole``.

``run_recbole_cdsr(model, dataset, config_file_list, config_dict)`` converts the dataset if
needed, trains with the model's trainer, evaluates under the CDSR protocol, and writes a
results file (JSON: full config, seed, versions, device, per-domain valid/test metrics per
protocol, model selection, epoch and evaluation times).
"""

import logging
import os
import platform
from contextlib import contextmanager
from logging import getLogger
from time import time

import torch

from recbole.utils import init_logger, init_seed

from recbole_cdsr.config import CDSRConfig
from recbole_cdsr.data.atomic import domain_labels
from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset, ensure_atomic_files
from recbole_cdsr.model.layers import fast_layers
from recbole_cdsr.registry import get_after_training, get_stages, get_trainer
from recbole_cdsr.utils import (
    atomic_write_json,
    disable_anomaly_detection,
    to_jsonable,
    tune_cpu_allocator,
)

RESULTS_FORMAT_VERSION = 1


def package_versions():
    import numpy
    import pandas
    import recbole

    import recbole_cdsr

    out = {
        "python": platform.python_version(),
        "recbole_cdsr": recbole_cdsr.__version__,
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }
    # installed versions, whether or not this process imported them (results must not
    # depend on what else ran in the process)
    from importlib import metadata

    for dist in ("transformers", "sentence-transformers", "higher", "hyperopt", "scipy"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def cpu_model(cpuinfo=None):
    """The processor's name: the first ``model name`` of ``/proc/cpuinfo`` (``cpuinfo``: that
    file's text), else what :func:`platform.processor` says, else ``None``. Runs on
    different CPUs of one platform string differ in speed, so the results record it."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for ln in cpuinfo.splitlines():
        key, sep, value = ln.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or None


def device_info(config):
    dev = config["device"]
    info = {"device": str(dev), "platform": platform.platform(), "cpu_model": cpu_model(),
            "cpu_threads": torch.get_num_threads()}
    if getattr(dev, "type", str(dev)) == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def split_by_protocol(result, protocols):
    """``{"sampled": {"A/hit@10": ...}, "full": {...}}`` from a flat result dict."""
    if result is None:
        return None
    out = {p: {} for p in protocols}
    for k, v in result.items():
        if ":" in k:
            p, rest = k.split(":", 1)
            out[p][rest] = v
        else:
            out[protocols[0]][k] = v
    return out


def run_recbole_cdsr(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    cmd_args=None,
    saved=True,
    verbose=True,
    evaluate_test=True,
    save_results=None,
    report=None,
):
    """Train and evaluate one model on one cross-domain dataset.

    Args:
        saved: write checkpoints (and, unless ``save_results`` says otherwise, the results file).
        evaluate_test: rank the test split; ``False`` (hyper-parameter search) never touches
            it and returns ``test_result=None``.
        save_results: write the results file (default: ``saved``).
        report: a callable that receives one line of text per validation (epoch, training
            time, validation scores, time left), also when ``verbose`` is False; in a quiet
            run it also receives the stages' progress lines (:func:`stage_lines_to`).

    Returns:
        dict: ``best_valid_score``, ``best_valid_result``, ``test_result`` (flat RecBole
        style: ``A/hit@10``, ..., ``full:A/hit@10``), ``results`` (what the results file
        holds) and ``results_file``.
    """
    t_start = time()
    config = CDSRConfig(model, dataset, config_file_list, config_dict, cmd_args)
    threads_before = torch.get_num_threads()
    if config["num_threads"]:
        torch.set_num_threads(config["num_threads"])
    try:
        return _run(config, t_start, saved, verbose, evaluate_test,
                    saved if save_results is None else save_results, report)
    finally:
        torch.set_num_threads(threads_before)


class _ReportHandler(logging.Handler):
    """Hands each INFO line of recbole_cdsr's loggers to ``report``; warnings and errors go on
    to the root logger's handlers (the run's console and log file), as without it."""

    def __init__(self, report):
        super().__init__(logging.INFO)
        self.report = report

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            for h in logging.getLogger().handlers:
                if record.levelno >= h.level:
                    h.handle(record)
        else:
            self.report(record.getMessage())


@contextmanager
def stage_lines_to(report):
    """While a run's stages are prepared in a quiet run (``verbose=False``, the root logger at
    WARNING) that has a ``report`` callback, e.g. a benchmark run: the stages' progress lines
    (INFO of the ``recbole_cdsr`` loggers: embedding parts, generation, stage-2 epochs with
    their time left) go to ``report``, so an hour of stages is not silent. ``None``: as is."""
    if report is None:
        yield
        return
    pkg = logging.getLogger("recbole_cdsr")
    handler = _ReportHandler(report)
    level, propagate = pkg.level, pkg.propagate
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)
        pkg.propagate = propagate


@contextmanager
def stages_lock(config):
    """Held while a run prepares its model's stages, and while it runs its after-training
    stage (URLLM's LLM): runs side by side on one dataset (the benchmark's ``jobs: N``, Ray,
    two commands) build its cached stages once and never write one cached file together.
    The others wait, saying so, and then find the stages cached. One lock per dataset
    folder, the operating system's, so a run that dies lets go (``dataset_converters.filelock``)."""
    from dataset_converters.filelock import FileLock

    path = os.path.join(config["data_path"], f".{config['dataset']}.stages.lock")
    log = logging.getLogger(__name__)

    def busy(holder, waited):
        log.info(
            f"{config['model']}: waiting for another run building the stages of {config['dataset']} "
            f"({holder or 'a process'}; lock {path}), {waited / 60:.0f} min so far")

    lock = FileLock(path)
    try:
        lock.acquire_waiting(on_busy=busy)
    except OSError as e:  # a read-only dataset folder: its stages can only be reused, not built
        log.warning(
            f"{config['model']}: cannot create the stages lock {path} ({e}); going on without it")
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run(config, t_start, saved, verbose, evaluate_test, save_results, report=None):
    if config["cpu_allocator_tuning"] and getattr(config["device"], "type", "") == "cpu":
        tune_cpu_allocator()
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    if not verbose:
        logger.setLevel(logging.WARNING)
    ensure_atomic_files(config)  # a missing dataset is reported before anything else
    logger.info(config if config["show_config"] else config.summary())

    t0 = time()
    stages = None
    prepare = get_stages(config["model"])
    if prepare is not None:
        logger.info(f"{config['model']}: preparing its stages (cached next to the dataset; reused when unchanged)")
        with stage_lines_to(report if not verbose else None), stages_lock(config):
            updates, stages = prepare(config)
        for k, v in updates.items():
            config[k] = v
    stage_seconds = time() - t0
    t0 = time()
    ds, train_data, valid_data, test_data, net = build_data_and_model(config)
    logger.info(ds)
    data_seconds = time() - t0
    logger.info(net if config["show_config"] else
                f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters")
    trainer = get_trainer(config["model"])(config, net)
    trainer.report = report

    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], verbose=verbose
    )
    after = get_after_training(config["model"])
    after_record = None
    if after and evaluate_test:  # URLLM's LLM stage: cached files next to the dataset, so under the lock too
        with stage_lines_to(report if not verbose else None), stages_lock(config):
            after_record = after(config, trainer, train_data, valid_data, test_data)
    t_test = time()
    test_result, test_ranks = None, None
    if evaluate_test:
        test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=config["show_progress"])
        test_ranks = {p: r.tolist() for p, r in trainer.last_ranks.items()}
        logger.info("test result: " + "  ".join(f"{k}: {v:.4f}" for k, v in test_result.items() if k.endswith("@10")))
    test_seconds = time() - t_test

    protocols = list(config["eval_protocol"])
    labels = domain_labels(ds.dataset_path, config["dataset"])
    results = {
        "format_version": RESULTS_FORMAT_VERSION,
        "model": config["model"],
        "dataset": config["dataset"],
        # domain token -> the dataset's name for it (the converter's manifest)
        "domains": {d: labels.get(d, d) for d in ds.domain_names},
        "seed": config["seed"],
        "train_view": ds.train_view,
        "speed": {
            "fast_layers": bool(config["fast_layers"]),
            "dynamic_padding": bool(getattr(train_data, "dynamic_padding", False)),
            "dynamic_padding_setting": config["dynamic_padding"],
            "train_view": ds.train_view,
            "loss_path": trainer.loss_path,
            "length_group_batches": config["length_group_batches"],
        },
        "protocols": protocols,
        "candidates": {
            "eval_neg_num": config["eval_neg_num"],
            "eval_candidate_seed": config["eval_candidate_seed"],
            "eval_exclude_history": config["eval_exclude_history"],
        },
        "selection": trainer.selection_summary(),
        "valid": split_by_protocol(best_valid_result, protocols),
        "test": split_by_protocol(test_result, protocols),
        "instances": {
            "valid": {n: int((valid_data.target_domain == d).sum()) for d, n in enumerate(ds.domain_names)},
            "test": {n: int((test_data.target_domain == d).sum()) for d, n in enumerate(ds.domain_names)},
        },
        # per test instance (rows of the test file, in order): the target's domain and the
        # target's rank under each protocol (for paired significance tests across models)
        "test_instances": {
            "target_domain": [ds.domain_names[d] for d in test_data.target_domain.tolist()],
            "ranks": test_ranks,
        },
        "num_parameters": int(sum(p.numel() for p in net.parameters())),
        "stages": stages,
        "after_training": after_record,
        "timing": {
            "stage_seconds": stage_seconds,
            "data_seconds": data_seconds,
            "train_epoch_seconds": trainer.train_epoch_times,
            "valid_eval_seconds": trainer.eval_times,
            "test_eval_seconds": test_seconds,
            "total_seconds": time() - t_start,
            "train_steps": trainer.steps_done,
            "batches_per_epoch": len(train_data),
            "stopped_by_budget": trainer.stopped_by_budget,
            "stop_reason": trainer.stop_reason,
            "epochs_trained": trainer.epochs_done,
            # processes that continued an interrupted run: [{"epoch": first epoch, "at": time}]
            "resumed_at": trainer.resumed_at,
        },
        "valid_history": trainer.eval_history,
        "versions": package_versions(),
        "device": device_info(config),
        "config": to_jsonable(config.final_config_dict),
    }
    results_file = None
    if save_results:
        name = f"{config['model']}-{config['dataset']}-seed{config['seed']}-{trainer.run_stamp}.json"
        results_file = os.path.join(config["results_dir"], name)
        n = 1
        while os.path.exists(results_file):  # two runs in the same second
            n += 1
            results_file = os.path.join(config["results_dir"], name[:-5] + f"-{n}.json")
        atomic_write_json(results_file, results)
        logger.info(f"results written to {results_file}")
    return {
        "best_valid_score": best_valid_score,
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "results": results,
        "results_file": results_file,
        "config": config,
    }


def format_results_table(results, metrics=("hit", "ndcg", "mrr"), topk=(1, 3, 5, 10)):
    """Plain-text table of test metrics: one row per protocol and domain."""
    test = results["test"] or {}
    cols = [f"{m}@{k}" for m in metrics for k in topk]
    lines = [f"{'protocol':<8} {'domain':<8} " + " ".join(f"{c:>8}" for c in cols)]
    for p, res in test.items():
        doms = []
        for k in res:
            d = k.split("/")[0]
            if d not in doms:
                doms.append(d)
        for d in doms:
            vals = [res.get(f"{d}/{c}") for c in cols]
            lines.append(
                f"{p:<8} {d:<8} " + " ".join(f"{v:>8.4f}" if v is not None else f"{'-':>8}" for v in vals)
            )
    return "\n".join(lines)


def build_data_and_model(config):
    """``(dataset, train_data, valid_data, test_data, model)`` of ``config``, seeded and set
    up as a run builds them (the model on the config's device, ``fast_layers`` applied)."""
    init_seed(config["seed"], config["reproducibility"])
    ds = create_cdsr_dataset(config, config.model_class)
    train_data, valid_data, test_data = cdsr_data_preparation(config, ds)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset).to(config["device"])
    if config["fast_layers"]:
        fast_layers(model)
    disable_anomaly_detection()
    return ds, train_data, valid_data, test_data, model


def load_data_and_model(model_file):
    """Rebuild config, data and model from a checkpoint written by ``CDSRTrainer``.

    Returns ``(config, model, dataset, train_data, valid_data, test_data)`` like RecBole's
    function of the same name. The checkpoint holds only tensors and plain values, so it is
    read with ``torch.load(weights_only=True)``.
    """
    ckpt = torch.load(model_file, map_location="cpu", weights_only=True)
    stored = ckpt["config"]
    keep = {k: v for k, v in stored.items() if k not in ("device", "model", "dataset", "MODEL_TYPE",
                                                          "MODEL_INPUT_TYPE", "eval_type", "data_path",
                                                          "train_neg_sample_args", "valid_neg_sample_args",
                                                          "test_neg_sample_args", "single_spec", "local_rank")}
    keep["data_path"] = os.path.dirname(os.path.normpath(stored["data_path"]))
    config = CDSRConfig(stored["model"], stored["dataset"], config_dict=keep)
    ds, train_data, valid_data, test_data, model = build_data_and_model(config)
    model.load_state_dict(ckpt["state_dict"])
    return config, model, ds, train_data, valid_data, test_data
