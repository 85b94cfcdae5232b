"""The CDSR evaluation protocol, identical for every model.

Each evaluation instance is a (history, target) pair; the target's domain decides which
domain's metrics it counts for. A model scores each history once against all items
(``full_sort_predict``); the protocol then gathers what it needs:

``sampled``
    the target against ``eval_neg_num`` fixed negatives of its own domain (drawn once per
    dataset, see ``recbole_cdsr.data.candidates``).
``full``
    the target against every other item of its own domain (the other domain and the
    padding item are masked).

Tie policy (pessimistic): ``rank = 1 + #{candidates c != target : score(c) >= score(target)}``.
A model that gives every item the same score gets the worst rank, never the best; a NaN
score counts as minus infinity.

Metrics from a rank ``r``: ``hit@k = [r <= k]``, ``ndcg@k = [r <= k] / log2(r + 1)`` (one
relevant item, so the ideal DCG is 1), ``mrr@k = [r <= k] / r``; averaged over the
instances of domain A, of domain B, and of all (``overall``). Keys follow RecBole's result
dictionaries: ``A/hit@10``, ``B/ndcg@5``, ``overall/mrr@10``; protocols after the first
are prefixed: ``full:A/hit@10``.
"""

from collections import OrderedDict

import numpy as np
import torch

OVERALL = "overall"
_METRIC_NAMES = {"hit": "hit", "ndcg": "ndcg", "mrr": "mrr"}


def sampled_ranks(scores, targets, negatives):
    """Ranks of ``targets`` among themselves + ``negatives`` ([B, n]) under ``scores`` [B, I]."""
    cand = torch.cat([targets.view(-1, 1), negatives], dim=1)
    s = torch.nan_to_num(scores.gather(1, cand).float(), nan=float("-inf"))
    return 1 + count_true(s[:, 1:] >= s[:, :1])


_I16_SPAN = 32767  # columns whose count of True fits an int16


def count_true(mask):
    """Row counts of a bool [B, I] tensor, exactly as ``mask.sum(1)`` (int64). Summed as
    uint8 into int16 over column blocks of at most 32,767 (no overflow), which is ~20x
    faster on CPU than the int64 sum of bools."""
    if mask.device.type != "cpu":
        return mask.sum(dim=1)
    u = mask.view(torch.uint8)
    out = None
    for a in range(0, u.size(1), _I16_SPAN):
        c = u[:, a : a + _I16_SPAN].sum(dim=1, dtype=torch.int16).long()
        out = c if out is None else out + c
    return out if out is not None else mask.new_zeros(mask.size(0), dtype=torch.long)


def full_ranks(scores, targets, in_domain, histories=None):
    """Ranks of ``targets`` among all items where ``in_domain`` [B, I] is True.

    ``histories`` [B, L] (padded with 0), when given, are removed from the ranking too.
    The target and the padding item 0 never count against the target.
    """
    scores = scores.float()
    if bool(torch.isnan(scores.sum())):  # one fast reduction; NaN (or inf - inf) only then
        scores = torch.nan_to_num(scores, nan=float("-inf"))
    rows = torch.arange(len(targets), device=scores.device)
    t = scores[rows, targets].view(-1, 1)
    if histories is not None:
        mask = in_domain.clone()
        mask.scatter_(1, histories, False)
        mask[rows, targets] = False
        mask[:, 0] = False
        return 1 + count_true((scores >= t) & mask)
    # one [B, I] pass: count in-domain items scoring >= the target, then take out the
    # target itself (always >= itself) and the padding item when they were counted
    ge = scores >= t
    ge &= in_domain
    count = count_true(ge)
    count -= ge[rows, targets].long()
    count -= (ge[:, 0] & (targets != 0)).long()
    return 1 + count


def instance_metric(ranks, metric, k):
    """Per-instance ``metric@k`` of 1-D ``ranks`` (a tensor gives a tensor, else numpy)."""
    m = _METRIC_NAMES[metric.lower()]
    if isinstance(ranks, torch.Tensor):
        r, log2 = ranks.double(), torch.log2
    else:
        r, log2 = np.asarray(ranks, dtype=np.float64), np.log2
    hit = (r <= k) * 1.0
    if m == "hit":
        return hit
    if m == "ndcg":
        return hit / log2(r + 1)
    return hit / r


def metrics_from_ranks(ranks, metrics, topk):
    """Means of each metric@k over ``ranks`` (1-D tensor). Empty input gives 0.0."""
    out = OrderedDict()
    for m in metrics:
        for k in topk:
            v = instance_metric(ranks, m, k)
            out[f"{_METRIC_NAMES[m.lower()]}@{k}"] = float(v.mean()) if len(ranks) else 0.0
    return out


def domain_results(ranks, target_domain, domain_names, metrics, topk, prefix=""):
    """Flat dict ``{prefix}{domain}/{metric}@{k}`` for every domain and ``overall``."""
    out = OrderedDict()
    groups = [(name, target_domain == d) for d, name in enumerate(domain_names)]
    groups.append((OVERALL, torch.ones_like(target_domain, dtype=torch.bool)))
    for name, sel in groups:
        for key, v in metrics_from_ranks(ranks[sel], metrics, topk).items():
            out[f"{prefix}{name}/{key}"] = v
    return out


class ProtocolEvaluator:
    """Scores an evaluation split once per instance and returns ranks per protocol."""

    def __init__(self, config, domain_mask):
        self.protocols = list(config["eval_protocol"])
        self.metrics = list(config["metrics"])
        self.topk = list(config["topk"])
        self.exclude_history = bool(config["eval_exclude_history"])
        self.device = config["device"]
        self.domain_mask = domain_mask.to(self.device)
        self.item_id_list_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        self.iid_field = config["ITEM_ID_FIELD"]

    @torch.no_grad()
    def rank(self, model, loader, show_progress=False):
        """``{protocol: LongTensor [instances]}`` of target ranks (on CPU)."""
        model.eval()
        out = {p: torch.zeros(loader.n, dtype=torch.long) for p in self.protocols}
        it = loader
        if show_progress:
            from tqdm import tqdm

            it = tqdm(loader, total=len(loader), ncols=100, desc=f"Evaluate {loader.split}")
        for interaction, rows in it:
            interaction = interaction.to(self.device)
            targets = interaction[self.iid_field]
            scores = model.full_sort_predict(interaction).view(len(rows), -1)
            if "sampled" in self.protocols:
                neg = loader.candidates[rows].to(self.device)
                out["sampled"][rows] = sampled_ranks(scores, targets, neg).cpu()
            if "full" in self.protocols:
                dom = loader.target_domain[rows].to(self.device)
                hist = interaction[self.item_id_list_field] if self.exclude_history else None
                out["full"][rows] = full_ranks(scores, targets, self.domain_mask[dom], hist).cpu()
        return out

    def results(self, ranks_by_protocol, target_domain, domain_names):
        """Flat RecBole-style result dict; the first protocol unprefixed."""
        res = OrderedDict()
        for i, p in enumerate(self.protocols):
            prefix = "" if i == 0 else f"{p}:"
            res.update(
                domain_results(
                    ranks_by_protocol[p], target_domain, domain_names, self.metrics, self.topk, prefix
                )
            )
        return res
