"""Convert the LLMCDSR data release (Food-Kitchen, Movie-Book) to RecBole atomic files.

Release format (one folder per dataset, as published with Xin et al., TOIS 2025):
``num.txt`` (|A| then |B|), ``instance_num.txt`` (lines of train_A, train_B, train_overlap),
``train_A.txt``, ``train_B.txt``, ``train_overlap.txt``, ``valid.txt``, ``test.txt``
(``uid<TAB>i1,i2,...``, 0-based joint item indices, A first, then B), ``item_set_{A,B}.pkl``
(ASIN -> per-domain index) and ``text_{A,B}.pkl`` (ASIN -> title).

Output, in ``<out_dir>/<name>/`` (``<name>`` is the RecBole dataset name):

``<name>.item``
    ``item_id:token`` (ASIN), ``domain:token`` (``A``/``B``), ``title:token_seq``; one row per
    item, in the release's joint index order.
``<name>.user``
    ``user_id:token``, ``user_kind:token`` (``single-A``, ``single-B``, ``overlapped``),
    ``split:token`` (``train``, ``valid``, ``test``). User ids restart at 1 in every release
    file, so tokens carry the file: ``A_12``, ``B_3``, ``O_7``, ``V_5``, ``T_9``.
``<name>.train.inter``, ``<name>.valid.inter``, ``<name>.test.inter``
    ``user_id:token``, ``item_id_list:token_seq``, ``item_id:token``: one row per sequence,
    the history and its last item. For training users that is the whole chronological
    sequence (all but the last item, then the last one); for valid/test it is exactly the
    release's evaluation instance. Prefix-per-row training data (RecBole's augmentation)
    and whole-sequence training data are both derived from these rows when loading.
``<name>.manifest.json``
    what the files were built from (sha256 of every source file), counts, options.

Everything is written into a temporary folder first and renamed into place, so an
interrupted run never leaves a folder that looks complete. Re-running gives identical bytes.
"""

import argparse
import contextlib
import hashlib
import html
import json
import os
import shutil
import sys
import tempfile
import urllib.request

from dataset_converters.filelock import FileLock, LockBusy
from dataset_converters.safe_pickle import SafePickleError, restricted_load_dict

CONVERTER_NAME = "llmcdsr_release"
CONVERTER_VERSION = 1

#: Known releases: RecBole dataset name -> folder of the public repository and domains.
KNOWN_RELEASES = {
    "food-kitchen": {
        "folder": "food-kitchen",
        "domains": {"A": "Grocery and Gourmet Food", "B": "Home and Kitchen"},
    },
    "movie-book": {
        "folder": "movie-book",
        "domains": {"A": "Movies and TV", "B": "Books"},
    },
}

#: Where the public release lives (raw files of the LLMCDSR repository's data/ folder).
RELEASE_URL = "https://raw.githubusercontent.com/xhran2010/LLMCDSR/main/data"

REQUIRED_FILES = [
    "num.txt",
    "instance_num.txt",
    "item_set_A.pkl",
    "item_set_B.pkl",
    "text_A.pkl",
    "train_A.txt",
    "train_B.txt",
    "text_B.pkl",
    "train_overlap.txt",
    "valid.txt",
    "test.txt",
]
#: Files that --allow-missing-single-domain-b may do without.
OPTIONAL_WITH_FLAG = ("train_B.txt", "text_B.pkl")
#: Files copied verbatim next to the atomic files (used by the LLM prompt builders).
PROMPT_FILES = ("candidate_generate_A_icl.txt", "candidate_generate_B_icl.txt")

USER_PREFIX = {"train_A": "A", "train_B": "B", "train_overlap": "O", "valid": "V", "test": "T"}
USER_KIND = {
    "train_A": "single-A",
    "train_B": "single-B",
    "train_overlap": "overlapped",
    "valid": "overlapped",
    "test": "overlapped",
}


