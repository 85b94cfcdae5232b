"""Leaderboards from ``results.jsonl``: Markdown, CSV and a PNG chart per dataset, a PNG
of every run's validation curves (``valid-curves-<dataset>.png``) and, when the benchmark
file names a ``readme``, the main tables between that file's markers.

For each dataset, protocol, domain and metric: mean and sample standard deviation
(``ddof=1``; one seed gives no std) over the seeds of each model; seconds per training
epoch, the training view, why the runs stopped and how many epochs they trained; the best mean marked; and a paired two-sided t-test of each
model against the best baseline of that column. The test pairs test instances: each
instance's metric (from its rank, stored per instance in every results line) is averaged
over the model's seeds, and the two models' per-instance values are compared with
``scipy.stats.ttest_rel``. Every model sees the same instances and, under the sampled
protocol, the same candidates, so the pairing is exact.

Only lines of the benchmark's current plan count: the latest ``ok`` line of each planned
run key with the planned config hash. Runs without such a line are listed as missing or
failed.
"""

import csv
import io
import math
import os
from collections import OrderedDict

import numpy as np

from recbole_cdsr.benchmark.spec import BenchmarkError
from recbole_cdsr.evaluation.protocol import instance_metric
from recbole_cdsr.utils import atomic_write_bytes

#: (result key metric, label) in the CSV and in the Markdown's second table
METRICS = (
    ("hit@1", "HR@1"), ("hit@5", "HR@5"), ("hit@10", "HR@10"),
    ("ndcg@5", "NDCG@5"), ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"),
)
MAIN_METRICS = ("hit@10", "ndcg@10")
DETAIL_METRICS = ("hit@1", "hit@5", "ndcg@5", "mrr@10")
LABEL = dict(METRICS)
ALPHA = 0.05


def select_lines(runs, lines):
    """``{dataset: {name: [line per seed]}}`` of the planned runs' latest ok lines, and
    ``{dataset: {name: [run_key, ...]}}`` of planned runs without one."""
    latest = {}
    for ln in lines:
        if ln.get("status") == "ok":
            latest[(ln["run_key"], ln["config_hash"])] = ln
    found, missing = OrderedDict(), OrderedDict()
    for r in runs:
        ln = latest.get((r["run_key"], r["config_hash"]))
        if ln is None:
            missing.setdefault(r["dataset"], OrderedDict()).setdefault(r["name"], []).append(r["run_key"])
        else:
            found.setdefault(r["dataset"], OrderedDict()).setdefault(r["name"], []).append(ln)
    return found, missing


def seconds_per_epoch(line):
    """Training seconds of one full epoch of a run: the median of its epoch times when every
    epoch ran whole (so that an epoch that a pause of a shared machine stretched does not
    count), else measured seconds per step x batches per epoch (a budget stopped the run
    within an epoch)."""
    t = line.get("timing") or {}
    steps, secs, per = t.get("train_steps"), t.get("train_epoch_seconds"), t.get("batches_per_epoch")
    if not steps or not secs or not per:
        return float("nan")
    if steps == per * len(secs):
        return float(np.median(secs))
    return sum(secs) / steps * per


def seconds_per_epoch_by_device(lines):
    """The s/epoch cell of a model: the mean of :func:`seconds_per_epoch` over its runs on each
    device of :func:`device_of`, in that order, joined with `` / `` (``-`` when no run has
    timings), so that runs on 2 threads and on 1 thread are not averaged together."""
    groups = OrderedDict()
    for ln in lines:
        groups.setdefault(device_of([ln]), []).append(seconds_per_epoch(ln))
    means = [_mean_std(v)[0] for v in groups.values()]
    if all(math.isnan(m) for m in means):
        return "-"
    return " / ".join("-" if math.isnan(m) else f"{m:.1f}" for m in means)


def _mean_std(values):
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return mean, std


def _instance_values(lines, protocol, domain, metric):
    """Per-instance metric of one model, averaged over its seeds ([n] array) or None."""
    per_seed = []
    for ln in lines:
        inst = ln.get("test_instances") or {}
        ranks = (inst.get("ranks") or {}).get(protocol)
        doms = inst.get("target_domain")
        if ranks is None or doms is None:
            return None
        sel = np.array([d == domain for d in doms])
        name, k = metric.split("@")
        per_seed.append(instance_metric(np.asarray(ranks)[sel], name, int(k)))
    return np.mean(per_seed, axis=0) if per_seed else None


