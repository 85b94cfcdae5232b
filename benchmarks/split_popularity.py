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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_cdsr.data.atomic import AtomicFileError, read_item_titles, read_rows  # noqa: E402
from recbole_cdsr.data.candidates import draw_candidates  # noqa: E402
from recbole_cdsr.evaluation.protocol import full_ranks, instance_metric, sampled_ranks  # noqa: E402


def pop_ranks(counts, tokens, domains, targets, hists, neg_num, seed):
    """``{protocol: ranks}`` of ``targets`` under the popularity score, ranked by the
    protocol's own functions (``tokens`` sorted, as ``draw_candidates`` orders them)."""
    _, neg, tgt = draw_candidates(tokens, domains, targets, hists, neg_num, seed, False)
    # a score row as the protocol sees one: column 0 the padding item, then the items
    row = torch.as_tensor(np.r_[-1, counts], dtype=torch.float32)
    scores = row.expand(len(tgt), -1)
    tgt_t = torch.as_tensor(tgt + 1)
    in_dom = torch.as_tensor(np.c_[np.zeros((len(tgt), 1), bool), domains[None, :] == domains[tgt][:, None]])
    return {"sampled": sampled_ranks(scores, tgt_t, torch.as_tensor(neg + 1, dtype=torch.long)).numpy(),
            "full": full_ranks(scores, tgt_t, in_dom).numpy()}


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
    try:
        item_tokens, item_domains, _ = read_item_titles(path("item"))
        splits = {s: read_rows(path(f"{s}.inter")) for s in ("train", "valid", "test")}
    except AtomicFileError as e:
        sys.exit(f"{e}; build the dataset with python -m dataset_converters first")
    order = np.argsort(item_tokens, kind="stable")  # draw_candidates' item order
    tokens, domains = item_tokens[order], item_domains[order]
    index = {t: i for i, t in enumerate(tokens)}
    seen = [index[x] for _, h, t in splits["train"] for x in h + [t]]
    counts = np.bincount(seen, minlength=len(tokens))

    print(f"{name}: popularity = count in the {len(splits['train']):,} training sequences; "
          f"sampled: {a.neg} negatives, seed {a.seed}; pessimistic ties")
    print(f"| split | domain | instances | median count of the target | sampled HR@{a.k} | "
          f"sampled NDCG@{a.k} | full HR@{a.k} | full NDCG@{a.k} |")
    print("|---|---|---|---|---|---|---|---|")
    pop = {}
    for split in ("valid", "test"):
        hists, targets = [h for _, h, _ in splits[split]], np.array([t for _, _, t in splits[split]])
        ranks = pop_ranks(counts, tokens, domains, targets, hists, a.neg, a.seed)
        tgt = np.array([index[t] for t in targets])
        tdom, tcount = domains[tgt], counts[tgt]
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
