"""The no-LLM stand-in for stage 1: retrieval from overlapped users. NOT an LLM.

For a single-domain user of domain D, the overlapped training users whose D titles are
closest in text-embedding space (cosine between mean title embeddings) are found, and
their D' titles (most similar neighbour first, each title once) become the "generated"
names. It answers in the same numbered-list text an LLM would, so parsing, embedding and
everything downstream run unchanged, and it says what it is in its identity (recorded in
every manifest and results file).
"""

import numpy as np

from recbole_cdsr.llm.backends import Completion


class RetrievalBackend:
    is_llm = False

    def __init__(self, encoder, overlapped, neighbours=3, max_names=20):
        """
        Args:
            encoder: a :class:`~recbole_cdsr.llm.encoders.TextEncoder`.
            overlapped: ``{D: [(D titles, D' titles), ...]}`` of overlapped training users.
            neighbours (int): overlapped users whose D' titles are taken.
            max_names (int): at most this many names per answer.
        """
        self.encoder = encoder
        self.neighbours = int(neighbours)
        self.max_names = int(max_names)
        self.pool = {}
        for dom, pairs in overlapped.items():
            pairs = [p for p in pairs if p[0] and p[1]]
            keys = self._mean_embeddings([src for src, _ in pairs])
            self.pool[dom] = (keys, [tgt for _, tgt in pairs])

    def identity(self):
        return {
            "backend": "retrieval",
            "note": "no LLM: other-domain titles of the nearest overlapped users",
            "encoder": self.encoder.identity(),
            "neighbours": self.neighbours,
            "max_names": self.max_names,
        }

    def _mean_embeddings(self, title_lists):
        flat = [t for ts in title_lists for t in ts]
        if not flat:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        emb = self.encoder.encode(flat)
        out = np.zeros((len(title_lists), emb.shape[1]), dtype=np.float32)
        pos = 0
        for i, ts in enumerate(title_lists):
            v = emb[pos : pos + len(ts)].mean(axis=0)
            out[i] = v / max(np.linalg.norm(v), 1e-12)
            pos += len(ts)
        return out

    def generate_requests(self, requests):
        """``requests``: dicts with ``domain`` and ``titles`` (the user's own D titles)."""
        queries = self._mean_embeddings([r["titles"] for r in requests])
        out = []
        for r, q in zip(requests, queries):
            keys, targets = self.pool[r["domain"]]
            order = np.argsort(-(keys @ q), kind="stable")[: self.neighbours]
            names, seen = [], set()
            for j in order:
                for t in targets[j]:
                    if t.lower() not in seen:
                        seen.add(t.lower())
                        names.append(t)
            names = names[: self.max_names]
            out.append(Completion("\n".join(f"{i}. {n}" for i, n in enumerate(names, 1))))
        return out

    def generate(self, prompts):
        raise TypeError("the retrieval stand-in answers requests with titles, not prompts")
