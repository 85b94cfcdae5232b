"""CDSRTrainer: RecBole's Trainer with the CDSR protocol and per-domain model selection.

Training is RecBole's usual loop (``calculate_loss`` per batch, the configured optimiser,
``clip_grad_norm``, AMP) with an optional cap on batches per epoch (``steps_per_epoch``).
Evaluation goes through :class:`~recbole_cdsr.evaluation.protocol.ProtocolEvaluator`.

Model selection (``model_selection``):

``per_domain`` (the LLMCDSR paper's way)
    one early stopper per domain on ``<domain>/<valid_metric>``; each domain's test figures
    come from that domain's best epoch (two checkpoints). Training stops when no domain has
    improved for ``stopping_step`` evaluations. With ``freeze_stopped_domains`` (default,
    as the public LLMCDSR code's early stoppers) a domain that has stopped keeps its best
    epoch while the other domain trains on; otherwise it may still take a later, better
    epoch. ``overall`` figures combine the instances of each domain ranked by that domain's
    checkpoint.
``joint``
    one checkpoint, best on ``overall/<valid_metric>`` (or on a full key such as
    ``B/ndcg@10``).

Checkpoints hold only tensors and plain values (the config as JSON-able values), so they
load with ``torch.load(weights_only=True)`` on any torch.

Resuming (``resumable: True``, the default of benchmark runs): after every epoch the trainer
writes the whole training state (weights, optimiser, early-stopping counters, the kept best
epochs, the history, every random stream: torch, numpy, Python, the training loader's
generator) to ``<checkpoint_dir>/<model>-<dataset>-seed<seed>-<id>.resume.pth`` (a temporary
name, then a rename), where ``<id>`` hashes the run's config. A run started again with the
same config continues after the last finished epoch and ends as the uninterrupted run would
have; the file is removed when training ends.
"""

import hashlib
import json
import math
import os
import random
from datetime import datetime, timezone
from time import time

import numpy as np
import torch
from torch.nn.utils.clip_grad import clip_grad_norm_

from recbole.trainer import Trainer
from recbole.utils import get_local_time, set_color

from recbole_cdsr.evaluation.protocol import OVERALL, ProtocolEvaluator
from recbole_cdsr.utils import to_jsonable


RESUME_FORMAT = 1
#: config keys that do not change what a run computes: left out of a resume state's identity
RESUME_NEUTRAL_KEYS = frozenset({"resumable", "show_progress", "checkpoint_dir", "results_dir", "state"})
#: trainer attributes a resume state restores as they were written
_RESUMED_ATTRIBUTES = ("best_states", "eval_history", "train_epoch_times", "eval_times", "train_loss_dict",
                       "steps_done", "resumed_at")