def paired_p_value(x, y):
    """Two-sided paired t-test p-value (1.0 when the two are identical)."""
    from scipy import stats

    if x is None or y is None or len(x) != len(y) or len(x) < 2:
        return float("nan")
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_rel(x, y).pvalue)


def training_view(lines):
    """How a model's runs trained: ``sequence``/``prefix``, ``+ trimmed`` with dynamic
    padding (lines written before the ``speed`` record: their ``train_view``, padded)."""
    views = []
    for ln in lines:
        sp = ln.get("speed") or {}
        v = sp.get("train_view") or ln.get("train_view") or "?"
        v += " + trimmed" if sp.get("dynamic_padding") else ""
        if v not in views:
            views.append(v)
    return " / ".join(views)


def device_of(lines):
    """Where a model's runs trained: the GPU's name, or ``cpu (N threads)`` (``cpu, MODEL (N
    threads)`` where the run recorded its processor); several joined with `` / `` (lines
    without a device record: ``?``)."""
    out = []
    for ln in lines:
        dev = ln.get("device") or {}
        if dev.get("gpu"):
            d = dev["gpu"]
        elif dev.get("device"):
            d = dev["device"] + (f", {dev['cpu_model']}" if dev.get("cpu_model") else "")
            n = dev.get("cpu_threads")
            d += f" ({n} thread{'' if n == 1 else 's'})" if n else ""
        else:
            d = "?"
        if d not in out:
            out.append(d)
    return " / ".join(out)


#: stop reasons as the leaderboard shows them
STOP_SHORT = {"early_stopping": "early", "epoch_cap": "cap", "budget": "budget", "interrupted": "interrupted"}


def stop_of(line):
    """``(why, epochs)`` of one run: its stop reason (``early`` for early stopping, ``cap`` for
    the epoch cap, ``budget``, ``interrupted``) and the epochs it trained. Lines written before
    the reason was recorded: ``budget`` when the budget stopped them, ``cap`` when they trained
    their config's epochs, else ``early``."""
    t = line.get("timing") or {}
    n = t.get("epochs_trained") or len(t.get("train_epoch_seconds") or [])
    why = t.get("stop_reason")
    if why is None:
        cap = (line.get("config") or {}).get("epochs")
        why = "budget" if t.get("stopped_by_budget") else ("epoch_cap" if cap is not None and n >= cap else
                                                           "early_stopping")
    return STOP_SHORT.get(why, why), n


def stopping(lines):
    """``(why, epochs)`` of a model's runs: each stop reason of :func:`stop_of` with its count
    and the range of epochs trained."""
    reasons, epochs = OrderedDict(), []
    for ln in lines:
        why, n = stop_of(ln)
        reasons[why] = reasons.get(why, 0) + 1
        epochs.append(n)
    lo, hi = (min(epochs), max(epochs)) if epochs else (0, 0)
    return ", ".join(f"{w} x{c}" for w, c in reasons.items()), (f"{lo}" if lo == hi else f"{lo}-{hi}")


def domain_names(dataset, by_name):
    """Domain token -> the dataset's name for it: from the runs' results (``domains``), for
    runs recorded before results carried them the known releases' names, else the token."""
    for lines in by_name.values():
        for ln in lines:
            if ln.get("domains"):
                return dict(ln["domains"])
    from dataset_converters.llmcdsr_release import KNOWN_RELEASES

    return dict((KNOWN_RELEASES.get(dataset) or {}).get("domains") or {})


def _domain_legend(names):
    """``A = Food, B = Kitchen`` (empty when every name is its token)."""
    return ", ".join(f"{d} = {n}" for d, n in names.items() if n != d)


def _domains(by_name, split):
    """The domains with instances of ``split`` in the runs' results, in first-seen order."""
    domains = []
    for lines in by_name.values():
        for d in (lines[0].get("instances") or {}).get(split, {}):
            if d not in domains:
                domains.append(d)
    return domains


