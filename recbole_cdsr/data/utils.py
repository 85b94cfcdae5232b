"""Dataset creation and data preparation for CDSR runs.

``ensure_atomic_files`` converts a known release when its atomic files are missing;
``create_cdsr_dataset`` loads them; ``cdsr_data_preparation`` returns RecBole's
``TrainDataLoader`` (with domain-aware negatives when the model samples negatives) and one
``CDSREvalDataLoader`` per evaluation split, carrying the fixed candidate sets.
"""

import logging
import os

import numpy as np
import torch

from recbole.data.dataloader import TrainDataLoader
from recbole.sampler import RepeatableSampler

from recbole_cdsr.data.candidates import CandidateStore
from recbole_cdsr.data.dataset import CDSRDataset
from recbole_cdsr.data.length_groups import LengthGroupedTrainDataLoader, resolve_dynamic_padding, trim_batch
from recbole_cdsr.data.sampler import DomainSampler

logger = logging.getLogger(__name__)

ATOMIC_SUFFIXES = ("item", "train.inter", "valid.inter", "test.inter")
RAW_PATH_ENV = "RECBOLE_CDSR_RAW_PATH"


def _atomic_files_present(dataset_dir, name):
    return all(os.path.isfile(os.path.join(dataset_dir, f"{name}.{s}")) for s in ATOMIC_SUFFIXES)


def _default_raw_candidates(release):
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [
        os.path.join(os.getcwd(), "..", "shared", "data", "llmcdsr", release),
        os.path.join(here, "..", "shared", "data", "llmcdsr", release),
    ]


def ensure_atomic_files(config):
    """Convert the dataset's release when its atomic files are missing.

    The release folder comes from ``raw_path`` (config / ``--raw_path``), the environment
    variable ``RECBOLE_CDSR_RAW_PATH``, or ``../shared/data/llmcdsr/<release>`` when present.
    """
    name = config["dataset"]
    dataset_dir = config["data_path"]
    if _atomic_files_present(dataset_dir, name):
        return False
    release = config["cdsr_release"]
    raw = config["raw_path"] or os.environ.get(RAW_PATH_ENV)
    tried = []
    if not raw and release:
        for cand in _default_raw_candidates(release):
            tried.append(os.path.abspath(cand))
            if os.path.isdir(cand):
                raw = cand
                break
    if not raw:
        what = (
            f"pass --raw_path=<folder of the {release} release> or set {RAW_PATH_ENV}"
            + (f" (looked in {', '.join(tried)})" if tried else "")
            if release
            else "convert it first: python -m dataset_converters interactions LOG.csv --out DATA_PATH --name "
            f"{name} (any two-domain log), or python -m dataset_converters RELEASE_DIR --out DATA_PATH (an LLMCDSR release)"
        )
        raise FileNotFoundError(
            f"dataset {name!r}: atomic files not found in {os.path.abspath(dataset_dir)}; {what}"
        )
    from dataset_converters import convert_llmcdsr_release

    out_dir = os.path.dirname(os.path.normpath(dataset_dir))
    logger.info(f"converting release {raw} -> {dataset_dir}")
    convert_llmcdsr_release(raw, out_dir, name)
    return True


def resolve_train_view(config, model_class):
    """``train_view`` for this model: the config's, or with ``auto`` the model's own
    (``TRAIN_VIEW`` of the plugin's models; ``sequence`` for RecBole's models that train
    on whole sequences exactly, see :mod:`recbole_cdsr.trainer.whole_sequence`; else prefix)."""
    from recbole_cdsr.trainer.whole_sequence import supports_sequence_view

    view = config["train_view"]
    if view == "auto":
        view = getattr(model_class, "TRAIN_VIEW", None)
        if view is None:
            view = "sequence" if supports_sequence_view(model_class, config) else "prefix"
    elif view == "sequence" and not hasattr(model_class, "TRAIN_VIEW"):
        if not supports_sequence_view(model_class, config):
            from recbole_cdsr.trainer.whole_sequence import SEQUENCE_MODELS

            raise ValueError(
                f"train_view: sequence is not available for {model_class.__name__} (RecBole's models "
                f"with a whole-sequence path: {', '.join(sorted(SEQUENCE_MODELS))}); use prefix or auto"
            )
    return view


