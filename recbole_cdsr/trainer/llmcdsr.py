"""LLMCDSRTrainer: the bilevel meta step (with ``higher``) and the main backbone step.

Every training batch (``meta_interval`` = 1 in the paper):

1. Meta step (every ``meta_interval`` batches, skipped in modes ``no_meta``,
   ``random_recall`` and ``backbone_only``): a functional copy ("shadow") of the backbone
   takes one differentiable inner step (``meta_inner_optimizer``, ``meta_inner_lr``) on the
   loss of [original batch + augmented batch of ``aug_batch_size`` single-domain users built
   by the recall network], one mean over all their target positions; the plain BCE loss of
   the updated shadow on ``meta_batch_size`` overlapped users is back-propagated through
   the inner step into the poolers, which Adam (``meta_lr``, betas ``adam_betas``) updates.
   As in the public code, the augmented sequences' input embeddings enter the inner loss
   from outside the shadow: the inner step gets no gradient into the item table from them
   (``meta_inner_aug_input_grad: True`` gives it one). The backbone's own weights are not
   changed by this step.
2. Main step: the backbone trains on [original batch + augmented batch] with the current
   recall network (no gradient into the poolers), one mean over all target positions.

Inner optimiser (``meta_inner_optimizer``):

``adam`` (default)
    the shadow's Adam starts from the *backbone's own Adam state* (moments and step count of
    the optimiser that trains the backbone, which steps every batch), so the inner step is
    the step the backbone's optimiser would take.
``adam_fresh``
    the public code's behaviour: its inner optimiser loads the state of an Adam that never
    steps, so every inner step is a first Adam step (bias-corrected moments of a single
    gradient, ``lr * g / (|g| + eps)``).
``sgd``
    a plain gradient step.

The main step reuses the original batch's gradient from the meta step (same weights, same
batch; ``meta_reuse_orig_grad: False`` recomputes it with fresh dropout, as the public code).
"""

import math

import higher
import torch

from recbole.data.dataloader import TrainDataLoader

from recbole_cdsr.trainer.trainer import CDSRTrainer


def _add_grads(grads, extra):
    out = []
    for g, e in zip(grads, extra):
        out.append(e if g is None else (g if e is None else g + e))
    return out


