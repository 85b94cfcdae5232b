"""How good is LLMCDSR's recall, before any training of the recall network?

    python benchmarks/llmcdsr_recall_quality.py --data_path dataset [--pretrain_seed 2020] [--users 2000]

Two measurements on the stage-1 and stage-2 artefacts that a run of LLMCDSR uses (built, or
reused from the cache, with the run's defaults):

1. Stage 2's text-to-item mapping. For every item i of a domain D, its title vector t_i is
   projected, W_D t_i, and the items of D are ranked by cosine with it against the
   pre-trained embeddings E_D (the recall's own rule): "self-recall@10" is the share of
   items found among their own title's 10 nearest. A random ranking gives 10 / |D|.
2. The recall of cross-domain items for a user known on one side only. Overlapped training
   users stand in for single-domain users: their D titles go through the retrieval
   stand-in (the user itself is left out of its neighbours), the names are embedded,
   projected with W_{D'}, mean-pooled (the poolers start at zero, i.e. as a mean) and the
   10 nearest items of E_{D'} are recalled. Printed: the share of users with at least one
   recalled item among their real D' items (HR@10) and the share of recalled items that are
   (precision@10), against 10 random D' items and the 10 most popular D' items of training.

Prints a table per domain; nothing is written.
"""

import argparse
import os
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--pretrain_seed", type=int, default=2020)
    ap.add_argument("--users", type=int, default=2000, help="overlapped users per direction (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings, read_item_titles
    from recbole_cdsr.llm.retrieval import CachedEncoder, RetrievalBackend
    from recbole_cdsr.data.atomic import read_training_sequences
    from recbole_cdsr.stages.llmcdsr_inputs import stage1_inputs
    from recbole_cdsr.stages.llmcdsr import prepare as prepare_llmcdsr

    cfg = CDSRConfig("LLMCDSR", args.dataset, config_dict={
        "data_path": args.data_path, "pretrain_seed": args.pretrain_seed, "show_progress": False,
        "use_gpu": False, "state": "WARNING"})
    t0 = time.time()
    print("stages 1 and 2 (built or reused from the cache) ...", flush=True)
    updates, _ = prepare_llmcdsr(cfg)
    d, name = cfg["data_path"], args.dataset
    enc = TextEncoder(cfg["text_encoder"], device="cpu")
    items = read_item_titles(os.path.join(d, f"{name}.item"))
    tokens, domains, text = item_text_embeddings(d, name, enc, items=items)
    titles = items[2]
    known = dict(zip(titles, text))
    tables = {}
    for dom, path in updates["recall_tables"].items():
        with np.load(path, allow_pickle=False) as z:
            emb = z["item_emb"]
            tables[dom] = {"E": emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12), "W": z["proj"],
                           "tokens": z["item_tokens"].astype(str)}
    doms = sorted(tables)
    row_of = {dom: {t: i for i, t in enumerate(tables[dom]["tokens"])} for dom in doms}
    title_of = dict(zip(tokens, titles))
    seqs = read_training_sequences(d, name)
    dom_of = dict(zip(tokens, domains))

    def recall(dom, vectors, k=10):
        """Rows of E_dom nearest (cosine) to each projected vector."""
        q = vectors @ tables[dom]["W"].T
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        return np.argsort(-(q @ tables[dom]["E"].T), axis=1, kind="stable")[:, :k]

    print(f"\nstage 2: self-recall@10 of every item from its own title (ready after {time.time() - t0:.0f} s)")
    print("| domain | items | self-recall@10 | random |")
    print("|---|---|---|---|")
    for dom in doms:
        toks = tables[dom]["tokens"]
        vec = np.asarray([known[title_of[t]] for t in toks], dtype=np.float32)
        hits = 0
        for i in range(0, len(toks), 2048):
            top = recall(dom, vec[i : i + 2048])
            hits += int((top == np.arange(i, min(i + 2048, len(toks)))[:, None]).any(1).sum())
        print(f"| {dom} | {len(toks)} | {hits / len(toks):.4f} | {10 / len(toks):.5f} |", flush=True)

    # popularity of each domain's items in training
    pop = {dom: np.zeros(len(tables[dom]["tokens"])) for dom in doms}
    for seq in seqs.values():
        for t in seq:
            pop[dom_of[t]][row_of[dom_of[t]][t]] += 1
    users, overlapped = stage1_inputs(d, name, items=items, sequences=seqs)
    rng = np.random.default_rng(args.seed)
    print(f"\nrecall for overlapped training users seen on one side only ({cfg['retrieval_neighbours']} "
          f"neighbours, at most {cfg['llm_max_names']} names, mean pooling)")
    print("| from -> to | users | recall HR@10 | recall precision@10 | popular HR@10 | popular precision@10 | random HR@10 |")
    print("|---|---|---|---|---|---|---|")
    for src in doms:
        dst = [x for x in doms if x != src][0]
        pairs = [(s, t) for s, t in overlapped[src] if s and t]
        pick = np.arange(len(pairs)) if not args.users else rng.choice(len(pairs), min(args.users, len(pairs)), replace=False)
        stats = {"rec": [0, 0], "pop": [0, 0], "rnd": [0, 0]}
        top_pop = np.argsort(-pop[dst], kind="stable")[:10]
        n_dst = len(tables[dst]["tokens"])
        title_rows = {}
        for t, r in row_of[dst].items():
            title_rows.setdefault(title_of[t], set()).add(r)
        for n_done, i in enumerate(pick):
            own, truth_titles = pairs[i]
            truth = set().union(*(title_rows.get(x, set()) for x in truth_titles))
            backend = _stand_in(RetrievalBackend, enc, known, src, pairs, cfg, i)  # without this user
            names = backend.generate_requests([{"domain": src, "titles": own}])[0].names
            if len(names) <= 2:
                continue
            vec = CachedEncoder(enc, known).encode(names).mean(0, keepdims=True)
            got = set(recall(dst, vec)[0].tolist())
            rnd = set(rng.choice(n_dst, 10, replace=False).tolist())
            for key, s in (("rec", got), ("pop", set(top_pop.tolist())), ("rnd", rnd)):
                stats[key][0] += bool(s & truth)
                stats[key][1] += len(s & truth) / 10
            if (n_done + 1) % 500 == 0:
                print(f"  {src} -> {dst}: {n_done + 1}/{len(pick)} users", file=sys.stderr, flush=True)
        n = len(pick)
        print(f"| {src} -> {dst} | {n} | {stats['rec'][0] / n:.4f} | {stats['rec'][1] / n:.4f} | "
              f"{stats['pop'][0] / n:.4f} | {stats['pop'][1] / n:.4f} | {stats['rnd'][0] / n:.4f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")


_POOLS = {}


def _stand_in(cls, enc, known, src, pairs, cfg, left_out):
    """The retrieval stand-in over every overlapped user of ``pairs`` but ``left_out`` (its
    neighbour keys are computed once per source domain; leaving one user out masks one row)."""
    key = (src, id(pairs))
    if key not in _POOLS:
        _POOLS[key] = cls(enc, {src: pairs}, cfg["retrieval_neighbours"], cfg["llm_max_names"], title_vectors=known)
    full = _POOLS[key]

    class LeaveOneOut:
        def generate_requests(self, requests):
            keys, targets = full.pool[src]
            mask = np.ones(len(keys), dtype=bool)
            mask[left_out] = False
            full.pool[src] = (keys[mask], [t for j, t in enumerate(targets) if j != left_out])
            try:
                return full.generate_requests(requests)
            finally:
                full.pool[src] = (keys, targets)

    return LeaveOneOut()


if __name__ == "__main__":
    main()