class ConversionError(ValueError):
    """A release file is missing or malformed; the message names the file (and line)."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_ints(path, expected):
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    if len(lines) != expected:
        raise ConversionError(
            f"{path}: expected {expected} lines with one integer each, found {len(lines)}"
        )
    out = []
    for no, ln in enumerate(lines, 1):
        try:
            out.append(int(ln))
        except ValueError:
            raise ConversionError(f"{path}, line {no}: expected an integer, found {ln!r}") from None
        if out[-1] < 0:
            raise ConversionError(f"{path}, line {no}: negative count {out[-1]}")
    return out


def _read_sequences(path, lo, hi, min_len, what):
    """Parse ``uid<TAB>i1,i2,...`` lines; every index must lie in [lo, hi)."""
    users, seqs = [], []
    seen = set()
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for no, raw in enumerate(f, 1):
            if not raw.endswith("\n"):
                # the release ends every line with a newline: a last line without one is
                # where a copy or download stopped, and a cut "..,1234" still parses as "..,12"
                raise ConversionError(
                    f"{path}, line {no}: the last line does not end with a newline, so the file "
                    "looks cut short (an interrupted copy or download); fetch the release file "
                    "again (or, if that line is complete, end it with a newline)"
                )
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                raise ConversionError(f"{path}, line {no}: empty line")
            parts = line.split("\t")
            if len(parts) != 2:
                raise ConversionError(
                    f"{path}, line {no}: expected 'user<TAB>i1,i2,...', found {line[:60]!r}"
                )
            uid, items = parts
            try:
                uid = int(uid)
            except ValueError:
                raise ConversionError(f"{path}, line {no}: user id {uid!r} is not an integer") from None
            if uid in seen:
                raise ConversionError(f"{path}, line {no}: user id {uid} appears twice")
            seen.add(uid)
            toks = items.split(",")
            try:
                seq = [int(t) for t in toks]
            except ValueError:
                raise ConversionError(
                    f"{path}, line {no}: item list must be comma-separated integers "
                    f"(truncated or malformed line?)"
                ) from None
            if len(seq) < min_len:
                raise ConversionError(
                    f"{path}, line {no}: {what} needs at least {min_len} items, found {len(seq)}"
                )
            for it in seq:
                if not lo <= it < hi:
                    raise ConversionError(
                        f"{path}, line {no}: item index {it} out of range [{lo}, {hi}) for {what}"
                    )
            users.append(uid)
            seqs.append(seq)
    return users, seqs


def _check_item_map(path, mapping, n):
    values = sorted(mapping.values())
    if len(mapping) != n or values != list(range(n)):
        raise ConversionError(
            f"{path}: expected a bijection from {n} ASINs to indices 0..{n - 1} "
            f"(as num.txt says), found {len(mapping)} entries"
        )


def clean_title(title, decode_html=True):
    """Titles go into a tab-separated token_seq field: whitespace runs (tabs and newlines
    included) become one space, HTML entities are decoded when ``decode_html``.

    A title holding a double quote is written as a CSV-quoted field (inner quotes doubled),
    which is how RecBole's reader (pandas ``read_csv``) gives back the original text.
    """
    if decode_html:
        title = html.unescape(title)
    title = " ".join(title.split())
    if '"' in title:
        title = '"' + title.replace('"', '""') + '"'
    return title


def _check_token(asin, path):
    if not asin or any(c.isspace() for c in asin):
        raise ConversionError(f"{path}: ASIN {asin!r} contains whitespace or is empty")


def convert_llmcdsr_release(raw_dir, out_dir, name=None, allow_missing_single_domain_b=False, domains=None):
    """Convert one LLMCDSR release folder to RecBole atomic files.

    Args:
        raw_dir (str): folder with the release files (e.g. ``.../llmcdsr/food-kitchen``).
        out_dir (str): RecBole ``data_path``; files go to ``out_dir/<name>/``.
        name (str): RecBole dataset name; defaults to the folder name of ``raw_dir``.
        allow_missing_single_domain_b (bool): build without ``train_B.txt`` (no single-domain
            B users) and, if missing, without ``text_B.pkl`` (empty B titles). Recorded in
            the manifest and logged as a warning.
        domains (list): the names of domains A and B (default: the known release's, else
            ``A`` and ``B``); recorded in the manifest, shown in results and leaderboards.

    Returns:
        dict: the manifest that was written.

    Raises:
        ConversionError: a missing or malformed file (named, with the line where it applies).
    """
    raw_dir = os.path.abspath(raw_dir)
    name = name or os.path.basename(raw_dir.rstrip(os.sep))
    if domains is not None and (len(domains) != 2 or not all(domains) or domains[0] == domains[1]):
        raise ConversionError(f"--domains {','.join(domains)}: give two different names, A's first")
    if not os.path.isdir(raw_dir):
        raise ConversionError(f"release folder {raw_dir} does not exist")

    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(raw_dir, f))]
    missing_allowed = [f for f in missing if f in OPTIONAL_WITH_FLAG]
    if missing:
        if not allow_missing_single_domain_b or len(missing_allowed) != len(missing):
            hint = ""
            if missing_allowed and allow_missing_single_domain_b is False and len(missing_allowed) == len(missing):
                hint = (
                    " (to build without the single-domain B users, pass "
                    "--allow-missing-single-domain-b / allow_missing_single_domain_b=True)"
                )
            raise ConversionError(
                f"release folder {raw_dir} is incomplete: missing "
                + ", ".join(missing)
                + hint
            )
    p = lambda f: os.path.join(raw_dir, f)  # noqa: E731

    n_a, n_b = _read_ints(p("num.txt"), 2)
    inst = _read_ints(p("instance_num.txt"), 3)
    n_all = n_a + n_b

    try:
        set_a = restricted_load_dict(p("item_set_A.pkl"), int)
        set_b = restricted_load_dict(p("item_set_B.pkl"), int)
        text_a = restricted_load_dict(p("text_A.pkl"), str)
        text_b = (
            restricted_load_dict(p("text_B.pkl"), str) if "text_B.pkl" not in missing else {}
        )
    except SafePickleError as e:
        raise ConversionError(str(e)) from None
    _check_item_map(p("item_set_A.pkl"), set_a, n_a)
    _check_item_map(p("item_set_B.pkl"), set_b, n_b)
    asin = [None] * n_all
    for a, i in set_a.items():
        _check_token(a, p("item_set_A.pkl"))
        asin[i] = a
    for a, i in set_b.items():
        _check_token(a, p("item_set_B.pkl"))
        if asin[n_a + i] is not None or a in set_a:
            raise ConversionError(f"{p('item_set_B.pkl')}: ASIN {a} also appears in item_set_A.pkl")
        asin[n_a + i] = a
    for path, texts, mapping in ((p("text_A.pkl"), text_a, set_a), (p("text_B.pkl"), text_b, set_b)):
        extra = set(texts) - set(mapping)
        if extra:
            raise ConversionError(f"{path}: {len(extra)} ASINs not in the item set, e.g. {sorted(extra)[0]}")

    files = {}
    spec = [
        ("train_A", 0, n_a, 2, inst[0]),
        ("train_B", n_a, n_all, 2, inst[1]),
        ("train_overlap", 0, n_all, 2, inst[2]),
        ("valid", 0, n_all, 2, None),
        ("test", 0, n_all, 2, None),
    ]
    for key, lo, hi, min_len, expected in spec:
        fname = key + ".txt"
        if fname in missing:
            continue
        users, seqs = _read_sequences(p(fname), lo, hi, min_len, key)
        if expected is not None and len(users) != expected:
            raise ConversionError(
                f"{p(fname)}: {len(users)} sequences, but instance_num.txt says {expected}"
            )
        if not users and key not in ("train_A", "train_B"):
            # (a release without single-domain users of a domain has 0 on that line of
            # instance_num.txt and an empty file, checked just above)
            raise ConversionError(f"{p(fname)}: no sequences")
        files[key] = (users, seqs)

    # Write everything into a temporary sibling folder, then rename into place.
    with staging(out_dir, name) as tmp_dir:
        _write_outputs(tmp_dir, name, asin, n_a, text_a, text_b, files)
        for f in PROMPT_FILES:
            if os.path.isfile(p(f)):
                shutil.copyfile(p(f), os.path.join(tmp_dir, f))
        sources = {f: sha256_file(p(f)) for f in sorted(os.listdir(raw_dir)) if os.path.isfile(p(f))}
        outputs = {f: sha256_file(os.path.join(tmp_dir, f)) for f in sorted(os.listdir(tmp_dir))}
        counts = {
            "items_A": n_a,
            "items_B": n_b,
            "train_A": len(files["train_A"][0]) if "train_A" in files else 0,
            "train_B": len(files["train_B"][0]) if "train_B" in files else 0,
            "train_overlap": len(files["train_overlap"][0]),
            "valid": len(files["valid"][0]),
            "test": len(files["test"][0]),
        }
        for split in ("valid", "test"):
            tg = [s[-1] for s in files[split][1]]
            counts[f"{split}_target_A"] = sum(1 for t in tg if t < n_a)
            counts[f"{split}_target_B"] = sum(1 for t in tg if t >= n_a)
        manifest = {
            "converter": CONVERTER_NAME,
            "converter_version": CONVERTER_VERSION,
            "dataset": name,
            "domains": (dict(zip("AB", domains)) if domains
                        else KNOWN_RELEASES.get(name, {}).get("domains", {"A": "A", "B": "B"})),
            "source_files_sha256": sources,
            "missing_source_files": missing,
            "incomplete": bool(missing),
            "note": (
                "built WITHOUT " + ", ".join(missing) + ": no single-domain B users"
                + (" and no B titles" if "text_B.pkl" in missing else "")
                if missing
                else "complete release"
            ),
            "counts": counts,
            "item_order": "rows of .item follow the release's joint 0-based index (A then B)",
            "title_cleaning": "HTML entities decoded, whitespace runs collapsed to one space, titles with a double quote CSV-quoted",
            "output_files_sha256": outputs,
        }
        _write_text(
            os.path.join(tmp_dir, f"{name}.manifest.json"),
            json.dumps(manifest, indent=2, sort_keys=True) + "\n",
        )
    if missing:
        print(
            f"WARNING: {name} was built WITHOUT {', '.join(missing)} "
            "(no single-domain B users); the manifest records this.",
            file=sys.stderr,
        )
    return manifest


def publish_dir(tmp_dir, out_dir, name):
    """Rename the finished ``tmp_dir`` to ``out_dir/name``, replacing an older copy.

    Files of the older copy that the conversion does not write (the cached artefacts of the
    stages: generations, embeddings, pre-training, candidate sets) move into the new copy;
    each is checked against its own manifest when it is used, so one built from other data
    is rebuilt then, not trusted."""
    final_dir = os.path.join(out_dir, name)
    if os.path.exists(final_dir):
        for entry in sorted(os.listdir(final_dir)):
            if not os.path.lexists(os.path.join(tmp_dir, entry)):
                os.rename(os.path.join(final_dir, entry), os.path.join(tmp_dir, entry))
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=out_dir)
        os.rename(final_dir, os.path.join(old, name))
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)


@contextlib.contextmanager
def staging(out_dir, name):
    """A temporary folder beside ``out_dir/name`` to write a dataset into, published by
    renaming when the block ends without an error (removed when it raises).

    Checks ``out_dir`` first (one clear error when it is a file or not writable), holds the
    lock ``out_dir/.<name>.lock`` for the block (a second conversion of the same dataset into
    the same folder stops at once) and, holding it, removes the ``.<name>.tmp-*`` and
    ``.<name>.old-*`` folders that an interrupted conversion left behind.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"output folder {out_dir} is a file: give --out a folder (RecBole's data_path)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the output folder {out_dir} ({e.strerror}): give --out a writable folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConversionError(f"output folder {out_dir} is not writable: give --out a writable folder")
    final = os.path.join(out_dir, name)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ConversionError(f"{final} is a file: the dataset {name!r} needs a folder of that name there")
    lock = FileLock(os.path.join(out_dir, f".{name}.lock"))
    try:
        lock.acquire()
    except LockBusy as e:
        raise ConversionError(
            f"another conversion of {name!r} into {out_dir} is running"
            + (f" ({e.holder})" if e.holder else "") + ": wait for it to end"
        ) from None
    except OSError as e:
        raise ConversionError(f"cannot write into the output folder {out_dir} ({e.strerror})") from None
    try:
        for entry in sorted(os.listdir(out_dir)):
            if entry.startswith((f".{name}.tmp-", f".{name}.old-")) and os.path.isdir(os.path.join(out_dir, entry)):
                shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
                print(f"removed {os.path.join(out_dir, entry)} (left by an interrupted conversion)", file=sys.stderr)
        try:
            tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir)
        except OSError as e:
            raise ConversionError(f"cannot write into the output folder {out_dir} ({e.strerror})") from None
        os.chmod(tmp_dir, 0o755)
        try:
            yield tmp_dir
            publish_dir(tmp_dir, out_dir, name)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    finally:
        lock.release()


