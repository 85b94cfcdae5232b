"""The no-LLM stand-in for stage 1: retrieval from overlapped users. NOT an LLM.

For a single-domain user of domain D, the overlapped training users whose D titles are
closest in text-embedding space (cosine between mean title embeddings) are found, and
their D' titles (most similar neighbour first, each title once) become the "generated"
names. It answers in the same numbered-list text an LLM would and also hands the names over
as they are (``Completion.names``, read by the parser ``given``, which ``llm_parser: auto``
picks for it), so nothing is lost to parsing; embedding and everything downstream run
unchanged, and it says what it is in its identity (recorded in every manifest and results
file).
"""

import numpy as np

from recbole_cdsr.llm.backends import Completion


class RetrievalBackend:
    is_llm = False
    gives_names = True

    def __init__(self, encoder, overlapped, neighbours=3, max_names=20, title_vectors=None):
        """
        Args:
            encoder: a :class:`~recbole_cdsr.llm.encoders.TextEncoder`.
            overlapped: ``{D: [(D titles, D' titles), ...]}`` of overlapped training users.
            neighbours (int): overlapped users whose D' titles are taken.
            max_names (int): at most this many names per answer.
            title_vectors (dict): title -> vector already computed with ``encoder`` (the
                cached item-title embeddings); other titles are encoded on the fly.
        """
        self.encoder = encoder
        self.title_vectors = title_vectors or {}
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
        emb = encode_with_cache(self.encoder, flat, self.title_vectors)
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
            text = "\n".join(f"{i}. {n}" for i, n in enumerate(names, 1))
            out.append(Completion(text, names=names))
        return out

    def generate(self, prompts):
        raise TypeError("the retrieval stand-in answers requests with titles, not prompts")


def encode_with_cache(encoder, texts, known):
    """``encoder.encode(texts)``, taking vectors of texts in ``known`` from there."""
    missing = sorted({t for t in texts if t not in known})
    fresh = dict(zip(missing, encoder.encode(missing))) if missing else {}
    return np.asarray([known[t] if t in known else fresh[t] for t in texts], dtype=np.float32)


class CachedEncoder:
    """An encoder that reuses known vectors (same identity as the wrapped encoder)."""

    def __init__(self, encoder, known):
        self.encoder, self.known, self.dim = encoder, known, encoder.dim

    def identity(self):
        return self.encoder.identity()

    def encode(self, texts, show_progress=False):
        return encode_with_cache(self.encoder, list(texts), self.known)
