"""A small synthetic cross-domain dataset in the same atomic files as the real releases.

For tests, smoke runs and benchmark dry runs: seconds to train on, yet with structure a
sequence model can learn. Each domain's items form a ring; a user walks along the ring of a
domain (next item = current + 1 with probability ``p_next``, else a random item of that
domain). Overlapped users walk both rings in step and switch domain at random, so the
position in one domain predicts the position in the other. Files, columns and user kinds
are those of ``convert_llmcdsr_release`` (``.item``, ``.user``, ``.{train,valid,test}.inter``,
``.manifest.json``); everything is written to a temporary folder and renamed into place.
"""

import json
import os
import random

from dataset_converters.llmcdsr_release import _write_text, sha256_file, staging

SYNTHETIC_VERSION = 1


def write_synthetic_cdsr(
    data_path,
    name="tiny-cdsr",
    n_items=(40, 60),
    n_train=(80, 80, 120),
    n_valid=60,
    n_test=60,
    min_len=4,
    max_len=12,
    p_next=0.8,
    seed=0,
):
    """Write ``data_path/name/`` and return its manifest.

    Args:
        n_items: items of domain A and of domain B.
        n_train: training users: single-domain A, single-domain B, overlapped.
        n_valid, n_test: overlapped evaluation users (one instance each).
        min_len, max_len: sequence lengths, target included.
        p_next: probability that the next item follows the ring.
    """
    n_a, n_b = (int(x) for x in n_items)
    if n_a < 2 or n_b < 2:
        raise ValueError(f"n_items needs at least 2 items per domain, got {n_items!r}")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    ids = {"A": [f"a{i}" for i in range(n_a)], "B": [f"b{i}" for i in range(n_b)]}
    size = {"A": n_a, "B": n_b}

    def walk(domains):
        n = rng.randint(min_len, max_len)
        pos = rng.random()  # position on the rings, as a fraction, shared by both domains
        seq, dom = [], rng.choice(domains)
        for _ in range(n):
            if len(domains) == 2 and rng.random() < 0.35:
                dom = "B" if dom == "A" else "A"
            if rng.random() < p_next:
                pos = (pos + 1.0 / min(n_a, n_b)) % 1.0
            else:
                pos = rng.random()
            seq.append(ids[dom][int(pos * size[dom]) % size[dom]])
        return seq

    users = ["user_id:token\tuser_kind:token\tsplit:token"]
    inter = {"train": [], "valid": [], "test": []}
    groups = [
        ("A", "single-A", "train", n_train[0], ["A"]),
        ("B", "single-B", "train", n_train[1], ["B"]),
        ("O", "overlapped", "train", n_train[2], ["A", "B"]),
        ("V", "overlapped", "valid", n_valid, ["A", "B"]),
        ("T", "overlapped", "test", n_test, ["A", "B"]),
    ]
    for prefix, kind, split, count, domains in groups:
        for u in range(1, int(count) + 1):
            seq = walk(domains)
            users.append(f"{prefix}_{u}\t{kind}\t{split}")
            inter[split].append(f"{prefix}_{u}\t{' '.join(seq[:-1])}\t{seq[-1]}")

    with staging(data_path, name) as tmp_dir:
        items = ["item_id:token\tdomain:token\ttitle:token_seq"]
        for dom in ("A", "B"):
            items += [f"{t}\t{dom}\tsynthetic item {t} of domain {dom}" for t in ids[dom]]
        _write_text(os.path.join(tmp_dir, f"{name}.item"), "\n".join(items) + "\n")
        _write_text(os.path.join(tmp_dir, f"{name}.user"), "\n".join(users) + "\n")
        header = "user_id:token\titem_id_list:token_seq\titem_id:token"
        for split, rows in inter.items():
            _write_text(os.path.join(tmp_dir, f"{name}.{split}.inter"), "\n".join([header] + rows) + "\n")
        manifest = {
            "converter": "synthetic",
            "converter_version": SYNTHETIC_VERSION,
            "dataset": name,
            "domains": {"A": "synthetic A", "B": "synthetic B"},
            "parameters": {
                "n_items": [n_a, n_b], "n_train": list(n_train), "n_valid": n_valid, "n_test": n_test,
                "min_len": min_len, "max_len": max_len, "p_next": p_next, "seed": seed,
            },
            "incomplete": False,
            "output_files_sha256": {f: sha256_file(os.path.join(tmp_dir, f)) for f in sorted(os.listdir(tmp_dir))},
        }
        _write_text(os.path.join(tmp_dir, f"{name}.manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
