"""The cached-artefact helper every cache uses: identity, tag, atomic write, manifest with
the file's hash, verification on reuse."""

import json
import os

import numpy as np
import pytest

from recbole_cdsr.cache import MANIFEST_FORMAT, Artefact, identity_tag, verified_manifest


def test_write_reuse_and_every_reason_to_rebuild(tmp_path):
    ident = {"format_version": 1, "source_sha256": "abc", "hp": {"lr": 0.001, "betas": (0.9, 0.98)}}
    art = Artefact(str(tmp_path), "toy.table", ident)
    # the tag is the identity's hash, the tuple read as the list JSON gives back
    assert art.tag == identity_tag(dict(ident, hp={"lr": 0.001, "betas": [0.9, 0.98]})) and len(art.tag) == 12
    assert art.path == str(tmp_path / f"toy.table-{art.tag}.npz")
    assert art.check() == (None, None)  # never written: no reason to complain
    m = art.write_arrays({"emb": np.arange(6, dtype=np.float32).reshape(2, 3)}, rows=2)
    assert m["manifest_format"] == MANIFEST_FORMAT and m["rows"] == 2 and m["file"] == os.path.basename(art.path)
    assert json.loads(open(art.manifest_path).read()) == m
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(art.path), os.path.basename(art.manifest_path)])
    again = Artefact(str(tmp_path), "toy.table", ident)
    assert again.cached() == m and np.array_equal(again.load_arrays()["emb"], [[0, 1, 2], [3, 4, 5]])

    # other inputs under the same (readable) tag: a miss naming the key that differs
    other = Artefact(str(tmp_path), "toy.table", dict(ident, source_sha256="abd"), tag=art.tag)
    m2, reason = other.check()
    assert m2 is None and "built from other inputs (differs in: source_sha256)" in reason
    # the file changed after its manifest was written
    with open(art.path, "ab") as f:
        f.write(b"x")
    m3, reason = art.check()
    assert m3 is None and "is not the file its manifest describes" in reason
    # a file without its manifest: an interrupted write, never taken for complete
    os.remove(art.manifest_path)
    assert art.check()[1].endswith("has no manifest (an interrupted write)")
    # a manifest of another format
    art.write_arrays({"emb": np.zeros(1)})
    man = json.loads(open(art.manifest_path).read())
    man["manifest_format"] = 0
    open(art.manifest_path, "w").write(json.dumps(man))
    assert "of another format" in art.check()[1]


def test_verified_manifest_names_the_file(tmp_path):
    art = Artefact(str(tmp_path), "t", {"v": 1}, suffix=".npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verified_manifest(art.path)
    art.write_arrays(np.ones(3))
    assert verified_manifest(art.path)["identity"] == {"v": 1}
    np.save(art.path, np.zeros(3))
    with pytest.raises(ValueError, match="does not match its manifest"):
        verified_manifest(art.path)
