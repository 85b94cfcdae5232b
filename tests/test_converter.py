import hashlib
import json
import os
import pickle
import shutil

import pytest

from dataset_converters import ConversionError, convert_llmcdsr_release, restricted_load_dict
from dataset_converters.llmcdsr_release import main as converter_main
from dataset_converters.safe_pickle import SafePickleError

from conftest import MB_RAW


def _digest_tree(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.mark.slow
def test_food_kitchen_counts_and_identical_rerun(fk_raw, tmp_path):
    m = convert_llmcdsr_release(fk_raw, str(tmp_path), "food-kitchen")
    c = m["counts"]
    assert (c["items_A"], c["items_B"]) == (8661, 27637)
    assert (c["train_A"], c["train_B"], c["train_overlap"]) == (5472, 38191, 7501)
    assert (c["valid"], c["test"]) == (960, 937)
    assert (c["valid_target_A"], c["valid_target_B"]) == (363, 597)
    assert (c["test_target_A"], c["test_target_B"]) == (300, 637)
    d = tmp_path / "food-kitchen"
    # the files themselves say the same
    items = _lines(d / "food-kitchen.item")
    assert items[0] == "item_id:token\tdomain:token\ttitle:token_seq"
    doms = [ln.split("\t")[1] for ln in items[1:]]
    assert (doms.count("A"), doms.count("B")) == (8661, 27637)
    train = _lines(d / "food-kitchen.train.inter")[1:]
    kinds = [r.split("_")[0] for r in train]
    assert (kinds.count("A"), kinds.count("B"), kinds.count("O")) == (5472, 38191, 7501)
    assert len(_lines(d / "food-kitchen.valid.inter")) - 1 == 960
    assert len(_lines(d / "food-kitchen.test.inter")) - 1 == 937
    users = _lines(d / "food-kitchen.user")[1:]
    assert len(users) == 5472 + 38191 + 7501 + 960 + 937
    assert sum(1 for u in users if u.endswith("\tsingle-A\ttrain")) == 5472
    # first training user of train_A.txt, mapped back to ASINs through item_set_A.pkl
    set_a = restricted_load_dict(os.path.join(fk_raw, "item_set_A.pkl"), int)
    asin = {v: k for k, v in set_a.items()}
    with open(os.path.join(fk_raw, "train_A.txt")) as f:
        uid, seq = f.readline().strip().split("\t")
    seq = [asin[int(i)] for i in seq.split(",")]
    assert train[0] == f"A_{uid}\t{' '.join(seq[:-1])}\t{seq[-1]}"

    before = _digest_tree(d)
    convert_llmcdsr_release(fk_raw, str(tmp_path), "food-kitchen")
    assert _digest_tree(d) == before
    manifest = json.loads((d / "food-kitchen.manifest.json").read_text())
    assert manifest["incomplete"] is False
    assert manifest["source_files_sha256"]["train_B.txt"] == hashlib.sha256(
        open(os.path.join(fk_raw, "train_B.txt"), "rb").read()
    ).hexdigest()
    # no temporary folders left behind
    assert sorted(os.listdir(tmp_path)) == ["food-kitchen"]


def test_titles_survive_recbole_style_reading(fk_data):
    import pandas as pd

    path = os.path.join(fk_data, "food-kitchen", "food-kitchen.item")
    df = pd.read_csv(path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    assert len(df) == 8661 + 27637
    quoted = df[df["title:token_seq"].str.contains('"')]
    assert len(quoted) > 100  # titles with inches marks etc. come back intact


def test_movie_book_copy_names_missing_train_b(tmp_path):
    with pytest.raises(ConversionError, match="train_B.txt"):
        convert_llmcdsr_release(MB_RAW, str(tmp_path), "movie-book")
    assert os.listdir(tmp_path) == []
    m = convert_llmcdsr_release(MB_RAW, str(tmp_path), "movie-book", allow_missing_single_domain_b=True)
    assert m["incomplete"] is True and "train_B.txt" in m["missing_source_files"]
    assert m["counts"]["train_B"] == 0 and m["counts"]["items_B"] == 93860
    on_disk = json.loads((tmp_path / "movie-book" / "movie-book.manifest.json").read_text())
    assert "WITHOUT" in on_disk["note"]


def test_cli_exit_code_and_message(tmp_path, capsys):
    assert converter_main([MB_RAW, "--out", str(tmp_path)]) == 2
    assert "train_B.txt" in capsys.readouterr().err


# --- malformed releases -------------------------------------------------------------

def _tiny_release(d):
    """A valid 3+2-item release."""
    os.makedirs(d, exist_ok=True)
    w = lambda f, s: open(os.path.join(d, f), "w").write(s)  # noqa: E731
    w("num.txt", "3\n2\n")
    w("instance_num.txt", "1\n1\n1\n")
    w("train_A.txt", "1\t0,1,2\n")
    w("train_B.txt", "1\t3,4\n")
    w("train_overlap.txt", "1\t0,3,1,4\n")
    w("valid.txt", "1\t2,3\n")
    w("test.txt", "1\t4,0\n")
    for f, obj in (
        ("item_set_A.pkl", {"a0": 0, "a1": 1, "a2": 2}),
        ("item_set_B.pkl", {"b0": 0, "b1": 1}),
        ("text_A.pkl", {"a0": "Tea &amp; biscuits", "a1": 'Pan 12" wide', "a2": "Salt"}),
        ("text_B.pkl", {"b0": "Knife", "b1": "Fork\tset"}),
    ):
        with open(os.path.join(d, f), "wb") as fh:
            pickle.dump(obj, fh)
    return d


def test_tiny_release_converts(tmp_path):
    raw = _tiny_release(str(tmp_path / "raw"))
    convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")
    d = tmp_path / "out" / "tiny"
    assert _lines(d / "tiny.item")[1:] == [
        "a0\tA\tTea & biscuits",
        'a1\tA\t"Pan 12"" wide"',
        "a2\tA\tSalt",
        "b0\tB\tKnife",
        "b1\tB\tFork set",
    ]
    assert _lines(d / "tiny.train.inter")[1:] == ["A_1\ta0 a1\ta2", "B_1\tb0\tb1", "O_1\ta0 b0 a1\tb1"]
    assert _lines(d / "tiny.test.inter")[1:] == ["T_1\tb1\ta0"]
    # an unknown release's domains are its tokens unless named
    assert json.loads((d / "tiny.manifest.json").read_text())["domains"] == {"A": "A", "B": "B"}
    assert converter_main([raw, "--out", str(tmp_path / "out"), "--name", "tiny", "--domains", "Pantry,Tools"]) == 0
    assert json.loads((d / "tiny.manifest.json").read_text())["domains"] == {"A": "Pantry", "B": "Tools"}
    with pytest.raises(ConversionError, match="--domains Pantry: give two different names"):
        convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny", domains=["Pantry"])


def test_release_without_single_domain_users_converts(tmp_path):
    """Empty train_A.txt and train_B.txt with 0 on their lines of instance_num.txt: every
    training user is overlapped."""
    raw = _tiny_release(str(tmp_path / "raw"))
    for f in ("train_A.txt", "train_B.txt"):
        open(os.path.join(raw, f), "w").close()
    with pytest.raises(ConversionError, match="train_A.txt: 0 sequences, but instance_num.txt says 1"):
        convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")  # instance_num.txt still says 1
    with open(os.path.join(raw, "instance_num.txt"), "w") as f:
        f.write("0\n0\n1\n")
    m = convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")
    assert (m["counts"]["train_A"], m["counts"]["train_B"], m["counts"]["train_overlap"]) == (0, 0, 1)
    d = tmp_path / "out" / "tiny"
    assert _lines(d / "tiny.train.inter")[1:] == ["O_1\ta0 b0 a1\tb1"]
    assert _lines(d / "tiny.user")[1:] == ["O_1\toverlapped\ttrain", "V_1\toverlapped\tvalid", "T_1\toverlapped\ttest"]


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: os.remove(os.path.join(d, "valid.txt")), "valid.txt"),
        (lambda d: open(os.path.join(d, "train_overlap.txt"), "w").write("1\t0,3,1,\n"), "train_overlap.txt, line 1"),
        (lambda d: open(os.path.join(d, "train_overlap.txt"), "w").write("1\t0,3,1,4\n2\t0,"), "train_overlap.txt, line 2"),
        (lambda d: open(os.path.join(d, "test.txt"), "w").write("1\t4,7\n"), "test.txt, line 1: item index 7 out of range"),
        (lambda d: open(os.path.join(d, "train_A.txt"), "w").write("1\t0,1,3\n"), "train_A.txt, line 1: item index 3"),
        (lambda d: open(os.path.join(d, "instance_num.txt"), "w").write("1\n2\n1\n"), "instance_num.txt says 2"),
        (lambda d: pickle.dump([("a0", 0)], open(os.path.join(d, "item_set_A.pkl"), "wb")), "item_set_A.pkl: expected a pickled dict"),
        (lambda d: pickle.dump({"a0": 0, "a1": 1, "a2": 2.0}, open(os.path.join(d, "item_set_A.pkl"), "wb")), "item_set_A.pkl"),
        (lambda d: open(os.path.join(d, "num.txt"), "w").write("3\nx\n"), "num.txt, line 2"),
    ],
)
def test_malformed_release_fails_cleanly(tmp_path, mutate, needle):
    raw = _tiny_release(str(tmp_path / "raw"))
    mutate(raw)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert_llmcdsr_release(raw, str(out), "tiny")
    if needle:
        assert needle in str(e.value)
    # nothing half-written: no dataset folder, no temporary folder
    assert not out.exists() or os.listdir(out) == []


