"""Read the paper's released generation embeddings (``<dataset>_generation_jina.pkl``) safely.

The file is a pickled list of ``(domain, user id, float array [L, d])``. It is decoded with an
unpickler that admits only what numpy needs to rebuild plain arrays (``_reconstruct``,
``ndarray``, ``dtype``, ``scalar``); any other global is refused, and the result is checked
to have exactly that shape of content.
"""

import io
import pickle

import numpy as np

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ReleaseImportError(ValueError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            mod = np.core.multiarray if name in ("_reconstruct", "scalar") else np
            return getattr(mod, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")


def read_generation_embeddings(path):
    """``{(domain, user id): float32 array [L, d]}`` from a released generation pickle."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read())).load()
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
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise ReleaseImportError(f"{path}: entry {i}: expected a 2-d float array")
        if dim is not None and arr.shape[1] != dim:
            raise ReleaseImportError(f"{path}: entry {i}: width {arr.shape[1]} differs from {dim}")
        dim = arr.shape[1]
        out[(str(dom), int(uid))] = arr.astype(np.float32)
    return out
