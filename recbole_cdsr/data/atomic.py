"""Plain readers of the converted atomic files, for the stages that run before RecBole
loads a dataset (titles for prompts and text vectors, training sequences for pre-training
and retrieval, per-user rows for profiles)."""

import json
import os


class AtomicFileError(ValueError):
    """An atomic file that is missing, lacks a column, or has a malformed line."""


def read_rows(path):
    """``[(user, [history items], target)]`` of an ``.inter`` file, in file order."""
    if not os.path.isfile(path):
        raise AtomicFileError(f"{path} is missing (convert the dataset first)")
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = {c.split(":")[0]: i for i, c in enumerate(header)}
        for need in ("user_id", "item_id_list", "item_id"):
            if need not in cols:
                raise AtomicFileError(f"{path}: missing column {need}")
        for no, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                raise AtomicFileError(f"{path}, line {no}: expected {len(header)} columns, got {len(parts)}")
            rows.append((parts[cols["user_id"]], parts[cols["item_id_list"]].split(), parts[cols["item_id"]]))
    return rows


def read_training_sequences(dataset_dir, name):
    """``{user token: [item tokens]}`` of the training file (history then last item)."""
    path = os.path.join(dataset_dir, f"{name}.train.inter")
    return {user: hist + [target] for user, hist, target in read_rows(path)}


def read_item_titles(item_path):
    """(tokens, domains, titles) of a ``.item`` file, in file order (CSV quoting honoured)."""
    import pandas as pd

    try:
        df = pd.read_csv(item_path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    except (OSError, ValueError) as e:
        raise AtomicFileError(f"{item_path}: cannot read item file ({e})") from None
    cols = {c.split(":")[0]: c for c in df.columns}
    for f in ("item_id", "domain", "title"):
        if f not in cols:
            raise AtomicFileError(f"{item_path}: missing column {f} (convert the release again)")
    return (
        df[cols["item_id"]].to_numpy().astype(str),
        df[cols["domain"]].to_numpy().astype(str),
        df[cols["title"]].to_numpy().astype(str),
    )


def domain_labels(dataset_dir, name):
    """Domain token -> readable name (the converter's manifest), else an empty dict."""
    path = os.path.join(dataset_dir, f"{name}.manifest.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            doms = json.load(f).get("domains") or {}
        return {str(k): str(v) for k, v in doms.items()}
    return {}