def test_truncated_line_names_file_and_line(tmp_path):
    raw = _tiny_release(str(tmp_path / "raw"))
    with open(os.path.join(raw, "train_B.txt"), "w") as f:
        f.write("1\t3,4\n2")  # second line cut after the user id
    with open(os.path.join(raw, "instance_num.txt"), "w") as f:
        f.write("1\n2\n1\n")
    with pytest.raises(ConversionError, match=r"train_B.txt, line 2"):
        convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")


def test_failed_reconversion_keeps_previous_output(tmp_path):
    raw = _tiny_release(str(tmp_path / "raw"))
    convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")
    before = _digest_tree(tmp_path / "out" / "tiny")
    open(os.path.join(raw, "test.txt"), "w").write("1\t4,99\n")
    with pytest.raises(ConversionError):
        convert_llmcdsr_release(raw, str(tmp_path / "out"), "tiny")
    assert _digest_tree(tmp_path / "out" / "tiny") == before
    assert os.listdir(tmp_path / "out") == ["tiny"]


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-path-for-test",))


def test_restricted_unpickler_refuses_objects(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(SafePickleError, match="refusing to load global"):
        restricted_load_dict(str(p), int)
    p.write_bytes(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    with pytest.raises(SafePickleError):
        restricted_load_dict(str(p), int)
    p.write_bytes(pickle.dumps({"a": 1, "b": 2}))
    assert restricted_load_dict(str(p), int) == {"a": 1, "b": 2}
