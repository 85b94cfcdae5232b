"""Candidate sets of the sampled protocol: drawn once, saved next to the dataset, reused.

For every evaluation instance (row of ``<dataset>.<split>.inter``), ``eval_neg_num``
distinct negatives are drawn uniformly from the items of the target's own domain,
excluding the target (and, with ``eval_exclude_history``, the user's history). The draw
works on item tokens read straight from the atomic files, with its own seed
(``eval_candidate_seed``), so it does not depend on the model, the run seed, the epoch or
RecBole's internal id order: every model of a leaderboard ranks the same candidates.

Files: ``<dataset>.<split>.cand-n<N>-seed<S>[-exhist].npz`` (``item_tokens``: all item
tokens, sorted; ``neg``: int32 [instances, N] indices into ``item_tokens``; ``targets``,
``users``), a cached artefact (:mod:`recbole_cdsr.cache`) whose manifest holds the
parameters, the sha256 of the source files, of the npz and of its arrays. Loading checks
the files against the manifest and draws the sets again from the manifest's seed, which
must give the same arrays: a candidate file changed by hand, or a manifest whose seed is
not the one its sets were drawn with, is reported as a WARNING and the sets are drawn
again. Missing files are drawn silently.
"""

import hashlib
import logging
import os

import numpy as np
import pandas as pd

from recbole_cdsr.cache import Artefact
from recbole_cdsr.utils import sha256_file

CANDIDATE_FORMAT_VERSION = 3  # 2: arrays_sha256, contents checked by a second draw; 3: the shared manifest

logger = logging.getLogger(__name__)


class CandidateError(ValueError):
    pass


