"""Convert any two-domain interaction log to the plugin's RecBole atomic files.

Input: one or more delimited text files (CSV or TSV, with a header), one interaction per
row, with the columns

``user``       the user (any token without whitespace)
``item``       the item (any token without whitespace)
``domain``     the item's domain (exactly two distinct values in the whole log); a file
               without this column takes its domain from ``--file-domains``
``timestamp``  (or ``order``) optional: a number or an ISO 8601 date/time; orders each
               user's interactions
``split``      optional, only read with ``--split column``: ``train``, ``valid``, ``test``
               or ``history`` (in the histories of later targets, not trained on)

Other columns are ignored; ``--columns item=asin,user=reviewerID`` names the columns of a
file whose header differs, and ``--header user,item,rating,timestamp`` names the columns of
files without a header line (Amazon's per-category ratings files, one file per domain with
``--file-domains``). An optional item file (``--items``: ``item``, ``title`` and an
optional ``domain``) gives the titles that the LLM-enhanced models read (taken as given,
whitespace runs made one space; ``--decode-html`` also decodes entities such as ``&amp;``).

Preparation, in this order (every option is recorded in the manifest):

1. order: each user's interactions by timestamp (ties keep the file order) or, with
   ``--order file``, in the order of the files' rows (a timestamp column must then not go
   back in time within a user);
2. k-core per domain (``--min-user-interactions``, ``--min-item-interactions``), repeated
   until it holds: an item with fewer interactions than the item minimum is dropped, and a
   user's interactions in a domain are dropped when the user has fewer than the user minimum
   there (so the user may become single-domain); users left with fewer than 2 interactions
   are dropped;
3. evaluation (``--split``):

   ``heldout``     (the LLMCDSR release's protocol) some overlapped users are held out of
                   training whole; each gives one instance, its last interaction as the
                   target and everything before it as the history. Which users: a file
                   (``--eval-users-file``, rows ``user,split``) or ``--eval-users`` drawn with
                   ``--seed`` (default 20% of the overlapped users), half for validation, half
                   for test;
   ``leave-last``  (C2DSR's splits) every overlapped user with at least 3 interactions (or
                   ``--eval-users`` of them) gives a test instance (its last interaction) and
                   a validation instance (the one before it); it trains on the rest;
   ``column``      the log's ``split`` column says which interactions are validation or test
                   targets (several per user allowed); each target's history is the user's
                   interactions before it, and the user trains on its ``train`` rows
                   (``history`` rows only give context: a held-out user's history).

Output: the files of :mod:`dataset_converters.llmcdsr_release` (``.item``, ``.user``,
``.{train,valid,test}.inter``, ``.manifest.json``) with domain tokens ``A`` and ``B``; the
manifest names the domains (``{"A": "Food", "B": "Kitchen"}``), and runs, leaderboards and
plots carry those names. Written into a temporary folder and renamed into place; a rerun on
the same input gives the same bytes.
"""

import argparse
import csv
import datetime
import json
import os
import sys
import time

import numpy as np

from dataset_converters.llmcdsr_release import ConversionError, _write_text, clean_title, sha256_file, staging

CONVERTER_NAME = "interactions"
CONVERTER_VERSION = 1
SPLITS = ("heldout", "leave-last", "column")
ORDERS = ("time", "file")
COLUMNS = ("user", "item", "domain", "timestamp", "split")
ROW_SPLITS = ("train", "valid", "test", "history")
DEFAULT_HELDOUT_SHARE = 0.2
TOKENS = ("A", "B")


# -- reading ------------------------------------------------------------------------------
def _delimiter(path, first_line, delimiter):
    if delimiter in (None, "auto"):
        if "\t" in first_line:
            return "\t"
        if path.lower().endswith((".tsv", ".tab")):
            return "\t"
        return ","
    return {"tab": "\t", "\\t": "\t", "comma": ","}.get(delimiter, delimiter)


