"""LeCDSR's stages, run before the model trains: item text vectors and user profiles (a
short interest profile per user, written by an LLM, embedded). :func:`prepare` returns the
config keys naming the cached tables (``item_text_table``, ``user_profiles``, loaded by the
dataset) and a record for the results file.

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
embedded with the text encoder into ``<dataset>.profiles-<tag>.npz`` (``users``, ``emb``), a
cached artefact (:mod:`recbole_cdsr.cache`) whose manifest records what it was built from.
"""

import hashlib
import json
import logging
import os

import numpy as np

from recbole_cdsr.cache import Artefact
from recbole_cdsr.data.atomic import domain_labels, read_rows
from recbole_cdsr.llm.encoders import encode_in_parts
from recbole_cdsr.utils import sha256_file

logger = logging.getLogger(__name__)

PROFILE_PROMPT_VERSION = "lecdsr-profile-v1"
PROFILE_FORMAT_VERSION = 2  # 2: the shared artefact manifest
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

    gen = config["profile_generator"]  # titles | hf | openai (config schema)
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
        job = GenerationJob(dataset_dir, name, backend, PROFILE_PROMPT_VERSION, parser="text",
                            settings={"seed": config["generation_seed"]}, batch_size=config["llm_batch_size"],
                            show_progress=show_progress, kind="profile", desc="LeCDSR: LLM user profiles")
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
    art = Artefact(dataset_dir, f"{name}.profiles", {
        "format_version": PROFILE_FORMAT_VERSION, "texts_sha256": text_sha, "encoder": encoder.identity(),
        "max_chars": max_chars, "source": source})
    m = art.cached("user profile vectors")
    if m is None:
        emb = encode_in_parts(encoder, cut, art.path[:-4] + ".parts", what="LeCDSR user profiles")
        m = art.write_arrays({"users": np.asarray(users, dtype=str), "emb": emb.astype(np.float32)},
                             users=len(users), mean_chars=float(np.mean([len(t) for t in cut])) if cut else 0.0)
    return art.path, dict(m["identity"], users=m["users"], mean_chars=m["mean_chars"])


def write_item_text_table(dataset_dir, name, tokens, emb, encoder):
    """``<dataset>.itemtext-<tag>.npz`` (``item_tokens``, ``emb``) for the dataset to load;
    returns ``(path, identity)``."""
    art = Artefact(dataset_dir, f"{name}.itemtext", {
        "format_version": PROFILE_FORMAT_VERSION, "encoder": encoder.identity(),
        "item_file_sha256": sha256_file(os.path.join(dataset_dir, f"{name}.item"))})
    if not art.cached("item text table"):
        art.write_arrays({"item_tokens": np.asarray(tokens, dtype=str), "emb": np.asarray(emb, dtype=np.float32)},
                         items=int(len(tokens)))
    return art.path, art.identity


def prepare(config):
    """Item text vectors and user profile vectors for LeCDSR; returns (updates, record)."""
    from recbole_cdsr.data.atomic import read_item_titles
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings
    from recbole_cdsr.stages.backend import make_backend

    use_text, use_prof = config["lecdsr_use_item_text"], config["lecdsr_use_profiles"]
    if not use_text and not use_prof:
        return {}, {"stages": "skipped (no item semantics, no profiles)"}
    name, d = config["dataset"], config["data_path"]
    encoder = TextEncoder(config["text_encoder"], device=str(config["device"]))
    items = read_item_titles(os.path.join(d, f"{name}.item"))
    record = {"text_encoder": encoder.identity()}
    updates = {}
    if use_text:
        tokens, _, emb = item_text_embeddings(d, name, encoder, items=items, stage="LeCDSR: ")
        updates["item_text_table"], record["item_text"] = write_item_text_table(d, name, tokens, emb, encoder)
    if use_prof:
        path, rec = build_profiles(config, d, name, encoder, items,
                                   backend_factory=lambda c: make_backend(c, c["profile_generator"]),
                                   show_progress=config["show_progress"])
        updates["user_profiles"] = path
        record["profiles"] = {k: v for k, v in rec.items() if k != "encoder"}
    return updates, record
