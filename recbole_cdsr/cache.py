"""Cached artefacts: a file built from known inputs, reused only while they are unchanged.

Every cache of the package (candidate sets, title embeddings, pseudo items, stage-2
tables, item text tables, user profiles, search results) is an :class:`Artefact`:

- an **identity**: a JSON dict of everything the file is built from (format version,
  hashes of input files, hyper-parameters, the encoder's identity, ...);
- a **tag** in the file name: the first 12 hex digits of the identity's sha256 (or a
  readable tag the caller gives, such as ``n999-seed2024``; the identity is checked all
  the same), so files built from different inputs never share a name;
- an **atomic write**: the file through a temporary name and a rename, then its manifest
  ``<stem>-<tag>.json`` (``.manifest.json`` for a JSON artefact) (identity, the file's sha256, the caller's record), last: a file
  without a manifest is never taken for complete;
- **verification on reuse**: the manifest must exist, record the same identity and the
  sha256 of the file as it is now. Anything else is a miss, with the reason.
"""

import hashlib
import io
import json
import logging
import os

import numpy as np

from recbole_cdsr.utils import atomic_write_bytes, atomic_write_json, sha256_file, to_jsonable

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


def sha256_path(path):
    """sha256 of a file, or of a folder: over its files' relative paths and sha256s, sorted."""
    if not os.path.isdir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            full = os.path.join(root, f)
            h.update(os.path.relpath(full, path).replace(os.sep, "/").encode() + b"\0" + sha256_file(full).encode())
    return h.hexdigest()


def identity_tag(identity):
    """First 12 hex digits of the sha256 of ``identity`` as canonical JSON."""
    return hashlib.sha256(json.dumps(to_jsonable(identity), sort_keys=True).encode()).hexdigest()[:12]


class Artefact:
    """One cached file ``<directory>/<stem>-<tag><suffix>`` and its manifest.

    Args:
        directory (str): where the file and its manifest live (usually the dataset folder).
        stem (str): the name before the tag, e.g. ``food-kitchen.pseudo``.
        identity (dict): everything the file is built from (JSON values).
        suffix (str): ``.npz``, ``.npy``, ``.json``, or a folder's suffix (:meth:`write_folder`).
        tag (str): a readable tag instead of the identity's hash.
    """

    def __init__(self, directory, stem, identity, suffix=".npz", tag=None):
        self.identity = to_jsonable(identity)  # as it reads back from the manifest
        self.tag = identity_tag(self.identity) if tag is None else tag
        base = os.path.join(directory, f"{stem}-{self.tag}")
        self.path = base + suffix
        self.manifest_path = base + (".manifest.json" if suffix == ".json" else ".json")

    def check(self):
        """``(manifest, None)`` when the file is complete and built from this identity;
        ``(None, None)`` when it was never written; ``(None, reason)`` when the file or its
        manifest is there but cannot be trusted."""
        if not os.path.exists(self.path):
            return None, None  # never written (or removed): a manifest alone is simply replaced
        if not os.path.isfile(self.manifest_path):
            return None, f"{self.path} has no manifest (an interrupted write)"
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            return None, f"manifest {self.manifest_path} is unreadable ({e})"
        if not isinstance(m, dict) or m.get("manifest_format") != MANIFEST_FORMAT:
            return None, f"manifest {self.manifest_path} is of another format (written by another version)"
        stored = m.get("identity")
        if stored != self.identity:
            keys = sorted(k for k in set(self.identity) | set(stored or {})
                          if (stored or {}).get(k) != self.identity.get(k))
            return None, f"{self.path} was built from other inputs (differs in: {', '.join(keys)})"
        if m.get("sha256") != sha256_path(self.path):
            return None, f"{self.path} is not the file its manifest describes (changed after it was written)"
        return m, None

    def cached(self, what="cached file"):
        """The manifest when the file can be reused, else None (a reason is logged as a
        warning; a file never written is not worth one)."""
        m, reason = self.check()
        if reason:
            logger.warning(f"{what}: {reason}; building it again")
        return m

    def write(self, data, **record):
        """Write ``data`` (bytes), then the manifest (identity, sha256, ``record``); returns
        the manifest."""
        atomic_write_bytes(self.path, data)
        manifest = dict(to_jsonable(record), manifest_format=MANIFEST_FORMAT, identity=self.identity,
                        file=os.path.basename(self.path), sha256=sha256_file(self.path))
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def write_folder(self, build, **record):
        """``build(folder)`` fills a temporary folder beside ``path``, which is then renamed to
        ``path`` (an earlier folder of that name is replaced); then the manifest."""
        import shutil
        import tempfile

        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.path) + ".", dir=parent)
        try:
            build(tmp)
            if os.path.isdir(self.path):
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = dict(to_jsonable(record), manifest_format=MANIFEST_FORMAT, identity=self.identity,
                        file=os.path.basename(self.path), sha256=sha256_path(self.path))
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def write_arrays(self, arrays, compressed=False, **record):
        """``arrays``: a dict of numpy arrays (``.npz``) or one array (``.npy``); no pickles."""
        buf = io.BytesIO()
        if self.path.endswith(".npy"):
            np.save(buf, np.asarray(arrays), allow_pickle=False)
        else:
            (np.savez_compressed if compressed else np.savez)(buf, **arrays)
        return self.write(buf.getvalue(), **record)

    def write_json(self, obj, **record):
        return self.write((json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode(), **record)

    def load_arrays(self):
        """The arrays of the file (a dict for ``.npz``), read without pickles."""
        if self.path.endswith(".npy"):
            return np.load(self.path, allow_pickle=False)
        with np.load(self.path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def load_json(self):
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)


def verified_manifest(path):
    """The manifest of an artefact file given by its path (a config value such as
    ``pseudo_items``), after checking that the file is the one it describes; raises
    ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    stem, suffix = os.path.splitext(path)
    man = stem + (".manifest.json" if suffix == ".json" else ".json")
    if not (os.path.isfile(path) and os.path.isfile(man)):
        raise FileNotFoundError(f"{path} (or its manifest {os.path.basename(man)}) does not exist")
    try:
        with open(man, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"manifest {man} is unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("manifest_format") != MANIFEST_FORMAT:
        raise ValueError(f"{man} is not a manifest of this version; run the model's stages again")
    if m.get("sha256") != sha256_file(path):
        raise ValueError(f"{path} does not match its manifest (incomplete or changed after it was written)")
    return m
