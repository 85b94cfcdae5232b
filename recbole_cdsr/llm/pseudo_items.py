"""Pseudo items: stage-1 names embedded, stored next to the dataset, read by the dataset.

File ``<dataset>.pseudo-<tag>.npz`` (+ ``.json`` manifest):
``users`` (user tokens, str [U]), ``domains`` (the user's own domain, str [U]),
``offsets`` (int64 [U + 1]: user u owns rows ``index[offsets[u]:offsets[u + 1]]``),
``index`` (int32: rows of ``emb``), ``names`` (unique names, str [N]), ``emb`` (float32 [N, d]).
Names are deduplicated as exact strings (each embedded as given, as the public code embeds
each parsed name), so every distinct name is embedded once. Users with ``min_names`` or fewer
names are left out (no pseudo items).
``CDSRDataset`` loads the file named by the config key ``pseudo_items`` and exposes it as
``dataset.pseudo_items`` (tensors indexed by RecBole's internal user ids).
"""

import numpy as np

from recbole_cdsr.cache import Artefact, verified_manifest
from recbole_cdsr.llm.encoders import encode_in_parts

PSEUDO_FORMAT_VERSION = 2  # 2: the shared artefact manifest


class PseudoItemError(ValueError):
    pass


def pseudo_arrays(users, domains, offsets, index, names, emb):
    """The arrays of a pseudo-item file (layout in the module docstring)."""
    return {
        "users": np.asarray(users, dtype=str),
        "domains": np.asarray(domains, dtype=str),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "index": np.asarray(index, dtype=np.int32),
        "names": np.asarray(names, dtype=str),
        "emb": np.asarray(emb, dtype=np.float32),
    }


def write_pseudo_items(dataset_dir, dataset_name, records, encoder, source, min_names=2):
    """Embed the names of ``records`` (``{user: record}`` from a GenerationJob) and write
    them, or reuse the file built from the same ``source`` (what identifies the records),
    encoder and ``min_names``. Returns the npz path."""
    art = Artefact(dataset_dir, f"{dataset_name}.pseudo", {
        "format_version": PSEUDO_FORMAT_VERSION,
        "generation": source,
        "encoder": encoder.identity(),
        "min_names": min_names,
    })
    if art.cached("pseudo items"):
        return art.path
    users, domains, offsets, index = [], [], [0], []
    name_row = {}
    for user in sorted(records):
        r = records[user]
        if r.get("status") != "ok" or len(r.get("names") or []) <= min_names:
            continue
        users.append(user)
        domains.append(r["domain"])
        for n in r["names"]:
            n = str(n)
            if n not in name_row:
                name_row[n] = len(name_row)
            index.append(name_row[n])
        offsets.append(len(index))
    names = list(name_row)
    emb = encode_in_parts(encoder, names, art.path[:-4] + ".parts", what="stage 1: pseudo-item names")
    art.write_arrays(pseudo_arrays(users, domains, offsets, index, names, emb), users=len(users),
                     unique_names=len(names), dim=int(emb.shape[1]) if len(names) else encoder.dim)
    return art.path


def load_pseudo_items(path, user_token2id, n_users, max_per_user=None):
    """Tensors for a dataset: ``emb`` [N + 1, d] (row 0 = padding), ``index`` [n_users, K]
    (rows of ``emb``, 0 = none), ``count`` [n_users]. ``max_per_user``: keep the first N names
    of each user (K = N); None (or 0): keep all, as the public code does (K = the largest
    count among the dataset's users, at least 1). Checks the manifest's sha256 first."""
    import torch

    try:
        m = verified_manifest(path)
    except (OSError, ValueError) as e:
        raise PseudoItemError(f"pseudo_items: {e}; run stage 1 first") from None
    with np.load(path, allow_pickle=False) as z:
        users, offsets, index, emb = z["users"], z["offsets"], z["index"], z["emb"]
    if max_per_user is not None and int(max_per_user) < 0:
        raise PseudoItemError(f"pseudo_max_names must be a positive number or None (all names), got {max_per_user!r}")
    cap = int(max_per_user) if max_per_user else None
    owned = []  # (internal user id, rows of emb) of the dataset's users
    for u, tok in enumerate(users):
        uid = user_token2id.get(str(tok))
        if uid is None:
            continue  # a user the loaded dataset does not have (e.g. a slice)
        owned.append((uid, index[offsets[u] : offsets[u + 1]][:cap]))
    k = cap if cap is not None else max([1] + [len(rows) for _, rows in owned])
    idx = torch.zeros(n_users, k, dtype=torch.long)
    cnt = torch.zeros(n_users, dtype=torch.long)
    for uid, rows in owned:
        idx[uid, : len(rows)] = torch.from_numpy(rows.astype(np.int64) + 1)
        cnt[uid] = len(rows)
    table = torch.cat([torch.zeros(1, emb.shape[1]), torch.from_numpy(emb)])
    return {"emb": table, "index": idx, "count": cnt, "manifest": m}
