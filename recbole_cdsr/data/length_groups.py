"""Dynamic padding: batches of similar history lengths, trimmed to their longest row.

RecBole pads every history to ``MAX_ITEM_LIST_LENGTH`` (50). On the cross-domain releases
most histories are short (Food-Kitchen's prefix rows: 5.8 items on average, median 4), so
most of every batch is padding. With ``dynamic_padding`` on:

* training (:class:`LengthGroupedTrainDataLoader`): every epoch the rows are shuffled,
  cut into chunks of ``length_group_batches`` batches, each chunk is sorted by history
  length and split into batches, and the batches are shuffled (group-by-length);
* evaluation: the rows of a split are batched in order of history length (the protocol
  writes each instance's rank at its own row, so order does not matter);
* every batch's ``item_id_list`` (and the whole-sequence view's ``target_id_list``) is cut
  to its longest history. Histories are left-aligned, so only trailing padding goes.

The random stream is the loader's own generator, seeded with ``seed``: the same seed gives
the same batches. Whether a model computes the same function on trimmed batches is decided
per model by a test (``tests/test_speed_paths.py``); ``dynamic_padding: auto`` turns it on
only for the models that pass it (:data:`EXACT_UNDER_TRIMMING`).
"""

import logging

import numpy as np
import torch

from recbole.data.dataloader import TrainDataLoader

from recbole_cdsr.data.dataset import TARGET_LIST_FIELD

NEG_TARGET_LIST_FIELD = "neg_" + TARGET_LIST_FIELD

#: RecBole models whose loss and ``full_sort_predict`` scores are the same with and without
#: trailing padding (``tests/test_speed_paths.py`` checks every sequential model the
#: protocol runs against this set, both ways).
EXACT_UNDER_TRIMMING = frozenset(
    {
        "BERT4Rec", "CORE", "FDSA", "FPMC", "GCSAN", "GRU4Rec", "GRU4RecF", "HRM", "NARM",
        "S3Rec", "SASRec", "SASRecF", "SRGNN", "STAMP", "TransRec",
    }
)

#: Why the others keep full padding (measured by the same test; listed in docs/speed.md).
NOT_EXACT_REASON = {
    "Caser": "fails on trimmed batches: its horizontal and vertical convolutions are as tall as the padded length",
    "FEARec": "fails on trimmed batches (an index error in its loss, which mixes in full-length rows of the dataset)",
    "FOSSIL": "fails on trimmed batches (an index past the trimmed width: it assumes the padded length)",
    "HGN": "fails on trimmed batches: its gates are sized by the padded length",
    "LightSANs": "different scores: its item-to-interest projections are sized by the padded length",
    "NextItNet": "different scores: it reads the hidden state at the last padded column, not at the history's end",
    "NPE": "different scores: it sums the embeddings of the whole padded history and its padding item's embedding is not zero",
    "RepeatNet": "fails on trimmed batches: its repeat and explore decoders are sized by the padded length",
    "SHAN": "different scores: its short-term part reads the last columns of the padded history",
    "SINE": "fails on trimmed batches: it reshapes to the padded length",
}


def resolve_dynamic_padding(config, model_name):
    """True when batches are trimmed for this model (``dynamic_padding: on``, or ``auto``
    and the model is in :data:`EXACT_UNDER_TRIMMING`)."""
    mode = config["dynamic_padding"]
    if mode is None or mode == "auto":
        return model_name in EXACT_UNDER_TRIMMING
    on = mode if isinstance(mode, bool) else mode == "on"
    if on and model_name not in EXACT_UNDER_TRIMMING:
        why = NOT_EXACT_REASON.get(model_name, "it is not among the models tested exact under trimming")
        logging.getLogger(__name__).warning(
            f"dynamic_padding: on for {model_name}, although {why}; its results will differ from "
            "padded batches (dynamic_padding: auto keeps full padding for it)"
        )
    return on


def trim_batch(interaction, length_field, fields):
    """Cut each 2-D field of ``fields`` present in ``interaction`` to the batch's longest
    history (at least one column)."""
    longest = max(int(interaction[length_field].max()), 1)
    for f in fields:
        if f in interaction.interaction:
            v = interaction.interaction[f]
            if v.dim() == 2 and v.size(1) > longest:
                interaction.interaction[f] = v[:, :longest].contiguous()
    return interaction