def summarize(spec, dataset, by_name):
    """Rows of one dataset's leaderboard: one dict per (protocol, domain, model, metric)."""
    names = [m.name for m in spec.models if m.name in by_name]
    labels = domain_names(dataset, by_name)
    domains = _domains(by_name, "test")
    runs = {}  # how each model's runs trained: the same in every protocol, domain and metric
    for n in names:
        stopped, epochs = stopping(by_name[n])
        runs[n] = dict(sec_per_epoch=_mean_std([seconds_per_epoch(ln) for ln in by_name[n]])[0],
                       sec_per_epoch_by_device=seconds_per_epoch_by_device(by_name[n]),
                       view=training_view(by_name[n]), device=device_of(by_name[n]),
                       stopped=stopped, epochs=epochs)
    rows = []
    for protocol in spec.protocols:
        for domain in domains:
            for metric, _ in METRICS:
                key = f"{domain}/{metric}"
                stats_ = {}
                for n in names:
                    vals = [((ln.get("test") or {}).get(protocol) or {}).get(key) for ln in by_name[n]]
                    stats_[n] = _mean_std(vals)
                base = [n for n in names if n in spec.baselines and not math.isnan(stats_[n][0])]
                best_base = max(base, key=lambda n: stats_[n][0]) if base else None
                valid = [n for n in names if not math.isnan(stats_[n][0])]
                best = max(valid, key=lambda n: stats_[n][0]) if valid else None
                ref = _instance_values(by_name[best_base], protocol, domain, metric) if best_base else None
                for n in names:
                    p = float("nan")
                    if best_base is not None and n != best_base:
                        p = paired_p_value(_instance_values(by_name[n], protocol, domain, metric), ref)
                    rows.append(OrderedDict(
                        dataset=dataset, protocol=protocol, domain=domain, domain_name=labels.get(domain, domain),
                        model=n, metric=metric,
                        mean=stats_[n][0], std=stats_[n][1], seeds=len(by_name[n]),
                        best=(n == best), best_baseline=best_base, p_value=p,
                        significant=(not math.isnan(p) and p < ALPHA), **runs[n],
                    ))
    return rows


def select_within(line, epochs):
    """The trainer's model selection replayed on a run's validation history, limited to its
    first ``epochs`` epochs: ``{selection name: history entry or None}`` (``A``, ``B`` under
    per-domain selection). Strict improvement of the selection key, and with
    ``freeze_stopped_domains`` a domain without improvement for ``stopping_step`` evaluations
    keeps its best, as in :class:`recbole_cdsr.trainer.trainer.CDSRTrainer`."""
    keys = (line.get("selection") or {}).get("selection_keys") or {}
    cfg = line.get("config") or {}
    patience = cfg.get("stopping_step") or 10
    freeze = cfg.get("freeze_stopped_domains", True)
    best = {k: -math.inf for k in keys}
    stale = {k: 0 for k in keys}
    chosen = {k: None for k in keys}
    for h in line.get("valid_history") or []:
        if h["epoch"] >= epochs:
            break
        for k, key in keys.items():
            if freeze and stale[k] >= patience:
                continue
            value = h["result"].get(key)
            if value is not None and value > best[k]:
                best[k], stale[k], chosen[k] = value, 0, h
            else:
                stale[k] += 1
    return chosen


