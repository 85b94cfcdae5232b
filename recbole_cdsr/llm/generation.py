"""Stage 1 of LLMCDSR: candidate-free cross-domain generation for single-domain users.

For every single-domain training user of domain D the LLM is asked, with the release's
instruction prefix for D -> D' and ``shot`` in-context examples (overlapped users, drawn
with a seed), to name D' items the user may like. The prompt is the public code's, byte
for byte (:func:`build_prompt`). Answers are parsed into item names:

``llm``    a second call to the same model, with the public code's extraction prompt
           (:func:`extract_prompt`), then the name pattern on its answer (the public method);
``regex``  the name pattern on the answer itself (cheaper: one call per user);
``given``  the names a non-LLM backend hands over as they are (the retrieval stand-in);
``auto``   ``llm`` for an LLM backend, ``given`` otherwise.

Name pattern (``name_pattern``): ``lines`` (:func:`parse_names`: numbered or bulleted lines,
the last line too) or ``public`` (:func:`parse_names_public`: the public code's regex).
Users with ``min_names`` or fewer names (default 2, as the public code) get no pseudo items.

Results are appended per user to a JSONL file (user, domain, status, raw answer, names,
error, attempts), flushed after every batch: a crash loses at most the batch in flight and
a rerun skips the users already done (``status: ok``); failed users are retried on the next
run and stay recorded as failed until they succeed. A manifest records backend, model,
prompt version, parser, shot and seed; the JSONL file name carries a hash of them, so a
different configuration never mixes with an earlier one.
"""

import hashlib
import json
import logging
import os
import random
import re
import time

from recbole_cdsr.utils import atomic_write_json

logger = logging.getLogger(__name__)

# v2: the public code's prompt and extraction prompt byte for byte (v1 had its own layout)
PROMPT_VERSION = "llmcdsr-icl-v2"
# the instruction of the public code's second ("parse") call, verbatim: the model is expected
# to reproduce it exactly, so it is part of the method's prompt format
EXTRACT_INSTRUCTION = (
    "Extract the names of the items directly, and list them with numbers starting with 1. "
    "If there are no items, Don't output anything."
)
PARSERS = ("auto", "llm", "regex", "given", "text")
NAME_PATTERNS = ("lines", "public")
_LINE = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")
_PUBLIC = re.compile(r"\d+\.\s(.*?)\n")


class GenerationError(ValueError):
    pass


def parse_names(text):
    """Item names from numbered (``1. x``, ``2) y``, ``3: z``) or bulleted (``- z``, ``* z``,
    ``\u2022 z``) lines, the last line too; surrounding quotes and blanks stripped; each name
    once (case-insensitively), in order of first appearance; empty names dropped."""
    names, seen = [], set()
    for line in (text or "").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(1).strip().strip('"').strip()
        key = name.lower()
        if not name or key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def parse_names_public(text):
    """The public code's parser: every ``<digits>. <name>`` followed by a newline, anywhere
    in the text (so a last line without a newline is not read), each exact string once; an
    answer of one line gives nothing. Order: first appearance (the public code keeps a
    ``set``, whose order is arbitrary)."""
    text = text or ""
    if len(text.strip().split("\n")) <= 1:
        return []
    return list(dict.fromkeys(_PUBLIC.findall(text)))


NAME_PARSERS = {"lines": parse_names, "public": parse_names_public}


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


