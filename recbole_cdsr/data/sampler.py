"""Training negatives drawn from the positive item's own domain.

In a cross-domain dataset a negative from the other domain is trivially easy (the
sequence's context usually says which domain comes next), so BPR/BCE-style models get
negatives from the domain of each positive item (``train_neg_domain: same``), uniformly,
never the positive itself. ``train_neg_domain: any`` keeps RecBole's sampler.
"""

import numpy as np
import torch

from recbole.sampler import RepeatableSampler


class DomainSampler(RepeatableSampler):
    """RecBole-compatible sampler: ``sample_by_user_ids`` returns, for each positive item,
    ``num`` negatives from that item's domain (RecBole's layout: value ``k * n + i`` is the
    k-th negative of row ``i``). Uses numpy's global RNG, seeded by RecBole's ``init_seed``."""

    def __init__(self, phases, dataset, item_domain, domain_items, distribution="uniform", alpha=1.0):
        if distribution != "uniform":
            raise ValueError(
                "train_neg_domain: same draws negatives uniformly within the domain; "
                f"train_neg_sample_args.distribution={distribution!r} needs train_neg_domain: any"
            )
        self.item_domain = np.asarray(item_domain)
        self.domain_items = [np.asarray(x) for x in domain_items]
        super().__init__(phases, dataset, distribution=distribution, alpha=alpha)

    def sample_by_user_ids(self, user_ids, item_ids, num):
        pos = np.tile(np.asarray(item_ids, dtype=np.int64), num)
        out = np.zeros_like(pos)
        dom = self.item_domain[pos]
        for d, items in enumerate(self.domain_items):
            rows = np.nonzero(dom == d)[0]
            if len(rows) == 0:
                continue
            if len(items) < 2:
                raise ValueError(f"domain {d} has fewer than two items: cannot sample negatives")
            pending = rows
            while len(pending):
                out[pending] = items[np.random.randint(0, len(items), len(pending))]
                pending = pending[out[pending] == pos[pending]]
        if (dom < 0).any():
            raise ValueError("a positive item without a domain reached the sampler (padding?)")
        return torch.from_numpy(out)