def grouped_batches(lengths, batch_size, group_batches, generator=None, weights=None, shuffle=True):
    """Index arrays of one epoch's batches.

    ``lengths`` [n]: history length per row. ``weights`` [n] (default 1): what a batch
    counts towards ``batch_size`` (the whole-sequence view counts targets, so a batch holds
    about as many targets as a prefix batch); a batch holds rows until adding the next would
    exceed ``batch_size`` (at least one row). ``shuffle``: shuffle rows, sort each chunk of
    ``group_batches`` batches by length, shuffle the batches (with ``generator``);
    otherwise sort all rows by length and keep that order.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    w = np.ones(n, dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    if shuffle:
        order = torch.randperm(n, generator=generator).numpy()
        chunk = max(int(batch_size) * int(group_batches), 1)
        cum = np.cumsum(w[order])
        chunk_id = (cum - 1) // chunk
        # stable sort by (chunk, length): within a chunk, by length
        order = order[np.lexsort((lengths[order], chunk_id))]
    else:
        order = np.argsort(lengths, kind="stable")
    batches = _cut(order, w, int(batch_size))
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _cut(order, w, budget):
    if (w == 1).all():
        return [order[s : s + budget] for s in range(0, len(order), budget)]
    out, start, acc = [], 0, 0
    ww = w[order]
    for i, x in enumerate(ww):
        if acc and acc + x > budget:
            out.append(order[start:i])
            start, acc = i, 0
        acc += int(x)
    if start < len(order):
        out.append(order[start:])
    return out


class LengthGroupedTrainDataLoader(TrainDataLoader):
    """RecBole's ``TrainDataLoader`` (same collate: the model's transform, then negative
    sampling) over length-grouped batches, each trimmed to its longest history.

    ``target_budget``: the whole-sequence view's batches hold up to ``train_batch_size``
    targets (rows of ``target_id_list``) instead of ``train_batch_size`` rows. The batches
    of the next epoch are planned when ``len()`` or ``iter()`` first needs them.
    """

    def __init__(self, config, dataset, sampler, shuffle=True, trim=True, target_budget=False):
        self.trim = bool(trim)
        self.target_budget = bool(target_budget)
        self.group_batches = int(config["length_group_batches"])
        self._plan = None
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        inter = dataset.inter_feat
        self._lengths = inter[dataset.item_list_length_field].numpy()
        self._weights = None
        if self.target_budget:
            self._weights = (inter[TARGET_LIST_FIELD] > 0).sum(dim=1).numpy()
        list_field = dataset.item_id_list_field
        self._trim_fields = (list_field, TARGET_LIST_FIELD)
        self._length_field = dataset.item_list_length_field

    def _next_plan(self):
        if self._plan is None:
            self._plan = grouped_batches(
                self._lengths, self.step, self.group_batches, self.generator,
                weights=self._weights, shuffle=self.shuffle,
            )
        return self._plan

    def __len__(self):
        return len(self._next_plan())

    def __iter__(self):
        plan = self._next_plan()
        self._plan = None  # the next epoch plans anew
        for idx in plan:
            yield self.collate_fn(idx)

    def collate_fn(self, index):
        index = np.asarray(index)
        data = self._dataset[index]
        if self.trim:
            data = trim_batch(data, self._length_field, self._trim_fields)
        data = self.transform(self._dataset, data)
        data = self._neg_sampling(data)
        if self.target_budget and self._sampler is not None and self.neg_sample_args["distribution"] != "none":
            data.update(self._target_negatives(data))
        return data

    def _target_negatives(self, data):
        """One negative per target of ``target_id_list`` (``neg_target_id_list``), drawn by
        the run's sampler as the prefix view's negatives are (from the positive's domain
        with ``train_neg_domain: same``)."""
        from recbole.data.interaction import Interaction

        tg = data[TARGET_LIST_FIELD]
        sel = tg > 0
        uids = data[self._dataset.uid_field].view(-1, 1).expand_as(tg)[sel]
        neg = torch.zeros_like(tg)
        neg[sel] = self._sampler.sample_by_user_ids(uids.numpy(), tg[sel].numpy(), 1).view(-1)
        return Interaction({NEG_TARGET_LIST_FIELD: neg})