class GenerationJob:
    """Generation for a set of users, resumable through an append-only JSONL file.

    Args:
        out_dir (str): where the JSONL and manifest go (the dataset folder).
        dataset_name (str): prefix of the files.
        backend: an object with ``generate(prompts) -> [Completion]`` and ``identity()``.
        parser (str): ``auto``, ``llm``, ``regex``, ``given`` (names) or ``text`` (the answer
            itself is the product); see the module docstring. ``auto`` is resolved here and the
            resolved parser is what the identity records.
        name_pattern (str): ``lines`` or ``public`` (parsers ``llm`` and ``regex``).
        settings (dict): everything else that defines the output (shot, seed, prompt version...).
    """

    def __init__(self, out_dir, dataset_name, backend, parser="auto", settings=None, batch_size=16,
                 min_names=2, show_progress=True, prompt_version=PROMPT_VERSION, kind="gen",
                 desc="LLM generation", name_pattern="lines"):
        if parser not in PARSERS:
            raise GenerationError(
                f"llm_parser must be one of {', '.join(PARSERS[:4])} (names) or 'text' (the answer itself), "
                f"got {parser!r}"
            )
        is_llm = getattr(backend, "is_llm", True)
        gives_names = getattr(backend, "gives_names", False)
        if parser == "auto":
            parser = "llm" if is_llm else ("given" if gives_names else "regex")
        if parser == "llm" and not is_llm:
            raise GenerationError("llm_parser 'llm' needs an LLM backend (hf or openai); use 'regex' or 'auto'")
        if parser == "given" and not gives_names:
            raise GenerationError("llm_parser 'given' needs a backend that hands over names (the retrieval stand-in)")
        if name_pattern not in NAME_PATTERNS:
            raise GenerationError(f"name_pattern must be one of {', '.join(NAME_PATTERNS)}, got {name_pattern!r}")
        self.backend = backend
        self.parser = parser
        self.name_pattern = name_pattern
        self.parse_names = NAME_PARSERS[name_pattern]
        self.batch_size = max(1, int(batch_size))
        self.min_names = int(min_names)
        self.show_progress = show_progress
        self.desc = desc
        self.identity = {
            "prompt_version": prompt_version,
            "parser": parser,
            "min_names": self.min_names,
            "backend": backend.identity(),
            **(settings or {}),
        }
        if parser in ("llm", "regex") and name_pattern != "lines":
            self.identity["name_pattern"] = name_pattern
        tag = hashlib.sha256(json.dumps(self.identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.jsonl = os.path.join(out_dir, f"{dataset_name}.{kind}-{tag}.jsonl")
        self.manifest = os.path.join(out_dir, f"{dataset_name}.{kind}-{tag}.json")

    def load_records(self):
        """Last record per user (a truncated final line, from a crash, is ignored)."""
        recs = {}
        if not os.path.isfile(self.jsonl):
            return recs
        with open(self.jsonl, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and "user" in r:
                    recs[r["user"]] = r
        return recs

    def _drop_torn_tail(self):
        """A crash can leave a last line without its newline: cut it off before appending."""
        if not os.path.isfile(self.jsonl):
            return
        with open(self.jsonl, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def _parse(self, completions):
        if self.parser == "text":  # the answer is the product (a profile): empty is a failure
            for c in completions:
                if c.ok and not c.text.strip():
                    c.error, c.text = "empty answer", None
            return [[] for _ in completions]
        if self.parser == "given":
            return [list(c.names or []) if c.ok else [] for c in completions]
        if self.parser == "regex":
            return [self.parse_names(c.text) if c.ok else [] for c in completions]
        todo = [i for i, c in enumerate(completions) if c.ok]
        extracted = self.backend.generate([extract_prompt(completions[i].text) for i in todo])
        if len(extracted) != len(todo):
            raise GenerationError(f"backend returned {len(extracted)} extractions for {len(todo)} prompts")
        names = [[] for _ in completions]
        for i, e in zip(todo, extracted):
            if e.ok:
                names[i] = self.parse_names(e.text)
                completions[i].extracted = e.text
            else:
                completions[i].error = f"extraction call failed: {e.error}"
        return names

    def run(self, requests):
        """``requests``: list of dicts with ``user``, ``domain`` and ``prompt``.

        Returns the records of every requested user (last record per user)."""
        done = {u for u, r in self.load_records().items() if r.get("status") == "ok"}
        todo = [r for r in requests if r["user"] not in done]
        bar = None
        if self.show_progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=self.desc, ncols=100)
        os.makedirs(os.path.dirname(os.path.abspath(self.jsonl)), exist_ok=True)
        self._drop_torn_tail()
        t0 = time.time()
        with open(self.jsonl, "a", encoding="utf-8") as f:
            for i in range(0, len(todo), self.batch_size):
                batch = todo[i : i + self.batch_size]
                if hasattr(self.backend, "generate_requests"):
                    comps = self.backend.generate_requests(batch)
                else:
                    comps = self.backend.generate([r["prompt"] for r in batch])
                if len(comps) != len(batch):
                    raise GenerationError(f"backend returned {len(comps)} answers for {len(batch)} prompts")
                names = self._parse(comps)
                for r, c, n in zip(batch, comps, names):
                    rec = {
                        "user": r["user"],
                        "domain": r.get("domain"),
                        "status": "ok" if c.ok else "failed",
                        "raw": c.text,
                        "names": n,
                        "pseudo_items": len(n) > self.min_names,
                        "error": c.error,
                        "attempts": c.attempts,
                    }
                    if self.parser == "llm":
                        rec["extracted"] = getattr(c, "extracted", None)  # the extraction call's answer
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        recs = self.load_records()
        wanted = {r["user"] for r in requests}
        out = {u: recs[u] for u in wanted if u in recs}
        failed = sum(1 for r in out.values() if r["status"] != "ok")
        if not todo and os.path.isfile(self.manifest):
            return out  # nothing ran: the manifest already describes these records
        atomic_write_json(
            self.manifest,
            {
                "identity": self.identity,
                "jsonl": os.path.basename(self.jsonl),
                "users_requested": len(wanted),
                "users_ok": len(out) - failed,
                "users_failed": failed,
                "users_with_pseudo_items": sum(1 for r in out.values() if r["status"] == "ok" and r["pseudo_items"]),
                "complete": failed == 0 and len(out) == len(wanted),
                "last_run_seconds": time.time() - t0,
            },
        )
        if failed:
            logger.warning(f"{self.desc}: {failed} users failed; they are recorded and retried on the next run")
        return out


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
