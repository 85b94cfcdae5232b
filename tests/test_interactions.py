"""The generic converter (``python -m dataset_converters interactions``): a hand-made log
checked row by row, the Food-Kitchen release round trip, a dataset without single-domain
users trained through the one command, and bad logs."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import run_recbole_cdsr
from dataset_converters import ConversionError, convert_interactions
from dataset_converters.interactions import main as interactions_main
from recbole_cdsr.data.atomic import read_item_titles, read_rows

from conftest import REPO

EXAMPLE = os.path.join(REPO, "tests", "data", "two-domain-log.csv")

# 25 interactions of 7 users, rows not in time order for u2 and u6 (ties at t=3 for u6 keep
# the file order: k2 before k1). With 2-core per domain and per item: f3 and k3 (1 interaction
# each) go, u5 (one Food, one Kitchen interaction) goes, u7 loses its only Kitchen row.
HAND_LOG = """user,item,domain,timestamp
u1,f1,Food,1
u1,k1,Kitchen,2
u1,f2,Food,3
u1,k2,Kitchen,4
u1,f1,Food,5
u2,k1,Kitchen,3
u2,f1,Food,1
u2,f2,Food,2
u2,k2,Kitchen,4
u3,f2,Food,1
u3,f1,Food,2
u3,f3,Food,3
u4,k1,Kitchen,1
u4,k2,Kitchen,2
u4,k3,Kitchen,3
u5,f1,Food,1
u5,k1,Kitchen,2
u6,f2,Food,1
u6,f1,Food,2
u6,k2,Kitchen,3
u6,k1,Kitchen,3
u6,k2,Kitchen,5
u7,f4,Food,1
u7,f4,Food,2
u7,k1,Kitchen,3
"""
HAND_ITEMS = """item\ttitle\tdomain
f1\tRolled &amp; toasted oats\tFood
f2\tWild honey\tFood
f3\tRye bread\tFood
f4\tGreen tea\tFood
k1\tKettle\tKitchen
k2\tTeapot, "glass"\tKitchen
"""


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _digest(d):
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in sorted(os.listdir(d))}


def test_hand_made_log_leave_last_every_row(tmp_path):
    log = _write(tmp_path, "log.csv", HAND_LOG)
    items = _write(tmp_path, "items.tsv", HAND_ITEMS)
    m = convert_interactions(log, str(tmp_path / "out"), "hand", items_path=items, decode_html=True,
                             min_user_interactions=2, min_item_interactions=2, split="leave-last")
    d = tmp_path / "out" / "hand"
    # items: A (Food) then B (Kitchen), sorted; f3 and k3 filtered; titles cleaned
    assert _lines(d / "hand.item") == [
        "item_id:token\tdomain:token\ttitle:token_seq",
        "f1\tA\tRolled & toasted oats",
        "f2\tA\tWild honey",
        "f4\tA\tGreen tea",
        "k1\tB\tKettle",
        "k2\tB\t\"Teapot, \"\"glass\"\"\"",
    ]
    assert read_item_titles(str(d / "hand.item"))[2][-1] == 'Teapot, "glass"'
    # u1, u2, u6 are overlapped with >= 3 interactions: last -> test, the one before -> valid,
    # the rest trains (u2's rest is Food only); u3, u4, u7 train whole; u5 is gone
    assert _lines(d / "hand.train.inter")[1:] == [
        "u1\tf1 k1\tf2",
        "u2\tf1\tf2",
        "u3\tf2\tf1",
        "u4\tk1\tk2",
        "u6\tf2 f1\tk2",
        "u7\tf4\tf4",
    ]
    assert _lines(d / "hand.valid.inter")[1:] == [
        "u1\tf1 k1 f2\tk2",
        "u2\tf1 f2\tk1",
        "u6\tf2 f1 k2\tk1",
    ]
    assert _lines(d / "hand.test.inter")[1:] == [
        "u1\tf1 k1 f2 k2\tf1",
        "u2\tf1 f2 k1\tk2",
        "u6\tf2 f1 k2 k1\tk2",
    ]
    assert _lines(d / "hand.user") == [
        "user_id:token\tuser_kind:token\tsplit:token",
        "u1\toverlapped\ttrain,valid,test",
        "u2\tsingle-A\ttrain,valid,test",
        "u3\tsingle-A\ttrain",
        "u4\tsingle-B\ttrain",
        "u6\toverlapped\ttrain,valid,test",
        "u7\tsingle-A\ttrain",
    ]
    c = m["counts"]
    assert (c["interactions_read"], c["users_read"], c["interactions_kept"], c["users_kept"]) == (25, 7, 20, 6)
    assert c["k_core_passes"] == 2
    assert (c["items_A"], c["items_B"], c["train_A"], c["train_B"], c["train_overlap"]) == (3, 2, 3, 1, 2)
    assert (c["valid_target_A"], c["valid_target_B"], c["test_target_A"], c["test_target_B"]) == (0, 3, 1, 2)
    assert m["domains"] == {"A": "Food", "B": "Kitchen"}
    o = m["options"]
    assert (o["split"], o["order"], o["min_user_interactions"], o["min_item_interactions"]) == ("leave-last", "time", 2, 2)
    # a rerun gives the same bytes
    before = _digest(d)
    convert_interactions(log, str(tmp_path / "out"), "hand", items_path=items, decode_html=True,
                         min_user_interactions=2, min_item_interactions=2, split="leave-last")
    assert _digest(d) == before
    # without --decode-html the titles stay as given
    convert_interactions(log, str(tmp_path / "raw"), "hand", items_path=items, split="leave-last")
    assert _lines(tmp_path / "raw" / "hand" / "hand.item")[1] == "f1\tA\tRolled &amp; toasted oats"


def test_hand_made_log_heldout_users_file_and_seeded_draw(tmp_path):
    log = _write(tmp_path, "log.csv", HAND_LOG)
    ev = _write(tmp_path, "eval.csv", "user,split\nu6,valid\nu1,test\nu5,test\n")
    convert_interactions(log, str(tmp_path / "out"), "held", split="heldout", eval_users_file=ev)
    d = tmp_path / "out" / "held"
    # no filter: u5 stays; held-out users give their whole sequence (last = target), nothing trains on them
    assert _lines(d / "held.valid.inter")[1:] == ["u6\tf2 f1 k2 k1\tk2"]
    assert _lines(d / "held.test.inter")[1:] == ["u1\tf1 k1 f2 k2\tf1", "u5\tf1\tk1"]
    assert [r[0] for r in read_rows(str(d / "held.train.inter"))] == ["u2", "u3", "u4", "u7"]
    assert _lines(d / "held.train.inter")[4] == "u7\tf4 f4\tk1"
    assert _lines(d / "held.item")[1:4] == ["f1\tA\t", "f2\tA\t", "f3\tA\t"]
    # a draw: 4 of the 5 overlapped users (u1 u2 u5 u6 u7), 2 valid + 2 test, same for the same seed
    draws = []
    for k in range(2):
        convert_interactions(log, str(tmp_path / f"d{k}"), "draw", split="heldout", eval_users=4, seed=7)
        draws.append(_digest(tmp_path / f"d{k}" / "draw"))
        v = read_rows(str(tmp_path / f"d{k}" / "draw" / "draw.valid.inter"))
        t = read_rows(str(tmp_path / f"d{k}" / "draw" / "draw.test.inter"))
        assert len(v) == 2 and len(t) == 2
        assert {r[0] for r in v + t} < {"u1", "u2", "u5", "u6", "u7"}
    assert draws[0] == draws[1]
    convert_interactions(log, str(tmp_path / "d2"), "draw", split="heldout", eval_users="0.4", seed=8)
    assert len(read_rows(str(tmp_path / "d2" / "draw" / "draw.test.inter"))) == 1  # round(0.4 * 5) = 2: 1 + 1


def test_split_column_several_targets_no_single_domain_users(tmp_path):
    log = _write(tmp_path, "log.tsv", "\n".join([
        "uid\titem\tcategory\torder\tsplit",
        "a\tx1\tMovies\t1\ttrain",
        "a\ty1\tBooks\t2\ttrain",
        "a\tx2\tMovies\t3\tvalid",
        "a\ty2\tBooks\t4\ttest",
        "a\tx3\tMovies\t5\ttest",
        "b\ty1\tBooks\t1\ttrain",
        "b\tx1\tMovies\t2\ttrain",
        "b\ty2\tBooks\t3\ttrain",
        "b\tx2\tMovies\t4\ttest",
        "c\ty2\tBooks\t1\thistory",
        "c\tx1\tMovies\t2\thistory",
        "c\ty1\tBooks\t3\ttest",
    ]) + "\n")
    m = convert_interactions(log, str(tmp_path / "out"), "col", columns="user=uid,domain=category",
                             split="column", domains=["Movies", "Books"])
    d = tmp_path / "out" / "col"
    assert m["domains"] == {"A": "Movies", "B": "Books"}
    assert _lines(d / "col.train.inter")[1:] == ["a\tx1\ty1", "b\ty1 x1\ty2"]
    assert _lines(d / "col.valid.inter")[1:] == ["a\tx1 y1\tx2"]
    # two test targets of user a, each with everything before it as its history
    # c is held out: its history rows give context and no training row
    assert _lines(d / "col.test.inter")[1:] == ["a\tx1 y1 x2\ty2", "a\tx1 y1 x2 y2\tx3", "b\ty1 x1 y2\tx2",
                                                "c\ty2 x1\ty1"]
    assert _lines(d / "col.user")[1:] == ["a\toverlapped\ttrain,valid,test", "b\toverlapped\ttrain,test",
                                          "c\toverlapped\ttest"]
    assert _lines(d / "col.item")[1:] == ["x1\tA\t", "x2\tA\t", "x3\tA\t", "y1\tB\t", "y2\tB\t"]
    assert m["counts"]["train_A"] == m["counts"]["train_B"] == 0 and m["counts"]["train_overlap"] == 2


def _bad(tmp_path, text, *args, name="bad.csv"):
    path = _write(tmp_path, name, text)
    return path, interactions_main([path, "--out", str(tmp_path / "o"), "--name", "bad", *args])


@pytest.mark.parametrize("text,args,expect", [
    ("user,item,timestamp\nu,i,1\n", [], "line 1: missing column 'domain'"),
    ("user,item,domain,timestamp\nu,i,Food,1\nu,j,Kitchen,2\nv,k,Toys,3\n", [], "line 4: a third domain 'Toys'"),
    ("user,item,domain\nu,i,Food\nu,j,Garden\n", ["--domains", "Food,Kitchen"], "line 3: unknown domain 'Garden'"),
    ("user,item,domain,timestamp\nu,i,Food,5\nu,j,Kitchen,3\n", ["--order", "file"], "line 3: user 'u''s timestamp goes back in time"),
    ("user,item,domain\nu,i,Food\nv,j,Kitchen\nv,i,Kitchen\n", [], "line 4: item 'i' is in domain 'Kitchen' here but in 'Food' at"),
    ("user,item,domain\nu,i,Food\nu,j\n", [], "line 3: expected 3 fields"),
    ("user,item,domain,timestamp\nu,i,Food,yesterday\n", [], "line 2: timestamp 'yesterday'"),
    ("user,item,domain\nu,i j,Food\n", [], "line 2: item 'i j' contains whitespace"),
])
def test_bad_logs_name_file_and_line(tmp_path, capsys, text, args, expect):
    path, rc = _bad(tmp_path, text, *args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1 and f"{path}, {expect}" in err, err
    assert not (tmp_path / "o" / "bad").exists()


def test_bad_options_and_split_rules(tmp_path):
    log = _write(tmp_path, "log.csv", HAND_LOG)
    with pytest.raises(ConversionError, match="--eval-users 9: only 5 users can be evaluated"):
        convert_interactions(log, str(tmp_path), "x", eval_users=9)
    with pytest.raises(ConversionError, match="line 2: split 'later' must be valid or test"):
        convert_interactions(log, str(tmp_path), "x", eval_users_file=_write(tmp_path, "e.csv", "user,split\nu1,later\n"))
    with pytest.raises(ConversionError, match="missing column 'split'"):
        convert_interactions(log, str(tmp_path), "x", split="column")
    with pytest.raises(ConversionError, match="--file-domains gives 1 domains for 2 log files"):
        convert_interactions([log, log], str(tmp_path), "x", file_domains=["Food"])
    with pytest.raises(ConversionError, match="--min-user-interactions 0"):
        convert_interactions(log, str(tmp_path), "x", min_user_interactions=0)
    miss = str(tmp_path / "nope.csv")
    with pytest.raises(ConversionError, match=f"{miss}: interaction file not found"):
        convert_interactions(miss, str(tmp_path), "x")


def test_one_file_per_domain_without_domain_column(tmp_path):
    """Amazon-style per-category files (no domain column): each file names its domain."""
    food = _write(tmp_path, "food.csv", "reviewerID,asin,unixReviewTime\nu1,f1,10\nu1,f2,30\nu2,f1,5\nu2,f2,6\n")
    kitchen = _write(tmp_path, "kitchen.csv", "reviewerID,asin,unixReviewTime\nu1,k1,20\nu2,k1,7\nu3,k1,1\nu3,k2,2\n")
    m = convert_interactions([food, kitchen], str(tmp_path / "o"), "amz", file_domains=["Food", "Kitchen"],
                             columns="user=reviewerID,item=asin,timestamp=unixReviewTime", split="leave-last")
    d = tmp_path / "o" / "amz"
    assert _lines(d / "amz.test.inter")[1:] == ["u1\tf1 k1\tf2", "u2\tf1 f2\tk1"]
    assert _lines(d / "amz.train.inter")[1:] == ["u3\tk1\tk2"]
    assert m["options"]["file_domains"] == ["Food", "Kitchen"]
    # the same files without their header line (as Amazon's ratings files come), named by --header
    for p in (food, kitchen):
        with open(p, encoding="utf-8") as f:
            body = f.read().split("\n", 1)[1]
        with open(p, "w", encoding="utf-8") as f:
            f.write(body)
    rc = interactions_main([food, kitchen, "--out", str(tmp_path / "o2"), "--name", "amz", "--header",
                            "user,item,timestamp", "--file-domains", "Food,Kitchen", "--split", "leave-last"])
    assert rc == 0
    for f in ("amz.train.inter", "amz.valid.inter", "amz.test.inter", "amz.item"):
        assert _lines(tmp_path / "o2" / "amz" / f) == _lines(d / f)


def test_example_file_converts_through_the_module_command(tmp_path):
    with open(EXAMPLE, encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 20
    proc = subprocess.run(
        [sys.executable, "-m", "dataset_converters", "interactions", EXAMPLE, "--out", str(tmp_path),
         "--name", "example", "--split", "leave-last"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    counts = json.loads(proc.stdout)
    # a line per step on stderr
    assert "] read 19 interactions" in proc.stderr
    assert "] split (leave-last): 5 training rows, 4 validation and 4 test instances; writing" in proc.stderr
    assert counts["domains"] == {"A": "Food", "B": "Kitchen"}
    assert (counts["users_kept"], counts["valid"], counts["test"]) == (5, 4, 4)
    assert _lines(tmp_path / "example" / "example.test.inter")[1] == "ann\toats kettle honey teapot\tgreen-tea"


@pytest.mark.slow
def test_food_kitchen_release_as_a_log_gives_the_release_rows(tmp_path, fk_data):
    """The converted release written out as an interaction log (user, item, domain, order)
    and an item file, converted with the held-out users of the release: the same training
    sequences, the same evaluation instances, the same item domains and titles."""
    src = os.path.join(fk_data, "food-kitchen")
    tokens, domains, titles = read_item_titles(os.path.join(src, "food-kitchen.item"))
    dom_name = {"A": "Grocery and Gourmet Food", "B": "Home and Kitchen"}
    dom = dict(zip(tokens, domains))
    rows = {s: read_rows(os.path.join(src, f"food-kitchen.{s}.inter")) for s in ("train", "valid", "test")}
    log = tmp_path / "log.tsv"
    with open(log, "w", encoding="utf-8") as f:
        f.write("user\titem\tdomain\torder\n")
        for split in ("train", "valid", "test"):
            for user, hist, target in rows[split]:
                for k, item in enumerate(hist + [target]):
                    f.write(f"{user}\t{item}\t{dom_name[dom[item]]}\t{k}\n")
    import csv

    with open(tmp_path / "items.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title"])
        w.writerows(zip(tokens, titles))
    with open(tmp_path / "eval.csv", "w", encoding="utf-8") as f:
        f.write("user,split\n" + "".join(f"{u},{s}\n" for s in ("valid", "test") for u, _, _ in rows[s]))
    m = convert_interactions(str(log), str(tmp_path / "out"), "fk-log", items_path=str(tmp_path / "items.csv"),
                             domains=[dom_name["A"], dom_name["B"]], split="heldout",
                             eval_users_file=str(tmp_path / "eval.csv"))
    out = tmp_path / "out" / "fk-log"
    for split in ("train", "valid", "test"):
        assert read_rows(str(out / f"fk-log.{split}.inter")) == rows[split], split
    c = m["counts"]
    assert (c["train_A"], c["train_B"], c["train_overlap"], c["valid"], c["test"]) == (5472, 38191, 7501, 960, 937)
    assert (c["test_target_A"], c["test_target_B"]) == (300, 637)
    g_tokens, g_domains, g_titles = read_item_titles(str(out / "fk-log.item"))
    release = {t: (d, ti) for t, d, ti in zip(tokens, domains, titles)}
    used = {i for split in rows.values() for _, h, t in split for i in h + [t]}
    assert set(g_tokens) == used
    assert all(release[t] == (d, ti) for t, d, ti in zip(g_tokens, g_domains, g_titles))
    assert m["domains"] == {"A": "Grocery and Gourmet Food", "B": "Home and Kitchen"}


def _all_overlapped_log(path, n_users=160, n_items=30, seed=0, split_column=False):
    """Every user walks two item rings (Food f0.., Kitchen k0..) in step, switching domain at
    random: no single-domain user, the next item predictable. With ``split_column``, each
    user's last interaction of each domain is a test target (two per user) and the one
    before the first of them a validation target."""
    rng = np.random.RandomState(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("user,item,domain,timestamp" + (",split" if split_column else "") + "\n")
        for u in range(n_users):
            pos, t = rng.randint(n_items), 0
            # the first two in both domains: every training row (all but the last two) is too
            doms = list(rng.permutation(["Food", "Kitchen"])) + list(rng.choice(["Food", "Kitchen"], size=rng.randint(4, 10)))
            doms += ["Food", "Kitchen"] if split_column else []
            tests = {max(k for k, d in enumerate(doms) if d == x) for x in ("Food", "Kitchen")}
            for k, d in enumerate(doms):
                pos = (pos + 1) % n_items
                mark = "test" if k in tests else "valid" if k == min(tests) - 1 else "train"
                f.write(f"user{u},{d[0].lower()}{pos},{d},{t}" + (f",{mark}" if split_column else "") + "\n")
                t += 1


@pytest.mark.slow
@pytest.mark.parametrize("model,extra", [("SASRec", []), ("LLMCDSR", ["--llmcdsr_mode=backbone_only"]), ("LLMCDSR", [])])
def test_dataset_without_single_domain_users_trains_through_the_one_command(tmp_path, model, extra):
    log = tmp_path / "log.csv"
    _all_overlapped_log(log)
    data = tmp_path / "data"
    m = convert_interactions(str(log), str(data), "both", split="leave-last")
    assert m["counts"]["train_A"] == m["counts"]["train_B"] == 0
    rc = run_recbole_cdsr.main([
        f"--model={model}", "--dataset=both", f"--data_path={data}", f"--results_dir={tmp_path / 'res'}",
        f"--checkpoint_dir={tmp_path / 'saved'}", "--epochs=20", "--train_batch_size=64", "--eval_neg_num=20", "--show_progress=False",
        "--state=WARNING", *extra,
    ])
    assert rc == 0
    (res_file,) = os.listdir(tmp_path / "res")
    res = json.loads((tmp_path / "res" / res_file).read_text())
    assert res["instances"]["test"]["A"] + res["instances"]["test"]["B"] == 160
    assert res["domains"] == {"A": "Food", "B": "Kitchen"}
    if model == "LLMCDSR":
        # nobody to augment: the full method says so, skips its stages and trains its backbone
        assert res["config"]["llmcdsr_mode"] == "backbone_only"
        assert (res["stages"]["stages"] == "skipped (backbone_only)") == bool(extra)
        assert bool(extra) or "no single-domain training users" in res["stages"]["stages"]
    for p in ("sampled", "full"):
        assert 0.0 <= res["test"][p]["A/hit@10"] <= 1.0
    # the rings make the next item predictable: better than chance (10 of 21 candidates)
    assert res["test"]["sampled"]["overall/hit@10"] > 0.6


@pytest.mark.slow
def test_two_test_targets_per_user_train_and_rank_every_instance(tmp_path):
    log = tmp_path / "log.csv"
    _all_overlapped_log(log, split_column=True)
    data = tmp_path / "data"
    m = convert_interactions(str(log), str(data), "two", split="column")
    c = m["counts"]
    assert (c["valid"], c["test"], c["test_target_A"], c["test_target_B"]) == (160, 320, 160, 160)
    assert c["train_A"] == c["train_B"] == 0
    rc = run_recbole_cdsr.main([
        "--model=SASRec", "--dataset=two", f"--data_path={data}", f"--results_dir={tmp_path / 'res'}",
        f"--checkpoint_dir={tmp_path / 'saved'}", "--epochs=3", "--eval_neg_num=20", "--show_progress=False",
        "--state=WARNING",
    ])
    assert rc == 0
    (res_file,) = os.listdir(tmp_path / "res")
    res = json.loads((tmp_path / "res" / res_file).read_text())
    # every test row is ranked, each user twice (one target per domain), in file order
    assert res["instances"]["test"] == {"A": 160, "B": 160}
    assert len(res["test_instances"]["ranks"]["sampled"]) == 320
    test_rows = read_rows(str(data / "two" / "two.test.inter"))
    assert [r[0] for r in test_rows[:2]] == ["user0", "user0"]
    # user0 ends with a Food then a Kitchen interaction: its Food target first, whose history
    # the Kitchen target's history extends by that Food item
    assert res["test_instances"]["target_domain"][:2] == ["A", "B"]
    assert test_rows[1][1] == test_rows[0][1] + [test_rows[0][2]]
