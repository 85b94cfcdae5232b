"""The one restricted unpickler of the project, for pickles of public releases.

The LLMCDSR release ships its item maps, titles and generation embeddings as pickles. A
pickle can run arbitrary code when loaded, so every pickle is read with
:class:`RestrictedUnpickler`, which admits only the globals its caller names (none for the
item maps: only the built-in opcodes for dicts, lists/tuples, strings and numbers decode;
numpy's array rebuilders, :data:`NUMPY_ARRAY_GLOBALS`, for the generation embeddings) and
refuses every other class or function. Callers then check the shape of what was decoded.
"""

import importlib
import io
import pickle

#: what numpy needs to rebuild plain arrays (numpy 1 and numpy 2 module names)
NUMPY_ARRAY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the ``(module, name)`` pairs in ``allowed``."""

    def __init__(self, file, allowed=frozenset()):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):  # noqa: D401 - pickle API
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # numpy 1 names in numpy 2, or the reverse
            other = (module.replace("numpy._core", "numpy.core") if "_core" in module
                     else module.replace("numpy.core", "numpy._core"))
            return getattr(importlib.import_module(other), name)


def restricted_loads(data, allowed=frozenset()):
    """Decode pickle bytes ``data`` admitting only the globals in ``allowed``."""
    return RestrictedUnpickler(io.BytesIO(data), allowed).load()


class SafePickleError(ValueError):
    """A pickle that is not a plain dict of str -> str/int, or cannot be decoded."""


def restricted_load_dict(path, value_type):
    """Read ``path`` as a pickled ``dict[str, value_type]`` without trusting it.

    Args:
        path (str): the pickle file.
        value_type (type): ``int`` or ``str``: the type every value must have.

    Raises:
        SafePickleError: naming the file, when it is not such a dict.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SafePickleError(f"{path}: cannot read ({e.strerror})") from None
    try:
        obj = restricted_loads(data)  # no globals at all
    except Exception as e:  # any decoding failure is the file's fault
        raise SafePickleError(f"{path}: not a safe pickle of a plain dict: {e}") from None
    if type(obj) is not dict:
        raise SafePickleError(
            f"{path}: expected a pickled dict of str -> {value_type.__name__}, "
            f"found {type(obj).__name__}"
        )
    for k, v in obj.items():
        if type(k) is not str or type(v) is not value_type:
            raise SafePickleError(
                f"{path}: expected a dict of str -> {value_type.__name__}, found entry "
                f"{k!r}: {type(v).__name__}"
            )
    return obj
