"""User profiles (LeCDSR): a short interest profile per user, written by an LLM, embedded.

Which items a user's profile is built from (never an evaluation target):

- a user with training rows: the items of those rows (histories and targets: all are
  training interactions);
- a user without training rows (a held-out user): the history of its first evaluation row
  (its validation row if it has one, else its test row); the target is never read.

Items are deduplicated (first occurrence kept) and listed oldest first, one line each,
``n. title  category`` numbered from 1 (a higher number is more recent). Our datasets carry
titles and domains only, so the category is the domain's name (from the dataset manifest).

Sources (``profile_generator``):

``hf`` / ``openai``
    the LLM backends of stage 1 (same config keys), a system and a user prompt; answers are
    appended per user to ``<dataset>.profile-<tag>.jsonl`` by the resumable
    :class:`~recbole_cdsr.llm.generation.GenerationJob` (parser ``text``: the answer is the
    profile; an empty answer is a failure, recorded and retried on the next run).
``titles``
    the documented no-LLM stand-in: NOT an LLM profile. The "profile" is the user's item
    list itself (the prompt's item lines as one text). Reported loudly in the log and in
    the results file.

Each profile is cut to ``profile_max_chars`` characters (the paper keeps 5,000) and
embedded with the text encoder; ``<dataset>.profiles-<tag>.npz`` (``users``, ``emb``) and a
``.json`` manifest record what they were built from.
"""

import hashlib
import io
import json
import logging
import os

import numpy as np

from recbole_cdsr.llm.stage1 import read_rows
from recbole_cdsr.utils import atomic_write_bytes, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

PROFILE_PROMPT_VERSION = "lecdsr-profile-v1"
PROFILE_FORMAT_VERSION = 1
PROFILE_GENERATORS = ("titles", "hf", "openai")
SYSTEM_PROMPT = (
    "You are an expert in recommender systems. From a user's interaction record you write a "
    "profile of the user's interests that is short, precise and well organised."
)
USER_PROMPT = (
    "Here is what one user bought in the {domains} domains, listed from oldest to newest "
    "(a higher number is more recent). Describe this user's interests in a short, refined "
    "profile. Do not include anything inappropriate.\n\n{items}"
)


class ProfileError(ValueError):
    pass


def profile_items(dataset_dir, name):
    """``{user: [item tokens]}``: what each user's profile may be built from (see module doc)."""
    out = {}
    for split in ("train", "valid", "test"):
        path = os.path.join(dataset_dir, f"{name}.{split}.inter")
        if not os.path.isfile(path):
            raise ProfileError(f"{path} is missing")
        seen_here = {}
        for user, hist, target in read_rows(path):
            if split == "train":
                seen_here.setdefault(user, []).extend(hist + [target])
            elif user not in out and user not in seen_here:
                seen_here[user] = list(hist)  # a held-out user: its first history, no target
        for user, items in seen_here.items():
            out.setdefault(user, items)
    return {u: list(dict.fromkeys(items)) for u, items in out.items()}


