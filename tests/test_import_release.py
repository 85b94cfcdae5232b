import os
import pickle

import numpy as np
import pytest

from recbole_cdsr.llm.import_release import ReleaseImportError, read_generation_embeddings


def test_reads_arrays_and_refuses_code(tmp_path):
    p = tmp_path / "fk_generation_jina.pkl"
    data = [("A", 1, np.ones((3, 4), dtype=np.float64)), ("B", 7, np.zeros((1, 4), dtype=np.float32))]
    p.write_bytes(pickle.dumps(data))
    got = read_generation_embeddings(str(p))
    assert set(got) == {("A", 1), ("B", 7)} and got[("A", 1)].shape == (3, 4)
    assert got[("A", 1)].dtype == np.float32

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    p.write_bytes(pickle.dumps([("A", 1, Evil())]))
    with pytest.raises(ReleaseImportError, match="refusing to load global"):
        read_generation_embeddings(str(p))
    p.write_bytes(pickle.dumps([("A", 1, np.ones((2, 4))), ("A", 2, np.ones((2, 5)))]))
    with pytest.raises(ReleaseImportError, match="width 5"):
        read_generation_embeddings(str(p))
    p.write_bytes(pickle.dumps({"A": 1}))
    with pytest.raises(ReleaseImportError, match="expected a list"):
        read_generation_embeddings(str(p))
