"""Read the paper's released generation embeddings (``<dataset>_generation_jina.pkl``) safely.

The file is a pickled list of ``(domain, user id, float array [L, d])``, one entry per
single-domain user whose parsed answer had 3 or more names (the public code writes no entry
for the others). In the release the domain is the integer 0 (domain A) or 1 (domain B) and
the user id is the user's 1-based line number in ``train_A.txt`` / ``train_B.txt``; in the
released files that line number is also the user id written on the line, which the
converter keeps in its user tokens (``A_5``, ``B_5``). Domains written as ``'A'``/``'B'``
are accepted too.

The file is decoded with the project's restricted unpickler admitting only what numpy needs
to rebuild plain arrays (``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``,
``scalar``: :data:`~dataset_converters.safe_pickle.NUMPY_ARRAY_GLOBALS`); any other global is refused, and the result is checked to have exactly that shape of content.
"""

import numbers

import numpy as np

from dataset_converters.safe_pickle import NUMPY_ARRAY_GLOBALS, restricted_loads

_DOMAINS = {0: "A", 1: "B", "A": "A", "B": "B"}


class ReleaseImportError(ValueError):
    pass


def release_domain(dom):
    """``'A'`` or ``'B'`` of a release entry's domain (0/1 as released, or 'A'/'B'); None if neither."""
    if isinstance(dom, (bool, np.bool_)):
        return None
    if isinstance(dom, numbers.Integral):
        return _DOMAINS.get(int(dom))
    if isinstance(dom, str):
        return _DOMAINS.get(dom)
    return None


def user_token(domain, uid):
    """The converted dataset's token of a release user: ``A_5`` for (domain A, line 5)."""
    return f"{domain}_{uid}"


def read_generation_embeddings(path):
    """``{(domain 'A'/'B', user id): float32 array [L, d]}`` from a released generation pickle."""
    try:
        with open(path, "rb") as f:
            obj = restricted_loads(f.read(), NUMPY_ARRAY_GLOBALS)
    except OSError as e:
        raise ReleaseImportError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:
        raise ReleaseImportError(f"{path}: not a safe pickle of generation embeddings: {e}") from None
    if not isinstance(obj, (list, tuple)):
        raise ReleaseImportError(f"{path}: expected a list of (domain, user, array), found {type(obj).__name__}")
    out, dim = {}, None
    for i, entry in enumerate(obj):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ReleaseImportError(f"{path}: entry {i} is not a (domain, user, array) triple")
        dom, uid, arr = entry
        d = release_domain(dom)
        if d is None:
            raise ReleaseImportError(
                f"{path}: entry {i}: domain {dom!r} is neither 0/1 (the release's A/B) nor 'A'/'B'"
            )
        if isinstance(uid, (bool, np.bool_)) or not isinstance(uid, numbers.Integral) or int(uid) < 1:
            raise ReleaseImportError(
                f"{path}: entry {i}: user id {uid!r} is not a positive integer (a 1-based line of train_{d}.txt)"
            )
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise ReleaseImportError(f"{path}: entry {i}: expected a 2-d float array")
        if dim is not None and arr.shape[1] != dim:
            raise ReleaseImportError(f"{path}: entry {i}: width {arr.shape[1]} differs from {dim}")
        dim = arr.shape[1]
        key = (d, int(uid))
        if key in out:
            raise ReleaseImportError(f"{path}: entry {i}: user {user_token(*key)} appears twice")
        out[key] = arr.astype(np.float32)
    return out


def generation_width(gens):
    """The vector width of ``read_generation_embeddings``'s result (None when empty)."""
    for arr in gens.values():
        return int(arr.shape[1])
    return None
