"""How popular the validation and test targets of a dataset are, and what that does to scores.

The public CDSR releases split *users*: validation and test are two different groups of
overlapped users. Where one group's targets are more popular items than the other's, every
model's validation score differs from its test score for a reason that is the data's, not
the model's. This script measures that with the popularity ranking (an item's score is its
count in the training sequences), scored by the evaluation protocol's own rules: the same
sampled candidates (``eval_neg_num`` negatives of the target's domain, ``eval_candidate_seed``)
and pessimistic ties; ``full`` ranks every item of the target's domain.

    python benchmarks/split_popularity.py --data dataset/food-kitchen
    python benchmarks/split_popularity.py --data dataset/food-kitchen \\
        --results benchmarks/results/food-kitchen-converged/results.jsonl

With ``--results``, it also prints each leaderboard row's test / validation ratio of the
selection-protocol HR@10 per domain (mean over its runs), beside the popularity ranking's.
"""

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_cdsr.data.candidates import draw_candidates  # noqa: E402
from recbole_cdsr.evaluation.protocol import instance_metric  # noqa: E402


def read_split(path):
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    cols = {c.split(":")[0]: c for c in df.columns}
    for f in ("item_id_list", "item_id"):
        if f not in cols:
            sys.exit(f"{path}: no column {f}; is this an atomic file of dataset_converters?")
    return [h.split() for h in df[cols["item_id_list"]]], df[cols["item_id"]].to_numpy()


def pop_ranks(counts, tokens, domains, targets, hists, neg_num, seed):
    """``{protocol: ranks}`` of ``targets`` under the popularity score, pessimistic ties."""
    _, neg, tgt = draw_candidates(tokens, domains, targets, hists, neg_num, seed, False)
    s_t = counts[tgt]
    sampled = 1 + (counts[neg] >= s_t[:, None]).sum(1)
    full = np.empty(len(tgt), dtype=np.int64)
    for d in np.unique(domains):
        pool = np.sort(counts[domains == d])
        sel = domains[tgt] == d
        # 1 + the items of the domain with a count >= the target's, the target itself not counted
        full[sel] = len(pool) - np.searchsorted(pool, s_t[sel], side="left")
    return {"sampled": sampled, "full": full}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder of atomic files, e.g. dataset/food-kitchen")
    p.add_argument("--neg", type=int, default=999, help="eval_neg_num (default 999)")
    p.add_argument("--seed", type=int, default=2024, help="eval_candidate_seed (default 2024)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--results", help="a benchmark's results.jsonl: print each row's test/validation ratio")
    a = p.parse_args()

    name = os.path.basename(os.path.normpath(a.data))
    path = lambda suffix: os.path.join(a.data, f"{name}.{suffix}")  # noqa: E731
    for s in ("item", "train.inter", "valid.inter", "test.inter"):
        if not os.path.exists(path(s)):
            sys.exit(f"missing {path(s)}: build the dataset with python -m dataset_converters first")
    items = pd.read_csv(path("item"), sep="\t", dtype=str, keep_default_na=False)
    icol = {c.split(":")[0]: c for c in items.columns}
    order = np.argsort(items[icol["item_id"]].to_numpy(), kind="stable")  # draw_candidates' item order
    tokens = items[icol["item_id"]].to_numpy()[order]
    domains = items[icol["domain"]].to_numpy()[order]
    index = {t: i for i, t in enumerate(tokens)}

    counts = np.zeros(len(tokens), dtype=np.int64)
    th, tt = read_split(path("train.inter"))
    for h, t in zip(th, tt):
        for x in h + [t]:
            counts[index[x]] += 1

    print(f"{name}: popularity = count in the {len(tt):,} training sequences; "
          f"sampled: {a.neg} negatives, seed {a.seed}; pessimistic ties")
    print(f"| split | domain | instances | median count of the target | sampled HR@{a.k} | "
          f"sampled NDCG@{a.k} | full HR@{a.k} | full NDCG@{a.k} |")
    print("|---|---|---|---|---|---|---|---|")
    pop = {}
    for split in ("valid", "test"):
        hists, targets = read_split(path(f"{split}.inter"))
        ranks = pop_ranks(counts, tokens, domains, targets, hists, a.neg, a.seed)
        tdom = domains[[index[t] for t in targets]]
        tcount = counts[[index[t] for t in targets]]
        for d in np.unique(domains):
            sel = tdom == d
            m = {(pr, mt): float(instance_metric(ranks[pr][sel], mt, a.k).mean())
                 for pr in ranks for mt in ("hit", "ndcg")}
            pop[(split, d)] = m
            print(f"| {split} | {d} | {sel.sum()} | {np.median(tcount[sel]):g} | {m['sampled', 'hit']:.4f} | "
                  f"{m['sampled', 'ndcg']:.4f} | {m['full', 'hit']:.4f} | {m['full', 'ndcg']:.4f} |")

    if a.results:
        doms = [str(d) for d in np.unique(domains)]
        ratios, proto = defaultdict(list), None
        with open(a.results) as fh:
            for line in fh:
                r = json.loads(line)
                if r.get("status") != "ok":
                    continue
                proto = proto or r["config"]["eval_protocol"][0]  # the selection protocol
                v, t = r["valid"][proto], r["test"][proto]
                ratios[r["name"]].append([t[f"{d}/hit@{a.k}"] / v[f"{d}/hit@{a.k}"] for d in doms])
        print(f"\ntest / validation {proto} HR@{a.k}, mean over each row's runs")
        print("| row | runs | " + " | ".join(doms) + " |")
        print("|---|---|" + "---|" * len(doms))
        print("| popularity ranking | - | " + " | ".join(
            f"{pop['test', d][proto, 'hit'] / pop['valid', d][proto, 'hit']:.2f}" for d in doms) + " |")
        for row, x in sorted(ratios.items(), key=lambda kv: np.mean(kv[1])):
            print(f"| {row} | {len(x)} | " + " | ".join(f"{c:.2f}" for c in np.mean(x, axis=0)) + " |")


if __name__ == "__main__":
    main()
