"""A resumable LLM generation job over a set of users, and the parsers of its answers.

Each request is one user's prompt; answers are parsed into item names (or kept as text):

``llm``    a second call to the same model with an extraction prompt (the caller's
           ``extract_prompt``), then the name pattern on its answer;
``regex``  the name pattern on the answer itself (one call per user);
``given``  the names a non-LLM backend hands over as they are (the retrieval stand-in);
``text``   the answer itself is the product (a user profile); an empty answer fails;
``auto``   ``llm`` for an LLM backend, ``given`` otherwise.

Name pattern (``name_pattern``): ``lines`` (:func:`parse_names`: numbered or bulleted lines,
the last line too) or ``public`` (:func:`parse_names_public`: LLMCDSR's public regex).
Users with ``min_names`` or fewer names get no pseudo items.

Results are appended per user to a JSONL file (user, domain, status, raw answer, names,
error, attempts), flushed after every batch: a crash loses at most the batch in flight and
a rerun skips the users already done (``status: ok``); failed users are retried on the next
run and stay recorded as failed until they succeed. A manifest records backend, model,
prompt version, parser and settings; the JSONL file name carries a hash of them, so a
different configuration never mixes with an earlier one. The prompts themselves belong to
the model's stages (:mod:`recbole_cdsr.stages`).
"""

import hashlib
import json
import logging
import os
import re
import time

from recbole_cdsr.utils import atomic_write_json

logger = logging.getLogger(__name__)

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


PROGRESS_SECONDS = 30  # a job without a progress bar logs how far it is at most this often


class GenerationJob:
    """Generation for a set of users, resumable through an append-only JSONL file.

    Args:
        out_dir (str): where the JSONL and manifest go (the dataset folder).
        dataset_name (str): prefix of the files.
        backend: an object with ``generate(prompts) -> [Completion]`` and ``identity()``.
        prompt_version (str): names the prompt format (part of the identity).
        parser (str): ``auto``, ``llm``, ``regex``, ``given`` (names) or ``text`` (the answer
            itself is the product); see the module docstring. ``auto`` is resolved here and the
            resolved parser is what the identity records.
        name_pattern (str): ``lines`` or ``public`` (parsers ``llm`` and ``regex``).
        settings (dict): everything else that defines the output (shot, seed, ...).
        extract_prompt: parser ``llm``: answer text -> the prompt of the extraction call.
    """

    def __init__(self, out_dir, dataset_name, backend, prompt_version, parser="auto", settings=None,
                 batch_size=16, min_names=2, show_progress=True, kind="gen", desc="LLM generation",
                 name_pattern="lines", extract_prompt=None):
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
        if parser == "llm" and extract_prompt is None:
            raise GenerationError("llm_parser 'llm' needs the stage's extraction prompt; use 'regex' here")
        if parser == "given" and not gives_names:
            raise GenerationError("llm_parser 'given' needs a backend that hands over names (the retrieval stand-in)")
        if name_pattern not in NAME_PATTERNS:
            raise GenerationError(f"name_pattern must be one of {', '.join(NAME_PATTERNS)}, got {name_pattern!r}")
        self.backend = backend
        self.extract_prompt = extract_prompt
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
        extracted = self.backend.generate([self.extract_prompt(completions[i].text) for i in todo])
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
        said = t0  # without a bar: a progress line at most every PROGRESS_SECONDS, and one at the end
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
                else:  # inside the loop, so todo has users
                    now, n_done = time.time(), i + len(batch)
                    if now - said >= PROGRESS_SECONDS or n_done == len(todo):
                        said = now
                        left = (now - t0) / n_done * (len(todo) - n_done)
                        logger.info(f"{self.desc}: {len(requests) - len(todo) + n_done} of {len(requests)} users "
                                    f"({n_done} this run in {(now - t0) / 60:.1f} min; about {left / 60:.1f} min left)")
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