def equal_epoch_rows(spec, dataset, by_name, epochs):
    """Rows of the equal-epoch comparison: per (protocol, domain, model, metric) the mean and
    std over seeds of the validation metric at the epoch :func:`select_within` selects within
    the first ``epochs`` epochs (the domain's own selection under per-domain selection, the
    joint one otherwise); ``epochs`` of a row: the range of its runs' validations in the window."""
    names = [m.name for m in spec.models if m.name in by_name]
    labels = domain_names(dataset, by_name)
    domains = _domains(by_name, "valid")
    chosen = {n: [select_within(ln, epochs) for ln in by_name[n]] for n in names}
    seen = {}
    for n in names:
        counts = [len([h for h in ln.get("valid_history") or [] if h["epoch"] < epochs]) for ln in by_name[n]]
        lo, hi = min(counts), max(counts)
        seen[n] = f"{lo}" if lo == hi else f"{lo}-{hi}"
    rows = []
    for i, protocol in enumerate(spec.protocols):
        prefix = "" if i == 0 else f"{protocol}:"
        for domain in domains:
            for metric in MAIN_METRICS:
                stats_ = {}
                for n in names:
                    vals = []
                    for pick in chosen[n]:
                        h = pick.get(domain) if domain in pick else next(iter(pick.values()), None)
                        vals.append(None if h is None else h["result"].get(f"{prefix}{domain}/{metric}"))
                    stats_[n] = _mean_std(vals)
                valid = [n for n in names if not math.isnan(stats_[n][0])]
                top = max(valid, key=lambda n: stats_[n][0]) if valid else None
                for n in names:
                    rows.append(OrderedDict(
                        dataset=dataset, protocol=protocol, domain=domain, domain_name=labels.get(domain, domain),
                        model=n, metric=metric, mean=stats_[n][0], std=stats_[n][1], seeds=len(by_name[n]),
                        best=(n == top), significant=False, epochs=seen[n],
                    ))
    return rows


def equal_epoch_section(spec, rows, heading="##"):
    """The equal-epoch comparison in Markdown: what it is, then a table per protocol."""
    n = spec.equal_epochs
    out = [f"{heading} Equal epochs: validation within the first {n} epochs\n",
           "Rows too expensive to train to early stopping on the machine at hand stop at an epoch cap (their "
           f"`stopped by` says `cap`). To compare every row at equal training, this replays each run's own model "
           f"selection (per domain, or joint where the run selects jointly) on its validation results of its "
           f"first {n} epochs and reports the selected "
           "epoch's validation metrics, mean ± std over seeds; **bold**: best mean. Validation, not test: the "
           "other runs rank the test instances only at the epochs they finally select. `validations`: "
           f"evaluations in the window (fewer than {n} when a run stopped before, or validates every few "
           "epochs).\n"]
    names, domains = _order(rows, "model"), _order(rows, "domain")
    idx = {(r["protocol"], r["domain"], r["model"], r["metric"]): r for r in rows}
    seeds = {r["model"]: r["seeds"] for r in rows}
    seen = {r["model"]: r["epochs"] for r in rows}
    for protocol in spec.protocols:
        head = ["model"] + [f"{d} {LABEL[m]}" for d in domains for m in MAIN_METRICS] + ["seeds", "validations"]
        out.append(f"{protocol.capitalize()} protocol ({PROTOCOL_TEXT[protocol]}), validation:\n")
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in names:
            cells = [name] + [_cell(idx[(protocol, d, name, m)]) for d in domains for m in MAIN_METRICS]
            table.append("| " + " | ".join(cells + [str(seeds[name]), seen[name]]) + " |")
        out.append("\n".join(table) + "\n")
    return "\n".join(out)


def _cell(row):
    if math.isnan(row["mean"]):
        return "-"
    s = f"{row['mean']:.4f}"
    if not math.isnan(row["std"]):
        s += f" ± {row['std']:.4f}"
    if row["best"]:
        s = f"**{s}**"
    if row["significant"]:
        s += " †"
    return s


def code_versions(by_name):
    """``{code fingerprint: [run_key, ...]}`` of a dataset's selected lines."""
    out = OrderedDict()
    for lines in by_name.values():
        for ln in lines:
            out.setdefault(ln.get("code") or "unrecorded", []).append(ln["run_key"])
    return out


PROTOCOL_TEXT = {
    "sampled": "target vs the same sampled negatives of its domain",
    "full": "target vs every item of its domain",
}


def _order(rows, field):
    out = []
    for r in rows:
        if r[field] not in out:
            out.append(r[field])
    return out