def _column_map(spec):
    """``"item=asin,user=reviewerID"`` -> ``{"item": "asin", "user": "reviewerID"}``."""
    out = {}
    for part in filter(None, (spec or "").split(",")):
        key, sep, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or key not in COLUMNS + ("title",) or not col:
            raise ConversionError(
                f"--columns: {part!r} is not FIELD=COLUMN with FIELD one of {', '.join(COLUMNS + ('title',))}"
            )
        out[key] = col
    return out


def _parse_time(value, where):
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConversionError(
            f"{where}: timestamp {value!r} is neither a number nor an ISO 8601 date/time"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def _check_token(value, what, where):
    if not value:
        raise ConversionError(f"{where}: empty {what}")
    if any(c.isspace() for c in value):
        raise ConversionError(f"{where}: {what} {value!r} contains whitespace (tokens must not)")


def _table(path, what, delimiter=None, names=None):
    """A delimited file with a header line (or the column ``names`` of one without): yields
    the header first, then ``(line number, fields)`` of every non-blank row, checking that
    each row has as many fields as the header."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: {what} not found")
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        if not first.strip():
            raise ConversionError(f"{path}, line 1: empty file or header (the header names the columns)")
        f.seek(0)
        reader = csv.reader(f, delimiter=_delimiter(path, first, delimiter))
        header = list(names) if names else [h.strip() for h in next(reader)]
        yield header
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ConversionError(
                    f"{path}, line {reader.line_num}: expected {len(header)} fields as the header, found {len(row)}")
            yield reader.line_num, row


def read_log(paths, columns=None, file_domains=None, delimiter=None, need_split=False, header=None):
    """Rows ``(user, item, domain, time or None, split or None, file, line)`` of the log
    files, in file order. ``header``: the column names of files that have no header line."""
    columns = dict(columns or {})
    if file_domains is not None and len(file_domains) != len(paths):
        raise ConversionError(
            f"--file-domains gives {len(file_domains)} domains for {len(paths)} log files: give one per file"
        )
    rows = []
    has_time = None
    for k, path in enumerate(paths):
        table = _table(path, "interaction file", delimiter, header)
        names = next(table)
        pos = {}
        for field in COLUMNS:
            name = columns.get(field, field)
            if name in names:
                pos[field] = names.index(name)
            elif field == "timestamp" and "timestamp" not in columns and "order" in names:
                pos[field] = names.index("order")
        need = ["user", "item"] + (["split"] if need_split else [])
        if file_domains is None:
            need.append("domain")
        for field in need:
            if field not in pos:
                name = columns.get(field, field)
                hint = " or give each file's domain with --file-domains" if field == "domain" else ""
                raise ConversionError(
                    f"{path}, line 1: missing column {name!r} ({'--header' if header else 'header'}: "
                    f"{', '.join(names)}); name it with --columns {field}=COLUMN{hint}"
                )
        file_has_time = "timestamp" in pos
        if has_time is None:
            has_time = file_has_time
        elif has_time != file_has_time:
            raise ConversionError(
                f"{path}, line 1: {'has' if file_has_time else 'lacks'} a timestamp column while "
                f"{paths[0]} {'lacks' if file_has_time else 'has'} one: every log file needs the same columns"
            )
        for no, row in table:
            where = f"{path}, line {no}"
            user, item = row[pos["user"]].strip(), row[pos["item"]].strip()
            _check_token(user, "user", where)
            _check_token(item, "item", where)
            dom = row[pos["domain"]].strip() if "domain" in pos else file_domains[k]
            if not dom:
                raise ConversionError(f"{where}: empty domain")
            t = _parse_time(row[pos["timestamp"]], where) if file_has_time else None
            split = None
            if need_split:
                split = row[pos["split"]].strip()
                if split not in ROW_SPLITS:
                    raise ConversionError(f"{where}: split {split!r} is not one of {', '.join(ROW_SPLITS)}")
            rows.append((user, item, dom, t, split, path, no))
    if not rows:
        raise ConversionError(f"{', '.join(paths)}: no interactions")
    return rows, bool(has_time)


def assign_domains(rows, domains=None):
    """``{domain name: token}`` (``A`` for the first name, ``B`` for the second) and
    ``{item: domain name}``; every item in one domain, exactly two domains."""
    item_dom, first_seen = {}, {}
    known = list(domains) if domains else None
    seen = []
    for user, item, dom, _, _, path, no in rows:
        if known is not None and dom not in known:
            raise ConversionError(f"{path}, line {no}: unknown domain {dom!r} (--domains: {', '.join(known)})")
        if dom not in seen:
            if known is None and len(seen) == 2:
                raise ConversionError(
                    f"{path}, line {no}: a third domain {dom!r} (the log already has {seen[0]!r} and "
                    f"{seen[1]!r}; a cross-domain dataset here has two)"
                )
            seen.append(dom)
        prev = item_dom.get(item)
        if prev is None:
            item_dom[item] = dom
            first_seen[item] = (path, no)
        elif prev != dom:
            p, n = first_seen[item]
            raise ConversionError(
                f"{path}, line {no}: item {item!r} is in domain {dom!r} here but in {prev!r} at {p}, line {n}: "
                "an item belongs to one domain"
            )
    names = known or sorted(seen)
    if len(names) != 2:
        raise ConversionError(f"the log has {len(seen)} domain(s) ({', '.join(seen)}): a cross-domain dataset needs two")
    missing = [d for d in names if d not in seen]
    if missing:
        raise ConversionError(f"domain {missing[0]!r} (--domains) has no interactions in the log")
    return {name: tok for name, tok in zip(names, TOKENS)}, item_dom


def read_item_file(path, item_dom, delimiter=None, columns=None):
    """``{item: title}`` from an item file (``item``, ``title``, optional ``domain``)."""
    columns = dict(columns or {})
    titles = {}
    table = _table(path, "item file", delimiter)
    header = next(table)
    for field in ("item", "title"):
        if columns.get(field, field) not in header:
            raise ConversionError(f"{path}, line 1: missing column {columns.get(field, field)!r} "
                                  f"(header: {', '.join(header)}); name it with --columns {field}=COLUMN")
    i_item, i_title = header.index(columns.get("item", "item")), header.index(columns.get("title", "title"))
    i_dom = header.index(columns.get("domain", "domain")) if columns.get("domain", "domain") in header else None
    for no, row in table:
        where = f"{path}, line {no}"
        item = row[i_item].strip()
        _check_token(item, "item", where)
        if item in titles:
            raise ConversionError(f"{where}: item {item!r} appears twice")
        if i_dom is not None and item in item_dom and row[i_dom].strip() != item_dom[item]:
            raise ConversionError(
                f"{where}: item {item!r} has domain {row[i_dom].strip()!r} here but {item_dom[item]!r} in the log"
            )
        titles[item] = row[i_title]
    return titles


# -- preparation ----------------------------------------------------------------------------
def order_sequences(rows, has_time, order):
    """``{user: [(item, split, path, line)]}`` in each user's order; users in order of their
    first row."""
    by_user = {}
    for k, (user, item, dom, t, split, path, no) in enumerate(rows):
        by_user.setdefault(user, []).append((t, k, item, split, path, no))
    out = {}
    for user, evs in by_user.items():
        if order == "time":
            if not has_time:
                raise ConversionError("--order time needs a timestamp (or order) column; use --order file")
            evs = sorted(evs, key=lambda e: (e[0], e[1]))
        elif has_time:
            for prev, cur in zip(evs, evs[1:]):
                if cur[0] < prev[0]:
                    raise ConversionError(
                        f"{cur[4]}, line {cur[5]}: user {user!r}'s timestamp goes back in time (before "
                        f"{prev[4]}, line {prev[5]}) and --order file keeps the rows' order: sort the log "
                        "or use --order time"
                    )
        out[user] = [(e[2], e[3], e[4], e[5]) for e in evs]
    return out


def k_core(seqs, item_dom, min_user, min_item, say=None):
    """Drop interactions until every item has >= ``min_item`` and every (user, domain) that
    keeps interactions has >= ``min_user``; then users with fewer than 2 interactions.
    Returns the filtered ``{user: [...]}`` and the number of passes."""
    passes = 0
    while True:
        passes += 1
        item_count, ud_count = {}, {}
        for user, evs in seqs.items():
            for ev in evs:
                item_count[ev[0]] = item_count.get(ev[0], 0) + 1
                key = (user, item_dom[ev[0]])
                ud_count[key] = ud_count.get(key, 0) + 1
        changed = False
        new = {}
        for user, evs in seqs.items():
            kept = [ev for ev in evs if item_count[ev[0]] >= min_item and ud_count[(user, item_dom[ev[0]])] >= min_user]
            changed |= len(kept) != len(evs)
            if kept:
                new[user] = kept
        seqs = new
        if say is not None and (min_user > 1 or min_item > 1):
            say(f"k-core pass {passes}: {sum(len(v) for v in seqs.values()):,} interactions of {len(seqs):,} users left")
        if not changed:
            break
    return {u: evs for u, evs in seqs.items() if len(evs) >= 2}, passes


def _eval_count(spec, n_eligible, default_share):
    if spec is None:
        return n_eligible if default_share is None else int(round(default_share * n_eligible))
    if isinstance(spec, str):
        spec = spec.strip()
        try:
            spec = int(spec)
        except ValueError:
            try:
                spec = float(spec)
            except ValueError:
                raise ConversionError(f"--eval-users {spec!r}: give a count (e.g. 2000) or a share (e.g. 0.2)") from None
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise ConversionError(f"--eval-users {spec}: a share must lie in (0, 1]")
        return int(round(spec * n_eligible))
    if spec < 1:
        raise ConversionError(f"--eval-users {spec}: give at least 1 user")
    if spec > n_eligible:
        raise ConversionError(f"--eval-users {spec}: only {n_eligible} users can be evaluated (see the split's rule)")
    return spec


def read_eval_users(path, seqs):
    """``{user: "valid"|"test"}`` from a file of ``user,split`` rows (a header first)."""
    out = {}
    table = _table(path, "evaluation users file")
    header = next(table)
    if "user" not in header or "split" not in header:
        raise ConversionError(f"{path}, line 1: the header must name the columns user and split")
    iu, isp = header.index("user"), header.index("split")
    for no, row in table:
        where = f"{path}, line {no}"
        user, split = row[iu].strip(), row[isp].strip()
        if split not in ("valid", "test"):
            raise ConversionError(f"{where}: split {split!r} must be valid or test")
        if user not in seqs:
            raise ConversionError(f"{where}: user {user!r} has no sequence of 2 or more interactions (after filtering)")
        if user in out:
            raise ConversionError(f"{where}: user {user!r} is listed twice")
        out[user] = split
    if not out:
        raise ConversionError(f"{path}: no users")
    return out


def build_splits(seqs, item_dom, tok, split, eval_users=None, eval_users_file=None, seed=2024):
    """``(train, valid, test, membership)``: rows ``(user, [history], target)`` and each user's
    splits."""
    doms = lambda evs: {tok[item_dom[e[0]]] for e in evs}  # noqa: E731
    users = list(seqs)
    train, valid, test = [], [], []
    member = {u: [] for u in users}

    def add(rows, name, user, items):
        rows.append((user, items[:-1], items[-1]))
        if name not in member[user]:
            member[user].append(name)

    if split == "column":
        for user in users:
            evs = seqs[user]
            tr = [e[0] for e in evs if e[1] == "train"]
            for k, ev in enumerate(evs):
                if ev[1] in ("valid", "test"):
                    if k == 0:
                        raise ConversionError(
                            f"{ev[2]}, line {ev[3]}: user {user!r}'s {ev[1]} target has no interaction before it "
                            "(an evaluation target needs a history)"
                        )
                    add(valid if ev[1] == "valid" else test, ev[1], user, [e[0] for e in evs[: k + 1]])
            if len(tr) >= 2:
                add(train, "train", user, tr)
        return train, valid, test, member

    overlapped_min = 2 if split == "heldout" else 3
    eligible = [u for u in users if len(doms(seqs[u])) == 2 and len(seqs[u]) >= overlapped_min]
    if split == "heldout" and eval_users_file:
        chosen = read_eval_users(eval_users_file, seqs)
    else:
        n = _eval_count(eval_users, len(eligible), DEFAULT_HELDOUT_SHARE if split == "heldout" else None)
        if n < (2 if split == "heldout" else 1):
            raise ConversionError(
                f"--split {split}: {len(eligible)} overlapped users can be evaluated, too few for "
                f"{'validation and test' if split == 'heldout' else 'an evaluation'} (lower the k-core minimums, or use --split column)"
            )
        perm = np.random.RandomState(seed).permutation(len(eligible))[:n]
        if split == "heldout":
            chosen = {eligible[i]: ("valid" if j < n // 2 else "test") for j, i in enumerate(perm)}
        else:
            chosen = {eligible[i]: "both" for i in perm}
    for user in users:
        items = [e[0] for e in seqs[user]]
        kind = chosen.get(user)
        if kind is None:
            add(train, "train", user, items)
        elif split == "heldout":
            add(valid if kind == "valid" else test, kind, user, items)
        else:
            if len(items) - 2 >= 2:
                add(train, "train", user, items[:-2])
            add(valid, "valid", user, items[:-1])
            add(test, "test", user, items)
    return train, valid, test, member


# -- the conversion -----------------------------------------------------------------------------
def convert_interactions(
    paths,
    out_dir,
    name,
    items_path=None,
    columns=None,
    file_domains=None,
    domains=None,
    delimiter=None,
    order=None,
    min_user_interactions=1,
    min_item_interactions=1,
    split="heldout",
    eval_users=None,
    eval_users_file=None,
    seed=2024,
    decode_html=False,
    header=None,
    progress=False,
):
    """Convert interaction log file(s) to ``out_dir/name/``; returns the manifest written.

    See the module doc for the format and every option. Raises :class:`ConversionError`
    naming the file and line of what to fix."""
    if isinstance(paths, str):
        paths = [paths]
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConversionError(f"--name {name!r}: give a dataset name (no slashes, not starting with a dot)")
    if split not in SPLITS:
        raise ConversionError(f"--split {split!r}: one of {', '.join(SPLITS)}")
    if order is not None and order not in ORDERS:
        raise ConversionError(f"--order {order!r}: one of {', '.join(ORDERS)}")
    for opt, v in (("--min-user-interactions", min_user_interactions), ("--min-item-interactions", min_item_interactions)):
        if not isinstance(v, int) or v < 1:
            raise ConversionError(f"{opt} {v!r}: give an integer >= 1 (1: no filtering)")
    if eval_users_file and split != "heldout":
        raise ConversionError("--eval-users-file applies to --split heldout")
    if eval_users_file and eval_users is not None:
        raise ConversionError("give --eval-users or --eval-users-file, not both")
    if split == "column" and eval_users is not None:
        raise ConversionError("--split column takes its evaluation targets from the split column; drop --eval-users")
    if domains is not None and (len(domains) != 2 or domains[0] == domains[1]):
        raise ConversionError(f"--domains {','.join(domains)}: give two different domain names (A first)")
    cmap = _column_map(columns) if isinstance(columns, str) else dict(columns or {})

    t0 = time.time()

    def say(msg):
        if progress:
            print(f"[interactions {time.time() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    say(f"reading {', '.join(paths)}")
    rows, has_time = read_log(paths, cmap, file_domains, delimiter, need_split=split == "column", header=header)
    say(f"read {len(rows):,} interactions")
    order = order or ("time" if has_time else "file")
    tok, item_dom = assign_domains(rows, domains)
    titles = read_item_file(items_path, item_dom, delimiter, cmap) if items_path else {}
    seqs = order_sequences(rows, has_time, order)
    n_users_read = len(seqs)
    seqs, passes = k_core(seqs, item_dom, min_user_interactions, min_item_interactions, say)
    if not seqs:
        raise ConversionError("no user keeps 2 or more interactions after the k-core filter: lower the minimums")
    train, valid, test, member = build_splits(seqs, item_dom, tok, split, eval_users, eval_users_file, seed)
    say(f"split ({split}): {len(train):,} training rows, {len(valid):,} validation and {len(test):,} test instances; writing")
    for what, part in (("training", train), ("validation", valid), ("test", test)):
        if not part:
            raise ConversionError(f"no {what} rows: check --split and the evaluation users")

    used = {e[0] for evs in seqs.values() for e in evs}
    by_tok = {t: sorted(i for i in used if tok[item_dom[i]] == t) for t in TOKENS}
    for t in TOKENS:
        if not by_tok[t]:
            name_t = [n for n, x in tok.items() if x == t][0]
            raise ConversionError(f"domain {name_t!r} keeps no item after the k-core filter: lower the minimums")

    train_items = {u: h + [t] for u, h, t in train}

    def kind(user):
        """single-A, single-B or overlapped: the domains of the user's training row (of its
        whole sequence when it has none)."""
        ds = sorted({tok[item_dom[i]] for i in train_items.get(user) or [e[0] for e in seqs[user]]})
        return "overlapped" if len(ds) == 2 else f"single-{ds[0]}"

    options = {
        "files": [os.path.basename(p) for p in paths],
        "items_file": os.path.basename(items_path) if items_path else None,
        "columns": cmap,
        "file_domains": list(file_domains) if file_domains else None,
        "domains": {t: n for n, t in tok.items()},
        "delimiter": delimiter or "auto",
        "order": order,
        "min_user_interactions": min_user_interactions,
        "min_item_interactions": min_item_interactions,
        "split": split,
        "eval_users": eval_users,
        "eval_users_file": os.path.basename(eval_users_file) if eval_users_file else None,
        "seed": seed,
        "decode_html": bool(decode_html),
        "header": list(header) if header else None,
    }
    with staging(out_dir, name) as tmp_dir:
        lines = ["item_id:token\tdomain:token\ttitle:token_seq"]
        for t in TOKENS:
            lines += [f"{i}\t{t}\t{clean_title(titles.get(i, ''), decode_html)}" for i in by_tok[t]]
        _write_text(os.path.join(tmp_dir, f"{name}.item"), "\n".join(lines) + "\n")
        ulines = ["user_id:token\tuser_kind:token\tsplit:token"]
        ulines += [f"{u}\t{kind(u)}\t{','.join(x for x in ('train', 'valid', 'test') if x in member[u])}"
                   for u in seqs if member[u]]
        _write_text(os.path.join(tmp_dir, f"{name}.user"), "\n".join(ulines) + "\n")
        header = "user_id:token\titem_id_list:token_seq\titem_id:token"
        for sname, part in (("train", train), ("valid", valid), ("test", test)):
            body = [f"{u}\t{' '.join(h)}\t{t}" for u, h, t in part]
            _write_text(os.path.join(tmp_dir, f"{name}.{sname}.inter"), "\n".join([header] + body) + "\n")
        kinds = [kind(u) for u, _, _ in train]
        counts = {
            "interactions_read": len(rows),
            "users_read": n_users_read,
            "interactions_kept": sum(len(v) for v in seqs.values()),
            "users_kept": len(seqs),
            "k_core_passes": passes,
            "items_A": len(by_tok["A"]),
            "items_B": len(by_tok["B"]),
            "train_A": kinds.count("single-A"),
            "train_B": kinds.count("single-B"),
            "train_overlap": kinds.count("overlapped"),
            "valid": len(valid),
            "test": len(test),
        }
        for sname, part in (("valid", valid), ("test", test)):
            for t in TOKENS:
                counts[f"{sname}_target_{t}"] = sum(1 for _, _, x in part if tok[item_dom[x]] == t)
        sources = {}
        for p in list(paths) + [x for x in (items_path, eval_users_file) if x]:
            sources[os.path.basename(p)] = sha256_file(p)
        outputs = {f: sha256_file(os.path.join(tmp_dir, f)) for f in sorted(os.listdir(tmp_dir))}
        manifest = {
            "converter": CONVERTER_NAME,
            "converter_version": CONVERTER_VERSION,
            "dataset": name,
            "domains": {t: n for n, t in tok.items()},
            "source_files_sha256": sources,
            "options": options,
            "incomplete": False,
            "note": "converted from an interaction log (dataset_converters interactions)",
            "counts": counts,
            "item_order": "rows of .item: domain A's items, then B's, each sorted by token",
            "title_cleaning": ("HTML entities decoded, " if decode_html else "")
            + "whitespace runs collapsed to one space, titles with a double quote CSV-quoted",
            "output_files_sha256": outputs,
        }
        _write_text(os.path.join(tmp_dir, f"{name}.manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if not counts["train_A"] and not counts["train_B"]:
        print(f"note: {name} has no single-domain training users (every training user is in both domains)",
              file=sys.stderr)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m dataset_converters interactions",
        description="Convert a two-domain interaction log (CSV/TSV with a header: user, item, domain, "
        "optional timestamp) to RecBole atomic files for recbole-cdsr.",
    )
    ap.add_argument("files", nargs="+", help="interaction log file(s), one interaction per row")
    ap.add_argument("--out", default="dataset", help="RecBole data_path (default: dataset)")
    ap.add_argument("--name", required=True, help="the dataset name (files go to OUT/NAME/)")
    ap.add_argument("--items", default=None, help="item file: item, title, optional domain")
    ap.add_argument("--columns", default=None, help="FIELD=COLUMN,... when the header names differ "
                    "(fields: user, item, domain, timestamp, split; item file: also title)")
    ap.add_argument("--file-domains", default=None, help="one domain per log file, for files without a domain column")
    ap.add_argument("--domains", default=None, help="the two domain names, A first (default: sorted)")
    ap.add_argument("--header", default=None, help="NAME,NAME,...: the log files have no header line; "
                    "these name their columns (e.g. Amazon's ratings files: user,item,rating,timestamp)")
    ap.add_argument("--delimiter", default="auto", help="auto (tab if the header has one, else comma), tab or a character")
    ap.add_argument("--order", choices=ORDERS, default=None, help="time (default with a timestamp column) or file")
    ap.add_argument("--min-user-interactions", type=int, default=1, help="k-core: a user's interactions in a domain "
                    "are kept when it has at least this many there (default 1: no filter)")
    ap.add_argument("--min-item-interactions", type=int, default=1, help="k-core: items with fewer interactions are "
                    "dropped (default 1: no filter)")
    ap.add_argument("--split", choices=SPLITS, default="heldout", help="heldout (LLMCDSR release), leave-last "
                    "(C2DSR) or column (the log's split column)")
    ap.add_argument("--eval-users", default=None, help="evaluation users: a count or a share of the eligible "
                    "overlapped users (heldout default 0.2, leave-last default all)")
    ap.add_argument("--eval-users-file", default=None, help="heldout: a file of user,split rows (valid or test)")
    ap.add_argument("--seed", type=int, default=2024, help="seed of the evaluation users' draw (default 2024)")
    ap.add_argument("--decode-html", action="store_true", help="decode HTML entities in titles (&amp; -> &), "
                    "as in Amazon's metadata; default: titles as given")
    args = ap.parse_args(argv)
    split_list = lambda s: [x.strip() for x in s.split(",")] if s else None  # noqa: E731
    try:
        m = convert_interactions(
            args.files, args.out, args.name, items_path=args.items, columns=args.columns,
            file_domains=split_list(args.file_domains), domains=split_list(args.domains),
            delimiter=args.delimiter, order=args.order,
            min_user_interactions=args.min_user_interactions, min_item_interactions=args.min_item_interactions,
            split=args.split, eval_users=args.eval_users, eval_users_file=args.eval_users_file, seed=args.seed,
            decode_html=args.decode_html, header=split_list(args.header), progress=True,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"domains": m["domains"], **m["counts"]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