class _Cycle:
    """The batches of ``loader`` without end, pass after pass (a RecBole loader reshuffles with
    its own generator at the start of each pass). Its position (the generator's state when
    the current pass began, the batches taken since) can be saved and restored, so a
    continued run draws the batches the uninterrupted run would have drawn."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None
        self.start = None
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self.start = self.loader.generator.get_state()
                self._it = iter(self.loader)
                self.taken = 0
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.taken += 1
            return batch

    def state(self):
        return None if self.start is None else {"start": self.start.clone(), "taken": int(self.taken)}

    def restore(self, st):
        if st is None:
            return
        self.loader.generator.set_state(st["start"])
        self._it, self.start, self.taken = iter(self.loader), st["start"].clone(), 0
        for _ in range(st["taken"]):  # the batches of this pass the interrupted run had taken
            next(self._it)
            self.taken += 1


class FlatDifferentiableAdam(higher.optim.DifferentiableAdam):
    """higher's differentiable Adam, with its arithmetic done once over the concatenation of
    a group's weights instead of once per weight tensor (the backbone's Transformer has 35):
    the same element-wise formulas in the same order, so the same values and gradients, at
    ~10 autograd nodes instead of ~350 forward and as many again in the meta backward.
    Falls back to higher's per-tensor update when a group is not uniform (amsgrad, a
    missing gradient, or weights at different step counts)."""

    def _update(self, grouped_grads, **kwargs):
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            states = [self.state[group_idx][i] for i in range(len(group["params"]))]
            fresh = all(len(st) == 0 for st in states)
            uniform = fresh or (
                all("exp_avg" in st and "exp_avg_sq" in st and "step" in st for st in states)
                and len({float(st["step"]) for st in states}) == 1
            )
            if group["amsgrad"] or any(g is None for g in grads) or not uniform:
                return super()._update(grouped_grads, **kwargs)
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            params = group["params"]
            states = [self.state[group_idx][i] for i in range(len(params))]
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"]
            p = torch.cat([x.reshape(-1) for x in params])
            g = torch.cat([x.reshape(-1) for x in grads])
            if states[0]:
                exp_avg = torch.cat([st["exp_avg"].reshape(-1) for st in states])
                exp_avg_sq = torch.cat([st["exp_avg_sq"].reshape(-1) for st in states])
                step = states[0]["step"] + 1
            else:
                exp_avg, exp_avg_sq, step = torch.zeros_like(p), torch.zeros_like(p), 1
            if wd != 0:
                g = g + (wd * p)
            exp_avg = (exp_avg * beta1) + (1 - beta1) * g
            exp_avg_sq = (exp_avg_sq * beta2) + (1 - beta2) * g * g
            higher.optim._maybe_mask(exp_avg_sq, exp_avg_sq == 0.0)
            denom = exp_avg_sq.sqrt() + (1.0 * group["eps"])
            step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            new = p + (-step_size) * (exp_avg / denom)
            sizes = [x.numel() for x in params]
            for i, (x, piece, m, v) in enumerate(zip(params, new.split(sizes), exp_avg.split(sizes), exp_avg_sq.split(sizes))):
                params[i] = piece.view(x.shape)
                states[i].update(step=step, exp_avg=m.view(x.shape), exp_avg_sq=v.view(x.shape))


class LLMCDSRTrainer(CDSRTrainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.mode = model.mode
        self.meta_interval = config["meta_interval"]
        self.inner_kind = config["meta_inner_optimizer"]  # adam | adam_fresh | sgd (config schema)
        self.inner_aug_input_grad = bool(config["meta_inner_aug_input_grad"])
        self.reuse_orig_grad = bool(config["meta_reuse_orig_grad"])
        self.inner_lr = config["meta_inner_lr"]
        betas = tuple(config["adam_betas"])
        # fused: one kernel over each weight instead of ~10 element-wise passes; on CPU the
        # backbone's 2.4M-weight step takes 2 ms instead of 18 ms (same update rule)
        self.optimizer = torch.optim.Adam(
            model.backbone.parameters(), lr=config["learning_rate"], betas=betas, weight_decay=config["weight_decay"],
            fused=config["device"].type in ("cpu", "cuda"),
        )
        self.meta_optimizer = torch.optim.Adam(model.poolers.parameters(), lr=config["meta_lr"], betas=betas)
        self.aug_batch_size = config["aug_batch_size"]
        self.meta_batch_size = config["meta_batch_size"]
        self.use_aug = self.mode != "backbone_only"
        self.use_meta = self.mode == "full"
        self._aug_iter = self._meta_iter = None
        self._fnet = None
        self.meta_steps = 0

    # -- loaders of single-domain (augmentation) and overlapped (meta) users ----------------
    def _make_loaders(self, train_data):
        ds = train_data.dataset
        seq = ds.inter_feat[ds.item_id_list_field]
        dom = torch.as_tensor(ds.item_domain)[seq]  # [N, L], -1 at padding
        has = [((dom == d) & (seq > 0)).any(1) for d in range(len(ds.domain_names))]
        overlapped = has[0] & has[1]
        if self.use_aug:
            uid = ds.inter_feat[ds.uid_field]
            with_pseudo = self.model.pseudo_index[uid.to(self.model.pseudo_index.device)][:, 0].cpu() > 0
            single = ~overlapped & with_pseudo
            rows = torch.nonzero(single).view(-1)
            if len(rows) == 0:
                raise ValueError("no single-domain training user has pseudo items: nothing to augment")
            self._aug_iter = _Cycle(self._loader(train_data, rows, self.aug_batch_size))
        if self.use_meta:
            rows = torch.nonzero(overlapped).view(-1)
            if len(rows) == 0:
                raise ValueError("the meta step needs overlapped training users; there are none")
            self._meta_iter = _Cycle(self._loader(train_data, rows, self.meta_batch_size))

    # -- resuming: the meta optimiser, the step counter and where the cycling loaders are ----
    def _own_resume_state(self):
        return {
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_steps": int(self.meta_steps),
            "last_meta_loss": getattr(self, "last_meta_loss", None),
            "aug": None if self._aug_iter is None else self._aug_iter.state(),
            "meta": None if self._meta_iter is None else self._meta_iter.state(),
        }

    def _load_own_resume_state(self, st, train_data):
        if "meta_optimizer" not in st:
            raise RuntimeError(f"resume state {self.resume_file} holds no LLMCDSR training state (written by an "
                               "older version); delete it to train this run from its first epoch")
        self.meta_optimizer.load_state_dict(st["meta_optimizer"])
        self.meta_steps = st["meta_steps"]
        if st["last_meta_loss"] is not None:
            self.last_meta_loss = st["last_meta_loss"]
        if self.use_aug or self.use_meta:
            self._make_loaders(train_data)
            if self._aug_iter is not None:
                self._aug_iter.restore(st["aug"])
            if self._meta_iter is not None:
                self._meta_iter.restore(st["meta"])

    def _loader(self, train_data, rows, batch_size):
        sub = train_data.dataset.copy(train_data.dataset.inter_feat[rows])
        cfg = train_data.config
        # RecBole's loader fixes its batch size from train_batch_size when it is built
        # (set_batch_size afterwards does not change what it yields)
        saved = cfg["train_batch_size"]
        cfg["train_batch_size"] = batch_size
        try:
            loader = TrainDataLoader(cfg, sub, None, shuffle=True)
        finally:
            cfg["train_batch_size"] = saved
        return loader

    # -- steps ---------------------------------------------------------------------------
    def meta_step(self, batch, aug_batch, meta_batch):
        """One bilevel update of the poolers.

        The inner loss is (S_orig(theta) + S_aug(theta, poolers)) / (n_orig + n_aug), sums of
        the BCE over the target positions of the original and the augmented rows. Only
        S_aug depends on the poolers, so only its gradient is taken with a graph
        (``create_graph``); the gradient of S_orig is added as a constant through higher's
        ``grad_callback``. The item embedding table (most of the backbone's weights) is
        updated outside higher's optimiser by :meth:`_inner_embedding_step`: the same
        update, computed only for the rows the augmented and the meta loss read (the meta
        loss's negatives are drawn first, so those rows are known). The meta loss and the
        meta-gradient are exactly those of differentiating the whole inner loss with higher
        over every weight, at a fraction of the cost.

        Returns ``(S_orig, n_orig, grad of S_orig)`` at the current backbone weights, which
        the main step reuses (same weights, same batch).
        """
        model = self.model
        override = {"lr": [self.inner_lr]}
        ei = self._emb_index
        inner = self._inner_optimizer()
        self.meta_optimizer.zero_grad()
        # grad of S_orig at the current weights (the shadow starts from them); no graph
        weights = list(model.backbone.parameters())
        s_orig, n_orig = model.orig_loss(batch)
        g_orig = list(torch.autograd.grad(s_orig, weights, allow_unused=True))
        # the shadow's initial weights are the backbone's own tensors, never written to:
        # the meta-gradient is taken for the poolers only, so nothing flows into them
        fnet = self._shadow()
        diffopt = self._diff_optimizer(inner, fnet, override)
        params = list(fnet.fast_params)
        s_aug, n_aug, touched = model.aug_loss(aug_batch, net=fnet, with_grad=True, return_items=True,
                                               detach_inputs=not self.inner_aug_input_grad)
        count = (n_orig + n_aug).clamp(min=1)
        g_orig_mean = [None if g is None else g / count for g in g_orig]
        kept = {}

        def callback(grads):
            grads = _add_grads(grads, g_orig_mean)
            kept["emb"] = grads[ei]  # the inner optimiser does not hold this weight
            return grads

        diffopt.step(s_aug / count, grad_callback=callback)
        # the meta loss's negatives are drawn now, so the rows it reads are known
        meta_neg, meta_items = model.loss_plan(meta_batch)
        rows = torch.unique(torch.cat([touched, meta_items]))
        fast = list(fnet.fast_params)
        fast[ei] = self._inner_embedding_step(params[ei], kept["emb"], rows[rows > 0])
        fnet.update_params(fast)
        meta_loss = model.calculate_loss(meta_batch, net=fnet, neg=meta_neg)
        # only the poolers' gradient: autograd skips the paths that lead to the shadow's
        # initial weights alone
        pool = list(model.poolers.parameters())
        grads = torch.autograd.grad(meta_loss, pool, allow_unused=True)
        for p, g in zip(pool, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self._release(fnet)
        self.meta_optimizer.step()
        self.meta_steps += 1
        self.last_meta_loss = meta_loss.item()
        return s_orig.detach(), n_orig, g_orig

    def _shadow(self):
        """The functional copy of the backbone (higher's ``monkeypatch``), built once and
        reset to the backbone's current weights at every meta step: building it costs ~6 ms,
        as much as a sixth of the augmented batch's pass. Its initial weights are the
        backbone's own tensors (``copy_initial_weights=False``), never written to."""
        if self._fnet is None:
            self._fnet = higher.monkeypatch(self.model.backbone, copy_initial_weights=False)
        fnet = self._fnet
        fnet.train(self.model.backbone.training)
        fnet._fast_params = None  # higher keeps every version of the fast weights: start a fresh history
        fnet.update_params(list(self.model.backbone.parameters()))
        return fnet

    @staticmethod
    def _release(fnet):
        """Point the shadow back at plain weights, so the step's graph can be freed."""
        base = list(fnet._fast_params[0])
        fnet._fast_params = None
        fnet.update_params(base)

    def _diff_optimizer(self, inner, fnet, override):
        reference = self.model.backbone.parameters()
        if self.inner_kind == "adam":
            return FlatDifferentiableAdam(inner, reference, fmodel=fnet, override=override)
        return higher.optim.get_diff_optim(inner, reference, fmodel=fnet, override=override)

    def _inner_optimizer(self):
        """The optimiser higher differentiates: every backbone weight except the item
        embedding table (see :meth:`_inner_embedding_step`). For adam it shares, without
        copying, the moments and step counts of the optimiser that trains the backbone."""
        weight = self.model.backbone.item_embedding.weight
        params = [p for p in self.model.backbone.parameters() if p is not weight]
        if self.inner_kind == "sgd":
            return torch.optim.SGD(params, lr=self.inner_lr)
        group = self.optimizer.param_groups[0]
        view = torch.optim.Adam(params, lr=self.inner_lr, betas=group["betas"], eps=group["eps"],
                                weight_decay=group["weight_decay"])
        if self.inner_kind == "adam_fresh":
            return view  # no state: a first Adam step, as the public code's inner step
        for p in params:
            if p in self.optimizer.state:
                view.state[p] = self.optimizer.state[p]
        return view

    @property
    def _emb_index(self):
        weight = self.model.backbone.item_embedding.weight
        return next(i for i, p in enumerate(self.model.backbone.parameters()) if p is weight)

    def _inner_embedding_step(self, weight, g_full, rows):
        """The shadow's item-embedding table after the inner step, exact on ``rows``.

        ``rows`` must hold every item the augmented loss and the meta loss read. Each of them
        moves as higher's differentiable optimiser would move it (sgd: ``w - lr g``; adam:
        from the backbone optimiser's moments and step count, with higher's formula
        ``w - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``; adam_fresh: from no
        state, t = 1), where ``g`` = ``g_full``, the gradient of the inner loss, with a
        graph to the poolers. The other rows keep the
        backbone's values: nothing after this step reads them, so the meta loss and its
        gradient are those of updating the whole table.
        """
        w = weight.detach()
        g_rows = g_full[rows] if g_full is not None else torch.zeros_like(w[rows])
        lr = self.inner_lr
        if self.inner_kind == "sgd":
            return w.index_put((rows,), w[rows] - lr * g_rows)
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        if group.get("amsgrad"):
            raise ValueError("the inner embedding step does not implement amsgrad")
        state = {} if self.inner_kind == "adam_fresh" else (
            self.optimizer.state.get(self.model.backbone.item_embedding.weight) or {})
        t = float(state["step"]) + 1 if "step" in state else 1.0
        size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        m0, v0 = state.get("exp_avg"), state.get("exp_avg_sq")
        w_r = w[rows]
        if wd:
            g_rows = g_rows + wd * w_r
        m = (1 - beta1) * g_rows if m0 is None else m0[rows] * beta1 + (1 - beta1) * g_rows
        v = (1 - beta2) * g_rows * g_rows if v0 is None else v0[rows] * beta2 + (1 - beta2) * g_rows * g_rows
        zero = v == 0  # as higher: no gradient through sqrt at 0 (there m = 0 and the row stays)
        root = torch.where(zero, 0.0, torch.where(zero, 1.0, v).sqrt())
        return w.index_put((rows,), w_r - size * m / (root + eps))

    def main_step(self, batch, aug, reuse=None):
        """Gradients of the main step's loss in the backbone's ``.grad`` (the optimiser steps
        afterwards): ONE mean of the BCE over every target position of the original batch and
        of the augmented batch (``aug``; None in backbone-only mode). ``reuse``: what
        :meth:`meta_step` returned for this batch (the original batch's sum, count and
        gradient at the current weights). Returns the loss (detached)."""
        model = self.model
        self.optimizer.zero_grad()
        if reuse is None or not self.reuse_orig_grad:
            parts = [model.orig_loss(batch)]
            if aug is not None:
                parts.append(model.aug_loss(aug, with_grad=False))
            loss = model.joint_mean(*parts)
            self._check_nan(loss)
            loss.backward()
            return loss.detach()
        s_orig, n_orig, g_orig = reuse
        s_aug, n_aug = model.aug_loss(aug, with_grad=False)
        count = (n_orig + n_aug).clamp(min=1)
        loss_aug = s_aug / count
        self._check_nan(loss_aug)
        loss_aug.backward()
        for p, g in zip(model.backbone.parameters(), g_orig):
            if g is not None:
                p.grad = g / count if p.grad is None else p.grad + g / count
        return loss_aug.detach() + s_orig / count

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._aug_iter is None and (self.use_aug or self.use_meta):
            self._make_loaders(train_data)
        self.model.train()
        total = 0.0
        n_batches = len(train_data)
        if self.steps_per_epoch:
            n_batches = min(n_batches, self.steps_per_epoch)
        it = train_data
        if show_progress:
            from tqdm import tqdm

            it = tqdm(train_data, total=n_batches, ncols=100, desc=f"Train {epoch_idx:>5}")
        for step, batch in enumerate(it):
            if step >= n_batches:
                break
            batch = batch.to(self.device)
            aug = next(self._aug_iter).to(self.device) if self.use_aug else None
            reuse = None
            if self.use_meta and step % self.meta_interval == 0:
                reuse = self.meta_step(batch, aug, next(self._meta_iter).to(self.device))
            loss = self.main_step(batch, aug, reuse)
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.backbone.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            self.steps_done += 1
            total += loss.item()
            if self.budget_spent():
                break
        if show_progress:
            it.close()
        return total