class CDSRTrainer(Trainer):
    #: fit can continue an interrupted run (``resumable``); a trainer holding training state of
    #: its own beyond the model, the optimiser and the training loader says False
    resume_supported = True

    def __init__(self, config, model):
        super().__init__(config, model)
        self.resumable = bool(config["resumable"])
        self.resume_file = None
        self.resume_id = None  # resume_identity(), set when fit opens the resume state
        self.resumed_at = []  # [{"epoch": first epoch of the continuing process, "at": iso time}]
        self.selection = config["model_selection"]
        self.freeze_stopped = bool(config["freeze_stopped_domains"])
        self.steps_per_epoch = config["steps_per_epoch"]
        self.raw_valid_metric = config["valid_metric"]
        self.protocol = None
        self.domain_names = None
        self.best_states = {}  # selection key -> {"state", "epoch", "score", "ranks", "file"}
        self.train_epoch_times = []
        self.eval_times = []
        self.eval_history = []  # [{"epoch", "result"}]
        self.last_ranks = None
        self.steps_done = 0
        self.report = None  # callable(line: str) for one line per evaluation (benchmark runs)
        self.train_loss_fn = None  # set by fit: the exact, fastest loss for the run's view
        self.loss_path = "calculate_loss"
        budget = config["train_time_budget"]
        self.time_budget_seconds = None if budget is None else float(budget) * 60.0
        self._deadline = None
        self.max_train_steps = config["max_train_steps"]
        self.stopped_by_budget = False
        self.stop_reason = None  # set by fit: early_stopping | epoch_cap | budget | interrupted
        self.epochs_done = 0
        stamp = get_local_time()
        self.run_stamp = stamp
        self.checkpoint_prefix = os.path.join(
            self.checkpoint_dir, f"{config['model']}-{config['dataset']}-seed{config['seed']}-{stamp}"
        )

    def _build_optimizer(self, **kwargs):
        """RecBole's optimiser, with Adam's betas from ``adam_betas`` when it is set (RecBole
        fixes torch's default (0.9, 0.999)). Adam and AdamW run torch's fused kernel when
        ``fast_layers`` is on: the same update, one pass over each tensor instead of a dozen
        (3.5x cheaper per step on C2DSR's 28 M parameters on one CPU thread; other rounding)."""
        betas = self.config["adam_betas"]
        learner = str(kwargs.get("learner", self.config["learner"])).lower()
        fused = self.config["fast_layers"] is not False
        if learner not in ("adam", "adamw") or (betas is None and not fused):
            return super()._build_optimizer(**kwargs)
        params = list(kwargs.pop("params", self.model.parameters()))
        cls = torch.optim.Adam if learner == "adam" else torch.optim.AdamW
        opts = dict(lr=kwargs.pop("learning_rate", self.config["learning_rate"]),
                    weight_decay=kwargs.pop("weight_decay", self.config["weight_decay"]) or 0.0,
                    betas=(0.9, 0.999) if betas is None else tuple(float(b) for b in betas))
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        if fused and tensors and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors):
            opts["fused"] = True
        return cls(params, **opts)

    # -- setup -----------------------------------------------------------------------
    def _setup(self, dataset):
        if self.protocol is None:
            self.domain_names = list(dataset.domain_names)
            self.protocol = ProtocolEvaluator(self.config, dataset.domain_mask())

    def selection_keys(self):
        """``{selection name: result key}``: ``{"A": "A/hit@10", "B": "B/hit@10"}`` or
        ``{"joint": "overall/hit@10"}``."""
        vm = str(self.raw_valid_metric)
        if "/" in vm:
            head, metric = vm.rsplit("/", 1)
            metric = metric.lower()
        else:
            head, metric = None, vm.lower()
        if self.selection == "per_domain":
            if head not in (None,) + tuple(self.domain_names) + (OVERALL,):
                raise ValueError(f"valid_metric {vm!r}: unknown domain {head!r}")
            return {d: f"{d}/{metric}" for d in self.domain_names}
        return {"joint": f"{head}/{metric}" if head else f"{OVERALL}/{metric}"}

    # -- training --------------------------------------------------------------------
    def budget_spent(self):
        """True once the training budget is spent: ``max_train_steps`` optimiser steps
        (deterministic) or ``train_time_budget`` minutes of wall-clock time (not)."""
        if self.max_train_steps is not None and self.steps_done >= self.max_train_steps:
            self.stopped_by_budget = True
        if self._deadline is not None and time() >= self._deadline:
            self.stopped_by_budget = True
        return self.stopped_by_budget

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        loss_func = loss_func or self.train_loss_fn or self.model.calculate_loss
        total_loss = None
        n_batches = len(train_data)
        if self.steps_per_epoch:
            n_batches = min(n_batches, self.steps_per_epoch)
        iter_data = train_data
        if show_progress:
            from tqdm import tqdm

            iter_data = tqdm(
                train_data, total=n_batches, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")
            )
        scaler = torch.amp.GradScaler(enabled=self.enable_scaler)
        for batch_idx, interaction in enumerate(iter_data):
            if batch_idx >= n_batches:
                break
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = tuple(x.item() for x in losses)
                total_loss = parts if total_loss is None else tuple(map(sum, zip(total_loss, parts)))
            else:
                loss = losses
                total_loss = loss.item() if total_loss is None else total_loss + loss.item()
            self._check_nan(loss)
            scaler.scale(loss).backward()
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            self.steps_done += 1
            if self.budget_spent():
                break
        if show_progress:
            iter_data.close()
        return total_loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._setup(train_data.dataset)
        from recbole_cdsr.trainer.whole_sequence import training_loss

        view = getattr(train_data.dataset, "train_view", "prefix")
        fused = self.config["fused_loss"] is not False
        self.train_loss_fn, self.loss_path = training_loss(self.model, view, fused=fused)
        if self.config["train_neg_sample_args"].get("dynamic", False):
            train_data.get_model(self.model)
        keys = self.selection_keys()
        best = {k: -math.inf for k in keys}
        stale = {k: 0 for k in keys}
        evaluated = False
        first = self.start_epoch
        if self.resumable:
            first, evaluated = self._open_resume_state(train_data, best, stale, evaluated)
        epoch_idx = first - 1
        if self.time_budget_seconds is not None and self._deadline is None:
            self._deadline = time() + self.time_budget_seconds
        self.stop_reason = "epoch_cap"
        try:
            for epoch_idx in range(first, self.epochs):
                done, evaluated_now = self._fit_epoch(train_data, valid_data, epoch_idx, keys, best, stale, saved,
                                                      verbose, show_progress, callback_fn)
                evaluated = evaluated or evaluated_now
                if done:
                    break
                if self.resume_file:
                    self._write_resume_state(train_data, epoch_idx, best, stale, evaluated)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self.logger.warning(
                f"interrupted in epoch {epoch_idx + 1}: training stops here; the test split is ranked with "
                "the best epochs so far and the results file says the run was interrupted (Ctrl-C again to abort)"
                + (f"; {self.resume_file} is kept: the same run started again continues after the last finished "
                   "epoch" if self.resume_file and os.path.exists(self.resume_file) else "")
            )
        if self.resume_file and self.stop_reason != "interrupted" and os.path.exists(self.resume_file):
            os.remove(self.resume_file)
        self.epochs_done = epoch_idx + 1 - self.start_epoch
        if not evaluated:
            # No validation happened: the final weights stand for every selection key.
            for k in keys:
                self._keep_best(k, epoch_idx, float("nan"), saved)
            return -1, None
        self.best_valid_score = sum(best.values()) / len(best)
        self.best_valid_result = self._combined_result(valid_data, "valid")
        return self.best_valid_score, self.best_valid_result

    def _fit_epoch(self, train_data, valid_data, epoch_idx, keys, best, stale, saved, verbose, show_progress,
                   callback_fn):
        """One epoch of training and (when due) validation; returns ``(stop, evaluated)`` and
        sets ``stop_reason`` when it stops."""
        t0 = time()
        loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
        t1 = time()
        self.train_epoch_times.append(t1 - t0)
        self.train_loss_dict[epoch_idx] = sum(loss) if isinstance(loss, tuple) else loss
        if verbose:
            self.logger.info(self._generate_train_loss_output(epoch_idx, t0, t1, loss))
        budget_spent = self.budget_spent()
        if budget_spent:
            self.stop_reason = "budget"
            if verbose:
                self.logger.info(f"training budget spent (epoch {epoch_idx}, {self.steps_done} steps): "
                                 "last evaluation, then stop")
        if self.eval_step <= 0 or valid_data is None or ((epoch_idx + 1) % self.eval_step and not budget_spent):
            return budget_spent, False
        v0 = time()
        result = self.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
        self.eval_times.append(time() - v0)
        self.eval_history.append({"epoch": epoch_idx, "result": dict(result)})
        improved = []
        for k, key in keys.items():
            if key not in result:
                raise ValueError(
                    f"valid_metric {self.raw_valid_metric!r} gives key {key!r}, not among "
                    f"the results ({', '.join(list(result)[:6])}, ...)"
                )
            if self.freeze_stopped and stale[k] >= self.stopping_step:
                continue  # this domain has early-stopped: its best epoch stays
            if result[key] > best[k]:
                best[k], stale[k] = result[key], 0
                self._keep_best(k, epoch_idx, result[key], saved)
                improved.append(k)
            else:
                stale[k] += 1
        stopped = all(v >= self.stopping_step for v in stale.values())
        done = len(self.train_epoch_times)
        per = (sum(self.train_epoch_times) + sum(self.eval_times)) / max(done, 1)
        left = max(self.epochs - epoch_idx - 1, 0) * per
        line = (f"epoch {epoch_idx + 1}/{self.epochs}: train {self.train_epoch_times[-1]:.1f} s, valid "
                + ", ".join(f"{key} {result[key]:.4f}" for key in keys.values())
                + (f" (best: {', '.join(improved)})" if improved else "")
                + f"; at most {left / 60:.1f} min to go")
        if verbose:
            self.logger.info(set_color("valid", "green") + f" {line} (early stopping: patience {self.stopping_step}"
                             f" evaluations) [eval {self.eval_times[-1]:.2f} s]")
            self.logger.info(set_color("valid result", "blue") + f": {_fmt(result)}")
        if self.report is not None:
            self.report(line)
        if callback_fn:
            callback_fn(epoch_idx, sum(result[key] for key in keys.values()) / len(keys))
        if budget_spent:
            return True, True
        if stopped:
            self.stop_reason = "early_stopping"
            if verbose:
                self.logger.info(
                    f"Finished training, no improvement for {self.stopping_step} evaluations "
                    f"(best epochs: { {k: v['epoch'] for k, v in self.best_states.items()} })"
                )
        return stopped, True

    # -- resuming ----------------------------------------------------------------------
    def resume_identity(self):
        """SHA-256 of what the run computes: the model and trainer classes and the config
        (less :data:`RESUME_NEUTRAL_KEYS`). A resume state is used only by a run with the same."""
        cfg = to_jsonable(self.config.final_config_dict)
        cfg = {k: v for k, v in cfg.items() if k not in RESUME_NEUTRAL_KEYS}
        blob = json.dumps({"model": type(self.model).__name__, "trainer": type(self).__name__, "config": cfg},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _open_resume_state(self, train_data, best, stale, evaluated):
        """Set ``resume_file``; when it holds a state, load it. Returns ``(first epoch to
        train, evaluated)``."""
        if not self.resume_supported:
            self.logger.warning(f"resumable: {type(self).__name__} keeps training state of its own; an "
                                "interrupted run of this model starts over from its first epoch")
            return self.start_epoch, evaluated
        c = self.config
        ident = self.resume_id = self.resume_identity()
        self.resume_file = os.path.join(
            self.checkpoint_dir, f"{c['model']}-{c['dataset']}-seed{c['seed']}-{ident[:12]}.resume.pth")
        if not os.path.exists(self.resume_file):
            return self.start_epoch, evaluated
        try:
            st = torch.load(self.resume_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is named, not trusted
            raise RuntimeError(f"resume state {self.resume_file} cannot be read (not a weights-only torch file: "
                               f"{type(e).__name__}); delete it to train this run from its first epoch") from e
        if st.get("format") != RESUME_FORMAT or st.get("identity") != ident:
            raise RuntimeError(f"resume state {self.resume_file} was written by another format or config; "
                               "delete it to train this run from its first epoch")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        best.update(st["best"])
        stale.update(st["stale"])
        for name in _RESUMED_ATTRIBUTES:
            setattr(self, name, st[name])
        _set_rng_state(st["rng"], train_data)
        self._load_own_resume_state(st.get("own") or {}, train_data)  # {}: written before trainers kept any
        first = st["epoch"] + 1
        self.resumed_at.append({"epoch": first, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        line = (f"continuing after epoch {first} of an interrupted run ({self.resume_file}: "
                f"{len(self.eval_history)} validations so far)")
        self.logger.warning(line)
        if self.report is not None:
            self.report(line)
        return first, st["evaluated"]

    def _own_resume_state(self):
        """Training state a subclass keeps beyond the model, its optimiser and the random
        streams (tensors and plain values): saved with every resume state."""
        return {}

    def _load_own_resume_state(self, st, train_data):
        """Restore what :meth:`_own_resume_state` saved (before the first epoch of a continued run)."""

    def _write_resume_state(self, train_data, epoch_idx, best, stale, evaluated):
        state = {
            "format": RESUME_FORMAT,
            "identity": self.resume_id,
            "epoch": epoch_idx,
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "best": {k: float(v) for k, v in best.items()},
            "stale": {k: int(v) for k, v in stale.items()},
            "evaluated": bool(evaluated),
            "best_states": {k: {"state": e["state"], "epoch": int(e["epoch"]), "score": float(e["score"]),
                                "file": e["file"]} for k, e in self.best_states.items()},
            "eval_history": [{"epoch": int(h["epoch"]), "result": {k: float(v) for k, v in h["result"].items()}}
                             for h in self.eval_history],
            "train_epoch_times": [float(t) for t in self.train_epoch_times],
            "eval_times": [float(t) for t in self.eval_times],
            "train_loss_dict": {int(k): (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v))
                                for k, v in self.train_loss_dict.items()},
            "steps_done": int(self.steps_done),
            "resumed_at": self.resumed_at,
            "rng": _rng_state(train_data),
            "own": self._own_resume_state(),
        }
        os.makedirs(os.path.dirname(self.resume_file) or ".", exist_ok=True)
        tmp = self.resume_file + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.resume_file)

    def _keep_best(self, key, epoch, score, saved):
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        entry = {"state": state, "epoch": epoch, "score": score, "file": None}
        if saved:
            path = f"{self.checkpoint_prefix}-{key}.pth"
            tmp = path + ".tmp"
            torch.save(
                {
                    "state_dict": state,
                    "epoch": epoch,
                    "selection_key": key,
                    "valid_score": score,
                    "config": to_jsonable(self.config.final_config_dict),
                },
                tmp,
            )
            os.replace(tmp, path)
            entry["file"] = path
        self.best_states[key] = entry

    # -- evaluation ------------------------------------------------------------------
    def _ranks_with_state(self, state, eval_data, show_progress):
        if state is not None:
            self.model.load_state_dict(state)
        return self.protocol.rank(self.model, eval_data, show_progress=show_progress)

    def _combined_ranks(self, eval_data, show_progress=False):
        """Ranks per protocol, each domain's instances ranked by its selected checkpoint."""
        if self.selection == "joint":
            return self._ranks_with_state(self.best_states["joint"]["state"], eval_data, show_progress)
        combined = None
        for d, name in enumerate(self.domain_names):
            ranks = self._ranks_with_state(self.best_states[name]["state"], eval_data, show_progress)
            sel = eval_data.target_domain == d
            if combined is None:
                combined = {p: r.clone() for p, r in ranks.items()}
            for p in ranks:
                combined[p][sel] = ranks[p][sel]
        return combined

    def _combined_result(self, eval_data, split):
        ranks = self._combined_ranks(eval_data)
        return self.protocol.results(ranks, eval_data.target_domain, self.domain_names)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """Result dict of ``eval_data`` under every configured protocol.

        ``load_best_model``: use the selected checkpoint(s) (per domain or joint);
        ``model_file``: a checkpoint written by this trainer; otherwise the current weights.
        """
        if not eval_data:
            return None
        self._setup(eval_data.dataset)
        if model_file:
            ckpt = torch.load(model_file, map_location=self.device, weights_only=True)
            ranks = self._ranks_with_state(ckpt["state_dict"], eval_data, show_progress)
        elif load_best_model and self.best_states:
            ranks = self._combined_ranks(eval_data, show_progress)
        else:
            ranks = self._ranks_with_state(None, eval_data, show_progress)
        self.last_ranks = ranks
        return self.protocol.results(ranks, eval_data.target_domain, self.domain_names)

    def selection_summary(self):
        return {
            "model_selection": self.selection,
            "selection_keys": self.selection_keys() if self.domain_names else None,
            "best_epochs": {k: v["epoch"] for k, v in self.best_states.items()},
            "best_valid_scores": {k: v["score"] for k, v in self.best_states.items()},
            "checkpoints": {k: v["file"] for k, v in self.best_states.items()},
        }


def _fmt(result, keys_per_line=None):
    return "  ".join(f"{k}: {v:.4f}" for k, v in result.items() if "@10" in k)


def _rng_state(train_data):
    """Every random stream a training epoch draws from, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "loader": train_data.generator.get_state() if getattr(train_data, "generator", None) is not None else None,
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st, train_data):
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    if st["loader"] is not None and getattr(train_data, "generator", None) is not None:
        train_data.generator.set_state(st["loader"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