def _table(rows, protocol, metrics, timing):
    """One Markdown table of ``rows`` under ``protocol``: a line per model, a column per
    domain and metric (with seconds per epoch and seeds when ``timing``)."""
    names, domains = _order(rows, "model"), _order(rows, "domain")
    idx = {(r["protocol"], r["domain"], r["model"], r["metric"]): r for r in rows}
    facts = {r["model"]: [r["sec_per_epoch_by_device"], r["device"], str(r["seeds"]), r["view"],
                          r["stopped"], r["epochs"]] for r in rows}  # the same in every row of a model
    head = ["model"] + [f"{d} {LABEL[m]}" for d in domains for m in metrics] + (
        ["s/epoch", "device", "seeds", "training view", "stopped by", "epochs"] if timing else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        cells = [n] + [_cell(idx[(protocol, d, n, m)]) for d in domains for m in metrics]
        if timing:
            cells += facts[n]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def runs_section(by_name):
    """A Markdown table of every run in the leaderboard: why it stopped, epochs trained, the
    epoch each selection kept (counting from 1), wall time (data, stages, training and
    evaluation; for a run continued after an interruption, its last process's, with the
    seconds of all its epochs) and device."""
    out = ["| run | stopped by | epochs | selected epoch | wall time | device |", "|---|---|---|---|---|---|"]
    for lines in by_name.values():
        for ln in lines:
            why, epochs = stop_of(ln)
            best = ((ln.get("selection") or {}).get("best_epochs") or {})
            picked = ", ".join(f"{k} {e + 1}" for k, e in best.items() if e is not None) or "-"
            wall = ln.get("wall_seconds")
            wall = "-" if wall is None else f"{wall:,.0f} s"
            timing = ln.get("timing") or {}
            resumed = timing.get("resumed_at") or []
            if resumed and wall != "-":  # wall_seconds is the last process's; the epochs ran in several
                spent = sum(timing.get("train_epoch_seconds") or []) + sum(timing.get("valid_eval_seconds") or [])
                wall = (f"{wall} in the last of {len(resumed) + 1} processes (continued after epoch"
                        f"{'s' if len(resumed) > 1 else ''} {', '.join(str(r['epoch']) for r in resumed)}; "
                        f"training and validation in all: {spent:,.0f} s)")
            out.append(f"| {ln['run_key']} | {why} | {epochs} | {picked} | {wall} | {device_of([ln])} |")
    return "\n".join(out) + "\n"


def to_markdown(spec, dataset, rows, missing=None, code=None, equal=None, by_name=None):
    """The full leaderboard of one dataset; ``equal``: the rows of :func:`equal_epoch_rows`
    (the benchmark's ``equal_epochs``), written as a section of their own; ``by_name``: the
    runs' lines, listed one by one (:func:`runs_section`)."""
    out = io.StringIO()
    out.write(f"# Leaderboard: {dataset} (benchmark {spec.name})\n\n")
    out.write(
        f"Mean ± std over seeds {', '.join(map(str, spec.seeds))} (sample std). **Bold**: best mean "
        f"of the column. †: differs from the column's best baseline (paired two-sided t-test over "
        f"test instances, p < {ALPHA}). Baselines: {', '.join(spec.baselines) or 'none'}.\n"
    )
    legend = _domain_legend(OrderedDict((r["domain"], r.get("domain_name", r["domain"])) for r in rows))
    if legend:
        out.write(f"Domains: {legend}.\n")
    for protocol in spec.protocols:
        out.write(f"\n## {protocol} protocol ({PROTOCOL_TEXT[protocol]})\n\n")
        out.write(_table(rows, protocol, MAIN_METRICS, timing=True))
        out.write(f"\nMore cut-offs ({protocol}):\n\n")
        out.write(_table(rows, protocol, DETAIL_METRICS, timing=False))
    if equal:
        out.write("\n" + equal_epoch_section(spec, equal))
    if by_name:
        out.write("\n## Runs\n\n" + runs_section(by_name))
    if missing:
        out.write("\nRuns without a finished result (failed or not run yet): "
                  + ", ".join(k for keys in missing.values() for k in keys) + "\n")
    if code:
        if len(code) == 1:
            out.write(f"\nCode: every run from recbole-cdsr sources {next(iter(code))}.\n")
        else:
            out.write(f"\n**Warning: the runs come from {len(code)} versions of the code** "
                      "(delete the lines of the runs to redo from results.jsonl and run again): "
                      + "; ".join(f"{c}: {len(keys)} runs (e.g. {keys[0]})" for c, keys in code.items()) + "\n")
    return out.getvalue()


CSV_FIELDS = ["dataset", "protocol", "domain", "domain_name", "model", "metric", "mean", "std", "seeds", "best",
              "best_baseline", "p_value", "significant", "sec_per_epoch", "device", "view", "stopped", "epochs"]
#: the equal-epoch CSV: validation means within the window; ``epochs``: validations in it
EQUAL_FIELDS = ["dataset", "protocol", "domain", "domain_name", "model", "metric", "mean", "std", "seeds", "best",
                "epochs"]


def to_csv(rows, fields=CSV_FIELDS):
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, "")) for k in fields})
    return out.getvalue()


