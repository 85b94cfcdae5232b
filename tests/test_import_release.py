import os
import pickle
import shutil

import numpy as np
import pytest

from recbole_cdsr.llm.import_release import ReleaseImportError, read_generation_embeddings

from conftest import base_config


def test_reads_arrays_and_refuses_code(tmp_path):
    p = tmp_path / "fk_generation_jina.pkl"
    # the release's own encoding (domain 0/1) and the spelled-out one ('A'/'B'), numpy ints too
    data = [(0, 1, np.ones((3, 4), dtype=np.float64)), (1, 7, np.zeros((1, 4), dtype=np.float32)),
            ("A", 2, np.full((2, 4), 2.0, dtype=np.float32)), (np.int64(1), np.int64(9), np.ones((5, 4), np.float32))]
    p.write_bytes(pickle.dumps(data))
    got = read_generation_embeddings(str(p))
    assert set(got) == {("A", 1), ("B", 7), ("A", 2), ("B", 9)} and got[("A", 1)].shape == (3, 4)
    assert got[("A", 1)].dtype == np.float32 and got[("A", 2)][0, 0] == 2.0
    p.write_bytes(pickle.dumps(data, protocol=5))  # numpy pickles arrays differently under protocol 5
    assert np.array_equal(read_generation_embeddings(str(p))[("B", 9)], np.ones((5, 4)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    p.write_bytes(pickle.dumps([("A", 1, Evil())]))
    with pytest.raises(ReleaseImportError, match="refusing to load global"):
        read_generation_embeddings(str(p))
    p.write_bytes(pickle.dumps([("A", 1, np.ones((2, 4))), ("A", 2, np.ones((2, 5)))]))
    with pytest.raises(ReleaseImportError, match="width 5"):
        read_generation_embeddings(str(p))
    p.write_bytes(pickle.dumps({"A": 1}))
    with pytest.raises(ReleaseImportError, match="expected a list"):
        read_generation_embeddings(str(p))
    for bad, msg in [((2, 3, np.ones((3, 4))), r"entry 1: domain 2 is neither"),
                     (("C", 3, np.ones((3, 4))), r"entry 1: domain 'C' is neither"),
                     ((True, 3, np.ones((3, 4))), r"entry 1: domain True"),
                     ((1, 0, np.ones((3, 4))), r"entry 1: user id 0 is not a positive integer"),
                     ((1, "5", np.ones((3, 4))), r"entry 1: user id '5'"),
                     ((0, 1, np.ones((3, 4))), r"entry 1: user A_1 appears twice")]:
        p.write_bytes(pickle.dumps([(0, 1, np.ones((3, 4))), bad]))
        with pytest.raises(ReleaseImportError, match=msg):
            read_generation_embeddings(str(p))


def _release_lines(path):
    with open(path) as f:
        return [[int(i) for i in ln.rstrip("\n").split("\t")[1].split(",")] for ln in f]


def _public_release_pickle(path, fk_raw, width, n_per_domain=150, seed=0):
    """A generation pickle written as the public code writes it (get_candidate_embedding.py):
    a list of (int domain 0/1, int 1-based line of train_A/train_B.txt, float32 [L, d])."""
    rng = np.random.default_rng(seed)
    data = []
    for dom, fname in ((0, "train_A.txt"), (1, "train_B.txt")):
        n_lines = len(_release_lines(os.path.join(fk_raw, fname)))
        for line in range(1, min(n_per_domain, n_lines) + 1):
            n = 2 if line == 4 else 3 + line % 7  # the public code never writes <= 2 names; one such user anyway
            data.append((dom, line, rng.standard_normal((n, width)).astype(np.float32)))
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


def _copy_slice(slice_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(os.path.join(slice_data, "fk-slice"), dst / "fk-slice",
                    ignore=shutil.ignore_patterns("*.pseudo-*", "*.pretrain-*", "*.gen-*"))
    return str(dst)


def test_public_release_format_imports_every_user_of_the_slice(tmp_path, slice_data, fk_raw, monkeypatch):
    """generator: import on a pickle in the public format: every user it holds that the dataset
    has is imported with its own vectors, through prepare_llmcdsr and the dataset loader."""
    import recbole_cdsr.llm.encoders as encoders
    import recbole_cdsr.stages.llmcdsr as stages
    from dataset_converters.safe_pickle import restricted_load_dict
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import create_cdsr_dataset
    from recbole_cdsr.data.atomic import read_training_sequences
    from recbole_cdsr.stages.llmcdsr import prepare as prepare_llmcdsr

    data_path = _copy_slice(slice_data, tmp_path)
    d = os.path.join(data_path, "fk-slice")
    pkl = str(tmp_path / "food-kitchen_generation_jina.pkl")
    data = _public_release_pickle(pkl, fk_raw, width=384)
    seqs = read_training_sequences(d, "fk-slice")

    # the token of (domain, line) is the user of that line of the release: same items
    asin_a = {v: k for k, v in restricted_load_dict(os.path.join(fk_raw, "item_set_A.pkl"), int).items()}
    asin_b = {v: k for k, v in restricted_load_dict(os.path.join(fk_raw, "item_set_B.pkl"), int).items()}
    with open(os.path.join(fk_raw, "num.txt")) as f:
        n_a = int(f.readline())
    lines = {0: _release_lines(os.path.join(fk_raw, "train_A.txt")),
             1: _release_lines(os.path.join(fk_raw, "train_B.txt"))}
    tok = {0: "A", 1: "B"}
    expected = {f"{tok[dom]}_{uid}": arr for dom, uid, arr in data if f"{tok[dom]}_{uid}" in seqs and len(arr) > 2}
    for dom, uid, _ in data:
        t = f"{tok[dom]}_{uid}"
        if t in seqs:
            line = lines[dom][uid - 1]
            assert seqs[t] == [asin_a[i] if dom == 0 else asin_b[i - n_a] for i in line]
    assert sum(1 for t in seqs if t[0] in "AB") == 266 and len(expected) == 264  # 133 + 133, minus A_4 and B_4

    # stage 2 and the title embeddings are not what this test is about: stubbed
    monkeypatch.setattr(stages, "pretrain_tables", lambda *a, **k: {})
    def zero_title_vectors(d, n, enc, items=None, **k):
        return items[0], items[1], np.zeros((len(items[0]), enc.dim), np.float32)

    monkeypatch.setattr(encoders, "item_text_embeddings", zero_title_vectors)
    cfg = CDSRConfig("LLMCDSR", "fk-slice", config_dict=base_config(
        str(tmp_path), data_path=data_path, generator="import", import_path=pkl))
    updates, record = prepare_llmcdsr(cfg)
    st = record["stage1"]
    assert (st["users_in_file"], st["users_imported"], st["users_with_2_or_fewer"], st["users_not_in_dataset"]) == (
        300, 264, 2, 34)

    cfg = CDSRConfig("LLMCDSR", "fk-slice", config_dict=base_config(
        str(tmp_path), data_path=data_path, pseudo_items=updates["pseudo_items"]))
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    pi = ds.pseudo_items
    tok2id = ds.field2token_id["user_id"]
    assert int((pi["count"] > 0).sum()) == 264
    for t, arr in expected.items():
        uid = tok2id[t]
        n = int(pi["count"][uid])
        assert n == len(arr)
        np.testing.assert_array_equal(pi["emb"][pi["index"][uid, :n]].numpy(), arr)
    assert pi["count"][tok2id["A_4"]] == 0 and pi["count"][tok2id["B_4"]] == 0
    assert all(pi["count"][tok2id[t]] == 0 for t in seqs if t.startswith("O_"))


def test_vectors_of_another_width_than_the_text_encoder_fail_before_training(tmp_path, slice_data, fk_raw,
                                                                             monkeypatch):
    import recbole_cdsr.llm.encoders as encoders
    import recbole_cdsr.stages.llmcdsr as stages
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.stages.llmcdsr import prepare as prepare_llmcdsr

    def must_not_run(*a, **k):
        raise AssertionError("reached embedding or training")

    monkeypatch.setattr(stages, "pretrain_tables", must_not_run)
    monkeypatch.setattr(encoders, "item_text_embeddings", must_not_run)
    data_path = _copy_slice(slice_data, tmp_path)
    pkl = str(tmp_path / "food-kitchen_generation_jina.pkl")
    _public_release_pickle(pkl, fk_raw, width=768, n_per_domain=5)  # the release's jina width
    cfg = CDSRConfig("LLMCDSR", "fk-slice", config_dict=base_config(
        str(tmp_path), data_path=data_path, generator="import", import_path=pkl))
    want = r"holds 768-d vectors, but text_encoder 'all-MiniLM-L6-v2' gives 384-d vectors.*set text_encoder"
    with pytest.raises(ReleaseImportError, match=want):
        prepare_llmcdsr(cfg)
    assert not [f for f in os.listdir(os.path.join(data_path, "fk-slice")) if ".pseudo-" in f]