def _write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _write_outputs(tmp_dir, name, asin, n_a, text_a, text_b, files):
    lines = ["item_id:token\tdomain:token\ttitle:token_seq"]
    for idx, a in enumerate(asin):
        dom = "A" if idx < n_a else "B"
        title = (text_a if dom == "A" else text_b).get(a, "")
        lines.append(f"{a}\t{dom}\t{clean_title(title)}")
    _write_text(os.path.join(tmp_dir, f"{name}.item"), "\n".join(lines) + "\n")

    users = ["user_id:token\tuser_kind:token\tsplit:token"]
    inter = {"train": [], "valid": [], "test": []}
    for key in ("train_A", "train_B", "train_overlap", "valid", "test"):
        if key not in files:
            continue
        split = key if key in ("valid", "test") else "train"
        for uid, seq in zip(*files[key]):
            tok = f"{USER_PREFIX[key]}_{uid}"
            users.append(f"{tok}\t{USER_KIND[key]}\t{split}")
            hist = " ".join(asin[i] for i in seq[:-1])
            inter[split].append(f"{tok}\t{hist}\t{asin[seq[-1]]}")
    _write_text(os.path.join(tmp_dir, f"{name}.user"), "\n".join(users) + "\n")
    header = "user_id:token\titem_id_list:token_seq\titem_id:token"
    for split, rows in inter.items():
        _write_text(
            os.path.join(tmp_dir, f"{name}.{split}.inter"), "\n".join([header] + rows) + "\n"
        )