def _save_png(fig, path, layout=True):
    """Write a matplotlib figure to ``path`` as PNG (atomically) and close it (``layout``:
    lay it out with ``tight_layout`` first)."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_png(spec, dataset, rows, path):
    """Per-domain bars with error bars (std over seeds): one panel per protocol and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, domains, labels = [], [], {}
    for r in rows:
        if r["model"] not in names:
            names.append(r["model"])
        if r["domain"] not in domains:
            domains.append(r["domain"])
        labels[r["domain"]] = r.get("domain_name", r["domain"])
    idx = {(r["protocol"], r["domain"], r["model"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(len(spec.protocols), len(MAIN_METRICS), squeeze=False,
                             figsize=(max(6.0, 0.55 * len(names) * len(MAIN_METRICS) + 2), 3.2 * len(spec.protocols)))
    width = 0.8 / max(1, len(domains))
    x = np.arange(len(names))
    for i, protocol in enumerate(spec.protocols):
        for j, metric in enumerate(MAIN_METRICS):
            ax = axes[i][j]
            for k, d in enumerate(domains):
                rs = [idx[(protocol, d, n, metric)] for n in names]
                means = [0.0 if math.isnan(r["mean"]) else r["mean"] for r in rs]
                errs = [0.0 if math.isnan(r["std"]) else r["std"] for r in rs]
                ax.bar(x + (k - (len(domains) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
                       label=f"domain {d}" + (f" ({labels[d]})" if labels[d] != d else ""))
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{dataset}: {LABEL[metric]} ({protocol})", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    return _save_png(fig, path)


def valid_curves(spec, by_name, metric="hit@10"):
    """``{(protocol, domain): {(name, seed): [(epoch, value), ...]}}``: every run's
    validation ``<domain>/<metric>`` at each evaluation (``valid_history`` of its line)."""
    out = OrderedDict()
    for i, protocol in enumerate(spec.protocols):
        prefix = "" if i == 0 else f"{protocol}:"
        for name, lines in by_name.items():
            for ln in lines:
                for h in ln.get("valid_history") or []:
                    for key, value in h["result"].items():
                        head, _, m = key.rpartition("/")
                        if m != metric or not head.startswith(prefix) or (prefix == "" and ":" in head):
                            continue
                        dom = head[len(prefix):]
                        if dom == "overall":
                            continue
                        out.setdefault((protocol, dom), OrderedDict()).setdefault(
                            (name, ln["seed"]), []).append((h["epoch"], value))
    return out


def curve_bands(runs):
    """``[(epoch, mean, low, high), ...]``: per epoch, the mean, min and max over the runs
    (``{seed: [(epoch, value), ...]}``) that evaluated at that epoch."""
    at = {}
    for pts in runs.values():
        for epoch, value in pts:
            at.setdefault(epoch, []).append(value)
    return [(e, sum(v) / len(v), min(v), max(v)) for e, v in sorted(at.items())]


def plot_valid_curves(spec, dataset, by_name, path, metric="hit@10"):
    """Validation ``metric`` per epoch: one panel per protocol and domain, one line per model
    (the mean over its seeds at each epoch) with a band from the lowest to the highest seed,
    and one legend for the figure, beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = valid_curves(spec, by_name, metric)
    labels = domain_names(dataset, by_name)
    panels = list(curves)
    if not panels:
        return None
    domains = sorted({d for _, d in panels})
    fig, axes = plt.subplots(len(spec.protocols), len(domains), squeeze=False,
                             figsize=(6.0 * len(domains) + 3.2, 4.2 * len(spec.protocols)))
    from recbole_cdsr.registry import PLUGIN_MODELS

    # the plugin's rows thick in dark colours of their own, the others thin in tab20's
    plugin = [n for n in by_name if by_name[n] and by_name[n][0].get("model") in PLUGIN_MODELS]
    others = [n for n in by_name if n not in plugin]
    dark = ["#000000", "#7b1fa2", "#e65100", "#0d47a1", "#1b5e20", "#880e4f", "#5d4037", "#455a64"]
    light = [plt.get_cmap("tab20")(k) for k in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    styles = ["-", "--", ":"]

    def look(name):
        group, colours = (plugin, dark) if name in plugin else (others, light)
        k = group.index(name)
        return colours[k % len(colours)], styles[(k // len(colours)) % len(styles)], 2.2 if name in plugin else 1.2

    handles = {}
    for i, protocol in enumerate(spec.protocols):
        for j, dom in enumerate(domains):
            ax = axes[i][j]
            per_model = OrderedDict()
            for (name, seed), pts in (curves.get((protocol, dom)) or {}).items():
                per_model.setdefault(name, {})[seed] = pts
            for name, runs in per_model.items():
                colour, style, width = look(name)
                band = curve_bands(runs)
                xs = [b[0] + 1 for b in band]  # epochs counted from 1, as the logs and tables
                (line,) = ax.plot(xs, [b[1] for b in band], style, color=colour, lw=width)
                if len(runs) > 1:
                    ax.fill_between(xs, [b[2] for b in band], [b[3] for b in band], color=colour, alpha=0.12, lw=0)
                handles.setdefault(name, line)
            named = f"{dom}: {labels[dom]}" if labels.get(dom, dom) != dom else dom
            ax.set_title(f"{dataset}, validation {LABEL.get(metric, metric)}, domain {named} ({protocol})", fontsize=10)
            ax.set_xlabel("epoch", fontsize=9)
            ax.grid(alpha=0.3)
    seeds = sorted({seed for c in curves.values() for _, seed in c})
    right = 1.0 - 3.0 / fig.get_figwidth()  # the panels end here; the legend stands beside them
    fig.tight_layout(rect=(0, 0, right, 1))
    order = [n for n in by_name if n in handles]
    fig.legend([handles[n] for n in order], order, loc="center left", bbox_to_anchor=(right + 0.005, 0.5),
               fontsize=9, frameon=False, title=f"mean over seeds {', '.join(map(str, seeds))}\n(band: lowest to highest;\nthick: the plugin's rows)",
               title_fontsize=8)
    return _save_png(fig, path, layout=False)


def write_leaderboards(spec, runs, lines, out_dir=None):
    """Write ``leaderboard-<dataset>.{md,csv,png}`` and ``valid-curves-<dataset>.png`` into
    ``out_dir`` (default: the output folder), with ``equal_epochs`` also
    ``leaderboard-<dataset>-equal-epochs.csv``, and the main tables into the benchmark's
    ``readme`` when it names one; return ``{dataset: {kind: path}}`` (kinds ``markdown``,
    ``csv``, ``png``, ``curves``, ``equal_csv``, ``readme`` when written; ``rows``: the summary
    rows, ``equal_rows``: the equal-epoch rows)."""
    out_dir = out_dir or spec.output_dir
    found, missing = select_lines(runs, lines)
    reports = {}
    for ds in spec.datasets:
        by_name = found.get(ds)
        if not by_name:
            continue
        rows = summarize(spec, ds, by_name)
        base = os.path.join(out_dir, f"leaderboard-{ds}")
        equal = equal_epoch_rows(spec, ds, by_name, spec.equal_epochs) if spec.equal_epochs else None
        md = to_markdown(spec, ds, rows, missing.get(ds), code_versions(by_name), equal, by_name)
        atomic_write_bytes(base + ".md", md.encode())
        atomic_write_bytes(base + ".csv", to_csv(rows).encode())
        plot_png(spec, ds, rows, base + ".png")
        curves = os.path.join(out_dir, f"valid-curves-{ds}.png")
        plot_valid_curves(spec, ds, by_name, curves)
        reports[ds] = {"markdown": base + ".md", "csv": base + ".csv", "png": base + ".png", "rows": rows,
                       "curves": curves}
        if equal:
            atomic_write_bytes(base + "-equal-epochs.csv", to_csv(equal, EQUAL_FIELDS).encode())
            reports[ds].update(equal_csv=base + "-equal-epochs.csv", equal_rows=equal)
        if spec.readme:
            link = os.path.relpath(base + ".md", os.path.dirname(spec.readme)).replace(os.sep, "/")
            update_readme(spec.readme, ds, readme_block(spec, ds, rows, by_name, link, equal), name=spec.name)
            reports[ds]["readme"] = spec.readme
    return reports


# -- the README's copy --------------------------------------------------------------------
def readme_markers(dataset, name=None):
    """The README lines between which a dataset's tables go: ``leaderboard:<dataset>``, or
    with ``name`` (a benchmark's name) ``leaderboard:<name>/<dataset>``, so that two
    benchmarks of one dataset can each have their place in one README."""
    tag = dataset if name is None else f"{name}/{dataset}"
    return f"<!-- leaderboard:{tag}:start -->", f"<!-- leaderboard:{tag}:end -->"


def readme_block(spec, dataset, rows, by_name, markdown_link, equal=None):
    """The main tables (HR@10, NDCG@10 per domain, each protocol) with a caption each, for the
    README; ``markdown_link``: the full leaderboard's path relative to the README; ``equal``:
    the equal-epoch rows, whose section follows the main tables."""
    n_test = OrderedDict()
    for lines in by_name.values():
        for d, n in ((lines[0].get("instances") or {}).get("test") or {}).items():
            n_test.setdefault(d, n)
    negs = sorted({(ln.get("candidates") or {}).get("eval_neg_num") for lines in by_name.values() for ln in lines}
                  - {None})
    seeds = ", ".join(map(str, spec.seeds))
    labels = domain_names(dataset, by_name)
    out = []
    legend = _domain_legend(OrderedDict((d, labels.get(d, d)) for d in n_test))
    if legend:
        out.append(f"Domains: {legend}.\n")
    for protocol in spec.protocols:
        what = PROTOCOL_TEXT[protocol]
        if protocol == "sampled" and len(negs) == 1:
            what = f"target vs the same {negs[0]} sampled negatives of its domain"
        out.append(
            f"{protocol.capitalize()} protocol ({what}), mean ± std over seeds {seeds}; **bold**: best mean of "
            f"the column; †: differs from the column's best baseline (paired t-test over test instances, "
            f"p < {ALPHA}); test instances: " + ", ".join(f"{d} {n}" for d, n in n_test.items()) + ":\n"
        )
        out.append(_table(rows, protocol, MAIN_METRICS, timing=True))
    if equal:
        out.append(equal_epoch_section(spec, equal, heading="####"))
    out.append(f"More cut-offs, failed or missing runs and code versions: [{os.path.basename(markdown_link)}]"
               f"({markdown_link}).\n")
    return "\n".join(out)


def update_readme(path, dataset, block, name=None):
    """Put ``block`` between the markers of benchmark ``name``'s dataset in the README at
    ``path`` (``leaderboard:<name>/<dataset>`` when the README has them, else
    ``leaderboard:<dataset>``; atomically; the file is left alone when nothing changes).
    Returns whether it changed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BenchmarkError(f"readme {path}: cannot read it ({e.strerror}); fix the benchmark's readme key") from None
    start, end = readme_markers(dataset, name)
    if name is None or text.find(start) < 0:
        start, end = readme_markers(dataset)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        named = "" if name is None else " (or '{}' ... '{}')".format(*readme_markers(dataset, name))
        raise BenchmarkError(
            f"readme {path}: no '{start}' ... '{end}' markers{named} (in that order); put them, each on its "
            "own line, where this leaderboard goes"
        )
    new = text[: i + len(start)] + "\n" + block + text[j:]
    if new == text:
        return False
    atomic_write_bytes(path, new.encode("utf-8"))
    return True
