"""Stage 1 of LLMCDSR: candidate-free cross-domain generation for single-domain users.

For every single-domain training user of domain D the LLM is asked, with the release's
instruction prefix for D -> D' and ``shot`` in-context examples (overlapped users, drawn
with a seed), to name D' items the user may like. Answers are parsed into item names
(``regex``: numbered or bulleted lines; ``llm``: a second call that extracts the names and
numbers them from 1, then the regex). Users with ``min_names`` or fewer names (default 2)
get no pseudo items.

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

PROMPT_VERSION = "llmcdsr-icl-v1"
EXTRACT_PROMPT = (
    "Below is a text that recommends some products. Extract the names of the items and "
    "list them numbered from 1, one per line, with nothing else.\n\n### Text:\n{answer}\n\n### Items:\n"
)
_LINE = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")


class GenerationError(ValueError):
    pass


def parse_names(text):
    """Item names from numbered (``1. x``, ``2) y``) or bulleted (``- z``) lines, deduplicated."""
    names, seen = [], set()
    for line in (text or "").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(1).strip().strip('"').strip()
        key = name.lower()
        if len(name) < 2 or key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def build_prompt(prefix, examples, user_titles):
    """The LLMCDSR in-context prompt.

    ``examples``: list of (source-domain titles, target-domain titles) of overlapped users.
    """
    lines = [prefix.rstrip()]
    for i, (src, tgt) in enumerate(examples, 1):
        lines += ["", f"### Example {i}", "Input:"] + list(src) + ["Output:"] + [f"- {t}" for t in tgt]
    lines += ["", "### Input:"] + list(user_titles) + ["", "### Response:", ""]
    return "\n".join(lines)


class GenerationJob:
    """Generation for a set of users, resumable through an append-only JSONL file.

    Args:
        out_dir (str): where the JSONL and manifest go (the dataset folder).
        dataset_name (str): prefix of the files.
        backend: an object with ``generate(prompts) -> [Completion]`` and ``identity()``.
        parser (str): ``regex`` or ``llm``.
        settings (dict): everything else that defines the output (shot, seed, prompt version...).
    """

    def __init__(self, out_dir, dataset_name, backend, parser="regex", settings=None, batch_size=16,
                 min_names=2, show_progress=True, prompt_version=PROMPT_VERSION, kind="gen",
                 desc="LLM generation"):
        if parser not in ("regex", "llm", "text"):
            raise GenerationError(f"parser must be 'regex', 'llm' (names) or 'text' (the answer itself), got {parser!r}")
        if parser == "llm" and not getattr(backend, "is_llm", True):
            raise GenerationError("llm_parser 'llm' needs an LLM backend (hf or openai); use 'regex'")
        self.backend = backend
        self.parser = parser
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
        if self.parser == "regex":
            return [parse_names(c.text) if c.ok else [] for c in completions]
        todo = [i for i, c in enumerate(completions) if c.ok]
        extracted = self.backend.generate([EXTRACT_PROMPT.format(answer=completions[i].text) for i in todo])
        names = [[] for _ in completions]
        for i, e in zip(todo, extracted):
            if e.ok:
                names[i] = parse_names(e.text)
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
