"""Small shared helpers: paths, atomic writes, hashing, process-wide switches."""

import json
import os
import tempfile

import torch

from dataset_converters.llmcdsr_release import sha256_file  # noqa: F401  (one implementation)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def properties_dir():
    """Folder of the plugin's YAML defaults.

    Installed (non-editable) it is ``recbole_cdsr/properties``; in a source checkout or an
    editable install it is ``properties/`` at the top of the repository.
    """
    for cand in (
        os.path.join(PACKAGE_DIR, "properties"),
        os.path.join(os.path.dirname(PACKAGE_DIR), "properties"),
    ):
        if os.path.isfile(os.path.join(cand, "overall.yaml")):
            return cand
    raise FileNotFoundError(
        "recbole_cdsr: cannot find properties/overall.yaml (reinstall the package)"
    )


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def disable_anomaly_detection():
    """Importing RecBole's sequential models (SINE) turns on autograd anomaly detection for
    the whole process: about 25% slower, and it breaks second-order steps. Turn it off."""
    torch.autograd.set_detect_anomaly(False)


def to_jsonable(value):
    """Config values as plain JSON (devices, enums and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, int) or type(value).__name__.startswith(("int", "uint")):
        return int(value)
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return float(value)
    return str(value)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator():
    """Keep large freed blocks in the process instead of returning them to the OS.

    Full-softmax (CE) training allocates tensors of batch x items floats (hundreds of MB)
    every step; glibc's defaults hand them back with munmap and fault them in again, which
    measured here as ~35% of a SASRec step on 2 CPU cores (4.3 s -> 2.8 s per batch of
    2048 on Food-Kitchen). Only glibc is affected; elsewhere this does nothing.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = (
            libc.mallopt(m_mmap_threshold, 1 << 30)
            and libc.mallopt(m_trim_threshold, 1 << 36)
            and libc.mallopt(m_top_pad, 1 << 28)
        )
        _ALLOCATOR_TUNED = bool(ok)
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


def code_fingerprint():
    """sha256 (first 12 hex digits) over the plugin's source files and YAML defaults: which
    code a result came from. Recorded in every benchmark line and calibration entry; it is
    not part of a run's config hash (see ``benchmark/plan.py``)."""
    import hashlib

    h = hashlib.sha256()
    roots = [(PACKAGE_DIR, (".py",)), (properties_dir(), (".yaml", ".hyper"))]
    for root, exts in roots:
        files = []
        for d, _, names in os.walk(root):
            files += [os.path.join(d, n) for n in names if n.endswith(exts)]
        for f in sorted(files, key=lambda x: os.path.relpath(x, root)):
            h.update(os.path.relpath(f, root).replace(os.sep, "/").encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:12]