def domain_labels(dataset_dir, name):
    """Domain token -> readable name (the converter's manifest), else the token itself."""
    path = os.path.join(dataset_dir, f"{name}.manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            doms = json.load(f).get("domains") or {}
        return {str(k): str(v) for k, v in doms.items()}
    return {}


def item_lines(items, info, labels):
    """``1. title  category`` lines (``info``: token -> (domain, title))."""
    lines = []
    for n, tok in enumerate(items, 1):
        dom, title = info[tok]
        lines.append(f"{n}. {title}  {labels.get(dom, dom)}")
    return "\n".join(lines)


def profile_requests(user_items, items, labels):
    """One request per user: ``{"user", "prompt": {"system", "user"}, "item_text"}``."""
    tokens, domains, titles = items
    info = {t: (d, ti) for t, d, ti in zip(tokens, domains, titles)}
    dom_names = " and ".join(labels.get(d, d) for d in sorted(set(domains.tolist())))
    reqs = []
    for user in sorted(user_items):
        missing = [t for t in user_items[user] if t not in info]
        if missing:
            raise ProfileError(f"user {user}: item {missing[0]} is not in the .item file")
        text = item_lines(user_items[user], info, labels)
        reqs.append({"user": user, "item_text": text,
                     "prompt": {"system": SYSTEM_PROMPT, "user": USER_PROMPT.format(domains=dom_names, items=text)}})
    return reqs


def build_profiles(config, dataset_dir, name, encoder, items, backend_factory=None, show_progress=False):
    """Write (or reuse) the profile table; returns ``(npz path, record)``."""
    from recbole_cdsr.llm.generation import GenerationJob

    gen = config["profile_generator"]
    if gen not in PROFILE_GENERATORS:
        raise ProfileError(f"profile_generator must be one of {', '.join(PROFILE_GENERATORS)}, got {gen!r}")
    max_chars = int(config["profile_max_chars"])
    reqs = profile_requests(profile_items(dataset_dir, name), items, domain_labels(dataset_dir, name))
    if gen == "titles":
        logger.warning(
            "LeCDSR user profiles use the TITLES STAND-IN, NOT AN LLM: each 'profile' is the "
            "user's own item list. Configure profile_generator: hf or openai for the method as published."
        )
        texts = {r["user"]: r["item_text"] for r in reqs}
        source = {"generator": "titles", "note": "NOT an LLM: the user's item list as the profile text",
                  "prompt_version": PROFILE_PROMPT_VERSION}
        failed = []
    else:
        backend = backend_factory(config)
        job = GenerationJob(dataset_dir, name, backend, parser="text",
                            settings={"seed": config["generation_seed"]}, batch_size=config["llm_batch_size"],
                            show_progress=show_progress, prompt_version=PROFILE_PROMPT_VERSION, kind="profile",
                            desc="LLM user profiles")
        records = job.run(reqs)
        failed = sorted(u for u, r in records.items() if r["status"] != "ok")
        if failed:
            raise ProfileError(
                f"{len(failed)} user profiles failed (first: {failed[0]}: {records[failed[0]]['error']}); "
                f"they are recorded in {job.jsonl} and retried on the next run"
            )
        texts = {u: r["raw"] for u, r in records.items()}
        source = {"generator": gen, "generation": job.identity, "jsonl": os.path.basename(job.jsonl)}
    users = sorted(texts)
    cut = [texts[u][:max_chars] for u in users]
    text_sha = hashlib.sha256(json.dumps(list(zip(users, cut))).encode()).hexdigest()
    ident = {"format_version": PROFILE_FORMAT_VERSION, "texts_sha256": text_sha, "encoder": encoder.identity(),
             "max_chars": max_chars, "source": source}
    tag = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(dataset_dir, f"{name}.profiles-{tag}.npz")
    man = path[:-4] + ".json"
    if os.path.isfile(path) and os.path.isfile(man):
        with open(man) as f:
            m = json.load(f)
        if m.get("npz_sha256") == sha256_file(path):
            return path, m
    emb = encode_in_parts(encoder, cut, path[:-4] + ".parts", what="user profiles")
    buf = io.BytesIO()
    np.savez(buf, users=np.asarray(users, dtype=str), emb=emb.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())
    record = dict(ident, users=len(users), npz_sha256=sha256_file(path),
                  mean_chars=float(np.mean([len(t) for t in cut])) if cut else 0.0)
    atomic_write_json(man, record)
    return path, record


PART_SIZE = 4096  # texts per cached part of a long encoding job


def encode_in_parts(encoder, texts, parts_dir, what="texts", part_size=None):
    """``encoder.encode(texts)``, done in parts of ``PART_SIZE`` texts, each saved (atomically)
    under ``parts_dir`` as soon as it is done, so that an interrupted job (the 53k Food-Kitchen
    profiles take over half an hour on a 2-core CPU) resumes where it stopped. ``parts_dir``
    must be specific to the texts and the encoder (the caller's content tag); it is removed
    once the whole table is returned. A part with the wrong shape is encoded again."""
    import time

    if not texts:
        return np.asarray(encoder.encode(texts), dtype=np.float32)
    size = int(part_size or PART_SIZE)
    n_parts = max((len(texts) + size - 1) // size, 1)
    os.makedirs(parts_dir, exist_ok=True)
    out, started, done_now = [], time.time(), 0
    for k in range(n_parts):
        chunk = texts[k * size:(k + 1) * size]
        part = os.path.join(parts_dir, f"part-{k:05d}-of-{n_parts:05d}.npy")
        emb = None
        if os.path.isfile(part):
            try:
                emb = np.load(part, allow_pickle=False)
            except (OSError, ValueError):
                emb = None
            if emb is not None and emb.shape[0] != len(chunk):
                emb = None
        if emb is None:
            emb = np.asarray(encoder.encode(chunk), dtype=np.float32)
            buf = io.BytesIO()
            np.save(buf, emb, allow_pickle=False)
            atomic_write_bytes(part, buf.getvalue())
            done_now += 1
            eta = (time.time() - started) / done_now * (n_parts - k - 1)
            logger.info(f"embedded {what}: part {k + 1}/{n_parts} ({min((k + 1) * size, len(texts))} of "
                        f"{len(texts)}), about {eta / 60:.1f} min left")
        out.append(emb)
    table = np.concatenate(out)
    for f in os.listdir(parts_dir):
        os.remove(os.path.join(parts_dir, f))
    os.rmdir(parts_dir)
    return table


def write_item_text_table(dataset_dir, name, tokens, emb, encoder):
    """``<dataset>.itemtext-<tag>.npz`` (``item_tokens``, ``emb``) for the dataset to load."""
    ident = {"format_version": PROFILE_FORMAT_VERSION, "encoder": encoder.identity(),
             "item_file_sha256": sha256_file(os.path.join(dataset_dir, f"{name}.item"))}
    tag = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(dataset_dir, f"{name}.itemtext-{tag}.npz")
    man = path[:-4] + ".json"
    if os.path.isfile(path) and os.path.isfile(man):
        with open(man) as f:
            if json.load(f).get("npz_sha256") == sha256_file(path):
                return path, ident
    buf = io.BytesIO()
    np.savez(buf, item_tokens=np.asarray(tokens, dtype=str), emb=np.asarray(emb, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(man, dict(ident, items=int(len(tokens)), npz_sha256=sha256_file(path)))
    return path, ident
