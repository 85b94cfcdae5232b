"""LLMCDSR stage 1's inputs and prompt: single-domain users and their titles, in-context
examples from overlapped users, the release's instruction prefixes, and the prompt of the
public code, byte for byte (:func:`build_prompt`, :func:`extract_prompt`).

Everything comes from the training file only: evaluation targets never reach a prompt.
"""

import os
import random

from recbole_cdsr.data.atomic import read_item_titles, read_training_sequences
from recbole_cdsr.llm.generation import GenerationError

PREFIX_FILES = {"A": "candidate_generate_A_icl.txt", "B": "candidate_generate_B_icl.txt"}
# v2: the public code's prompt and extraction prompt byte for byte (v1 had its own layout)
PROMPT_VERSION = "llmcdsr-icl-v2"
# the instruction of the public code's second ("parse") call, verbatim: the model is expected
# to reproduce it exactly, so it is part of the method's prompt format
EXTRACT_INSTRUCTION = (
    "Extract the names of the items directly, and list them with numbers starting with 1. "
    "If there are no items, Don't output anything."
)


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


def _title_list(titles):
    """A list of titles written as the public code writes it: Python's ``str`` of a list of str."""
    return str([str(t) for t in titles])


def build_prompt(prefix, examples, user_titles):
    """The LLMCDSR in-context prompt, as the public code builds it (``prefix + concat_icl``).

    ``prefix``: the release's instruction file, as read (its trailing blank line included).
    ``examples``: list of (source-domain titles, target-domain titles) of overlapped users.
    Each example: ``### Example i``, then ``Input:`` directly followed by the source titles as
    a Python list literal, ``Output:`` and one ``- title`` line per target title, then a blank
    line; then a blank line, ``### Input:`` and the user's titles as a list literal; nothing
    after it (a chat template or role token, if any, is the backend's)."""
    out = [prefix]
    for i, (src, tgt) in enumerate(examples, 1):
        out.append(f"### Example {i}\nInput:{_title_list(src)}\nOutput:\n")
        out.append("\n".join(f"- {t}" for t in tgt))
        out.append("\n\n")
    out.append(f"\n### Input:\n{_title_list(user_titles)}")
    return "".join(out)


def extract_prompt(answer):
    """The public code's extraction prompt for one answer. The public code writes the answer
    to a file and reads it back with ``readlines`` (newlines normalised), joins the lines
    (which keep their newline) with another newline, so every line break is doubled, wraps
    that in double quotes and adds a blank line and the instruction."""
    text = (answer or "").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    kept = [ln + "\n" for ln in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return '"' + "\n".join(kept) + '"' + "\n\n" + EXTRACT_INSTRUCTION



def sample_examples(overlapped, shot, rng):
    """``shot`` in-context examples drawn with ``rng`` from overlapped users (src, tgt) pairs."""
    pool = [e for e in overlapped if e[0] and e[1]]
    if len(pool) < shot:
        raise GenerationError(f"need {shot} overlapped users with items in both domains, found {len(pool)}")
    return rng.sample(pool, shot)


def make_requests(users, overlapped_by_domain, prefixes, shot, seed):
    """Prompts for single-domain users.

    ``users``: list of (user token, domain D, D titles); ``overlapped_by_domain[D]``: list of
    (D titles, D' titles) of overlapped users; ``prefixes[D]``: instruction prefix D -> D'.
    Each user's examples come from ``random.Random(f"{seed}-{user}")``, so a user's prompt
    does not depend on which other users are generated in the same run.
    """
    reqs = []
    for user, dom, titles in users:
        rng = random.Random(f"{seed}-{user}")
        ex = sample_examples(overlapped_by_domain[dom], shot, rng)
        reqs.append({"user": user, "domain": dom, "prompt": build_prompt(prefixes[dom], ex, titles)})
    return reqs