def _read_items(path, item_field, domain_field):
    df = pd.read_csv(path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    cols = {c.split(":")[0]: c for c in df.columns}
    if item_field not in cols or domain_field not in cols:
        raise CandidateError(f"{path}: needs columns {item_field}:token and {domain_field}:token")
    return df[cols[item_field]].to_numpy(), df[cols[domain_field]].to_numpy()


def _read_instances(path, uid_field, item_field, list_field):
    df = pd.read_csv(path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    cols = {c.split(":")[0]: c for c in df.columns}
    for f in (uid_field, item_field, list_field):
        if f not in cols:
            raise CandidateError(f"{path}: missing column {f}")
    users = df[cols[uid_field]].to_numpy()
    targets = df[cols[item_field]].to_numpy()
    hists = [h.split() for h in df[cols[list_field]].to_numpy()]
    return users, targets, hists


def draw_candidates(item_tokens, item_domains, targets, hists, neg_num, seed, exclude_history):
    """Pure function: indices into sorted ``item_tokens`` of the negatives of each instance."""
    order = np.argsort(item_tokens, kind="stable")
    tokens = np.asarray(item_tokens)[order]
    domains = np.asarray(item_domains)[order]
    index = {t: i for i, t in enumerate(tokens)}
    pools = {d: np.nonzero(domains == d)[0] for d in sorted(set(domains.tolist()))}
    rng = np.random.default_rng(seed)
    neg = np.zeros((len(targets), neg_num), dtype=np.int32)
    tgt_idx = np.zeros(len(targets), dtype=np.int64)
    for r, (t, h) in enumerate(zip(targets, hists)):
        if t not in index:
            raise CandidateError(f"target item {t} (instance {r}) is not in the .item file")
        ti = index[t]
        tgt_idx[r] = ti
        pool = pools[domains[ti]]
        excl = {ti}
        if exclude_history:
            excl.update(index[x] for x in h if x in index and domains[index[x]] == domains[ti])
        if len(pool) - len(excl) < neg_num:
            raise CandidateError(
                f"domain {domains[ti]} has only {len(pool) - len(excl)} items besides the "
                f"target{' and history' if exclude_history else ''} (instance {r}); "
                f"eval_neg_num={neg_num} is too large: pass --eval_neg_num={len(pool) - len(excl)} or less, "
                "or --eval_protocol=\"['full']\" (every item of the domain)"
            )
        pos = rng.choice(len(pool), neg_num + len(excl), replace=False)
        picked = pool[pos]
        picked = picked[~np.isin(picked, list(excl))][:neg_num]
        neg[r] = picked
    return tokens, neg, tgt_idx


def arrays_sha256(arrays):
    """sha256 over the candidate arrays (names, dtypes, shapes and bytes), independent of
    how the npz archive compresses them."""
    h = hashlib.sha256()
    for key in ("item_tokens", "neg", "targets", "users"):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class CandidateStore:
    """Builds (once) and loads the candidate sets of a dataset's evaluation splits."""

    def __init__(self, config, dataset):
        self.dataset = dataset
        self.dir = dataset.dataset_path
        self.name = dataset.dataset_name
        self.neg_num = config["eval_neg_num"]
        self.seed = config["eval_candidate_seed"]
        self.exclude_history = config["eval_exclude_history"]

    def _sources(self, split):
        return (
            os.path.join(self.dir, f"{self.name}.item"),
            os.path.join(self.dir, f"{self.name}.{split}.inter"),
        )

    def artefact(self, split):
        tag = f"n{self.neg_num}-seed{self.seed}" + ("-exhist" if self.exclude_history else "")
        return Artefact(self.dir, f"{self.name}.{split}.cand", {
            "format_version": CANDIDATE_FORMAT_VERSION, "split": split, "neg_num": self.neg_num,
            "seed": self.seed, "exclude_history": self.exclude_history,
            "sources_sha256": {os.path.basename(p): sha256_file(p) for p in self._sources(split)},
        }, tag=tag)

    def paths(self, split):
        art = self.artefact(split)
        return art.path, art.manifest_path

    def check(self, split):
        """``(True, None)`` when the files are complete and consistent; ``(False, None)`` when
        they are missing; ``(False, reason)`` when they are present but do not match what
        their manifest says."""
        art = self.artefact(split)
        m, reason = art.check()
        if m is None:
            return False, reason
        try:
            stored = art.load_arrays()
        except Exception as e:  # a corrupt archive of any kind
            return False, f"{art.path} is unreadable ({type(e).__name__}: {e})"
        if arrays_sha256(stored) != m.get("arrays_sha256"):
            return False, f"the arrays of {art.path} differ from the hash in its manifest"
        if arrays_sha256(self._draw(split)) != m.get("arrays_sha256"):
            return False, (f"the candidate sets of {art.path} are not the ones seed {self.seed} draws "
                           "(its manifest states a seed it was not drawn with)")
        return True, None

    def _draw(self, split):
        ds = self.dataset
        item_path, inter_path = self._sources(split)
        item_tokens, item_domains = _read_items(item_path, ds.iid_field, ds.domain_field)
        users, targets, hists = _read_instances(inter_path, ds.uid_field, ds.iid_field, ds.item_id_list_field)
        tokens, neg, tgt = draw_candidates(
            item_tokens, item_domains, targets, hists, self.neg_num, self.seed, self.exclude_history
        )
        return {"item_tokens": tokens.astype(str), "neg": neg, "targets": tgt, "users": np.asarray(users).astype(str)}

    def build(self, split):
        arrays = self._draw(split)
        art = self.artefact(split)
        art.write_arrays(arrays, compressed=True, instances=int(len(arrays["targets"])),
                         method="numpy default_rng(seed); per instance, in file order, neg_num distinct items "
                         "uniform from the target's domain (items sorted by token), excluding the target"
                         + (" and the history" if self.exclude_history else ""),
                         arrays_sha256=arrays_sha256(arrays))
        logger.info(f"drew candidate sets for {self.name}.{split}: {art.path}")

    def load(self, split, split_dataset):
        """LongTensor [instances, neg_num] of internal item ids, rows aligned with
        ``split_dataset``'s rows (checked through the user tokens)."""
        import torch

        ok, reason = self.check(split)
        if not ok:
            if reason:
                logger.warning(f"{self.name}.{split} candidate sets: {reason}; drawing them again from "
                               f"eval_candidate_seed {self.seed}")
            self.build(split)
        npz, _ = self.paths(split)
        with np.load(npz, allow_pickle=False) as z:
            tokens, neg, users = z["item_tokens"], z["neg"], z["users"]  # checked (or drawn) just above
        ds = self.dataset
        tok2id = ds.field2token_id[ds.iid_field]
        missing = [t for t in tokens if t not in tok2id]
        if missing:
            raise CandidateError(f"candidate item {missing[0]} is unknown to the loaded dataset")
        id_of = np.array([tok2id[t] for t in tokens], dtype=np.int64)
        row_users = ds.field2id_token[ds.uid_field][split_dataset.inter_feat[ds.uid_field].numpy()]
        if len(row_users) != len(users) or not np.array_equal(row_users.astype(str), users.astype(str)):
            raise CandidateError(
                f"{npz}: rows do not match {self.name}.{split}.inter (was the file changed?)"
            )
        return torch.from_numpy(id_of[neg])