def fetch_release(name, dest_dir, base_url=RELEASE_URL, timeout=60):
    """Download a known release from the public LLMCDSR repository into ``dest_dir``.

    Files are downloaded to temporary names and renamed when complete. Needs internet.
    """
    if name not in KNOWN_RELEASES:
        raise ConversionError(
            f"unknown release {name!r}; known: {', '.join(sorted(KNOWN_RELEASES))}"
        )
    os.makedirs(dest_dir, exist_ok=True)
    folder = KNOWN_RELEASES[name]["folder"]
    for f in REQUIRED_FILES + list(PROMPT_FILES):
        target = os.path.join(dest_dir, f)
        if os.path.isfile(target):
            continue
        url = f"{base_url}/{folder}/{f}"
        tmp = target + ".part"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as out:
                shutil.copyfileobj(r, out)
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise ConversionError(f"cannot download {url}: {e}") from None
        os.replace(tmp, target)
    return dest_dir


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Convert an LLMCDSR release folder to RecBole atomic files."
    )
    ap.add_argument("raw_dir", help="release folder (num.txt, train_*.txt, *.pkl, ...)")
    ap.add_argument("--out", default="dataset", help="RecBole data_path (default: dataset)")
    ap.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    ap.add_argument(
        "--allow-missing-single-domain-b",
        action="store_true",
        help="build without train_B.txt/text_B.pkl (no single-domain B users); recorded",
    )
    ap.add_argument("--domains", default=None, help="NAME_A,NAME_B: the domains' names (default: the known "
                    "release's, else A,B)")
    ap.add_argument(
        "--fetch",
        action="store_true",
        help="download the release from the public repository into raw_dir first",
    )
    args = ap.parse_args(argv)
    try:
        if args.fetch:
            fetch_release(args.name or os.path.basename(args.raw_dir.rstrip(os.sep)), args.raw_dir)
        m = convert_llmcdsr_release(
            args.raw_dir, args.out, args.name, args.allow_missing_single_domain_b,
            [d.strip() for d in args.domains.split(",")] if args.domains else None,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