def create_cdsr_dataset(config, model_class=None):
    ensure_atomic_files(config)
    view = resolve_train_view(config, model_class) if model_class is not None else "prefix"
    # RecBole's models read the whole-sequence view as exact windows with target lists;
    # the plugin's models (TRAIN_VIEW) keep their own (last L items per user)
    windows = view == "sequence" and model_class is not None and not hasattr(model_class, "TRAIN_VIEW")
    return CDSRDataset(config, train_view=view, windows=windows)


class CDSREvalDataLoader:
    """Batches of one evaluation split, with the fixed candidates and target domains.

    Iterating yields ``(interaction, rows)``: a RecBole ``Interaction`` and the row indices
    (a LongTensor) of the split. ``candidates`` is [instances, neg_num] (or None when the
    sampled protocol is not requested), ``target_domain`` [instances].
    """

    def __init__(self, config, dataset, split_name, candidates, batch_size, trim=False):
        self._dataset = dataset
        self.dataset = dataset
        self.config = config
        self.split = split_name
        self.batch_size = batch_size
        self.candidates = candidates
        self.n = len(dataset)
        targets = dataset.inter_feat[dataset.iid_field]
        self.target_domain = torch.as_tensor(dataset.item_domain)[targets]
        self.domain_names = dataset.domain_names
        #: dynamic padding: batches in order of history length, cut to their longest row
        self.trim = bool(trim)
        if self.trim:
            lengths = dataset.inter_feat[dataset.item_list_length_field].numpy()
            self._order = torch.from_numpy(np.argsort(lengths, kind="stable"))
        else:
            self._order = torch.arange(self.n)

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        ds = self._dataset
        for start in range(0, self.n, self.batch_size):
            rows = self._order[start : start + self.batch_size]
            inter = ds.inter_feat[rows]
            if self.trim:
                inter = trim_batch(inter, ds.item_list_length_field, (ds.item_id_list_field,))
            yield inter, rows


def cdsr_data_preparation(config, dataset):
    """Returns ``train_data, valid_data, test_data``."""
    train_ds, valid_ds, test_ds = dataset.build()
    for d in (train_ds, valid_ds, test_ds):
        d.item_domain, d.domain_items, d.domain_names = (
            dataset.item_domain,
            dataset.domain_items,
            dataset.domain_names,
        )
        d.domain_field = dataset.domain_field
        d.train_view = dataset.train_view
        d.windows = getattr(dataset, "windows", False)
    neg_args = config["train_neg_sample_args"]
    sampler = None
    if neg_args["distribution"] != "none":
        if config["train_neg_domain"] == "same":
            sampler = DomainSampler(
                ["train"],
                train_ds,
                dataset.item_domain,
                dataset.domain_items,
                distribution=neg_args["distribution"],
                alpha=neg_args["alpha"],
            ).set_phase("train")
        else:
            sampler = RepeatableSampler(
                ["train"], train_ds, neg_args["distribution"], neg_args["alpha"]
            ).set_phase("train")
    dynamic = resolve_dynamic_padding(config, config["model"])
    windows = getattr(dataset, "windows", False)
    if dynamic or windows:
        train_data = LengthGroupedTrainDataLoader(
            config, train_ds, sampler, shuffle=config["shuffle"], trim=dynamic, target_budget=windows
        )
    else:
        train_data = TrainDataLoader(config, train_ds, sampler, shuffle=config["shuffle"])
    train_data.dynamic_padding = dynamic
    store = CandidateStore(config, dataset)
    names = dataset.split_names()
    loaders = []
    for split_name, ds in ((names[1], valid_ds), (names[2], test_ds)):
        cand = store.load(split_name, ds) if "sampled" in config["eval_protocol"] else None
        loaders.append(
            CDSREvalDataLoader(config, ds, split_name, cand, config["eval_batch_size"], trim=dynamic)
        )
    return train_data, loaders[0], loaders[1]
