"""Restricted reading of pickled dictionaries from public releases.

The LLMCDSR release ships its item maps and titles as pickles. A pickle can run
arbitrary code when loaded, so downloaded pickles are read with an unpickler that
refuses every global (class or function) lookup: only the built-in opcodes for
dicts, lists/tuples, strings and integers can be decoded. The result is then checked
to be a plain ``dict`` with ``str`` keys and values of the expected type.
"""

import io
import pickle


class SafePickleError(ValueError):
    """A pickle that is not a plain dict of str -> str/int, or cannot be decoded."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}' (only plain dicts of str/int are allowed)"
        )


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
        obj = _NoGlobalsUnpickler(io.BytesIO(data)).load()
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
