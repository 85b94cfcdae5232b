"""Inputs of stage 1 read from a converted dataset: users' titles, examples, prefixes."""

import os

from recbole_cdsr.llm.encoders import read_item_titles
from recbole_cdsr.llm.generation import GenerationError, make_requests

PREFIX_FILES = {"A": "candidate_generate_A_icl.txt", "B": "candidate_generate_B_icl.txt"}


def read_rows(path):
    """``[(user, [history items], target)]`` of an ``.inter`` file, in file order."""
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = {c.split(":")[0]: i for i, c in enumerate(header)}
        for need in ("user_id", "item_id_list", "item_id"):
            if need not in cols:
                raise GenerationError(f"{path}: missing column {need}")
        for no, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                raise GenerationError(f"{path}, line {no}: expected {len(header)} columns, got {len(parts)}")
            rows.append((parts[cols["user_id"]], parts[cols["item_id_list"]].split(), parts[cols["item_id"]]))
    return rows


def read_training_sequences(dataset_dir, name):
    """``{user token: [item tokens]}`` of the training file (history then last item)."""
    path = os.path.join(dataset_dir, f"{name}.train.inter")
    return {user: hist + [target] for user, hist, target in read_rows(path)}


def stage1_inputs(dataset_dir, name, items=None, sequences=None):
    """Single-domain users ``[(user, D, D titles)]`` and overlapped examples
    ``{D: [(D titles, D' titles)]}``, from the training file only. ``items`` and
    ``sequences``: ``read_item_titles`` / ``read_training_sequences`` results already read."""
    if items is None:
        items = read_item_titles(os.path.join(dataset_dir, f"{name}.item"))
    tokens, domains, titles = items
    info = {t: (d, ti) for t, d, ti in zip(tokens, domains, titles)}
    doms = sorted(set(domains.tolist()))
    if len(doms) != 2:
        raise GenerationError(f"{name}: expected two domains, found {doms}")
    users, overlapped = [], {d: [] for d in doms}
    if sequences is None:
        sequences = read_training_sequences(dataset_dir, name)
    for user, seq in sequences.items():
        by_dom = {d: [info[t][1] for t in seq if info[t][0] == d] for d in doms}
        present = [d for d in doms if by_dom[d]]
        if len(present) == 1:
            users.append((user, present[0], by_dom[present[0]]))
        else:
            a, b = doms
            overlapped[a].append((by_dom[a], by_dom[b]))
            overlapped[b].append((by_dom[b], by_dom[a]))
    return users, overlapped


def read_prefixes(dataset_dir):
    out = {}
    for dom, fname in PREFIX_FILES.items():
        path = os.path.join(dataset_dir, fname)
        if not os.path.isfile(path):
            raise GenerationError(f"{path} is missing: the prompt prefix of domain {dom} (from the release)")
        with open(path, encoding="utf-8") as f:
            out[dom] = f.read()
    return out


def stage1_requests(dataset_dir, name, shot, seed, with_prompts=True, items=None, sequences=None):
    users, overlapped = stage1_inputs(dataset_dir, name, items, sequences)
    if with_prompts:
        reqs = make_requests(users, overlapped, read_prefixes(dataset_dir), shot, seed)
    else:
        reqs = [{"user": u, "domain": d, "prompt": None} for u, d, _ in users]
    for r, (_, _, titles) in zip(reqs, users):
        r["titles"] = titles
    return reqs, overlapped
