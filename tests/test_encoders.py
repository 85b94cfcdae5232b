import json
import os

import numpy as np
import pytest

from recbole_cdsr.llm.encoders import EncoderError, TextEncoder, item_text_embeddings


def test_minilm_encodes_offline(minilm):
    e = minilm.encode(["Japanese green tea", "Matcha green tea powder", "Cast iron skillet"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # related titles are closer than unrelated ones
    assert e[0] @ e[1] > e[0] @ e[2]
    assert np.array_equal(e, minilm.encode(["Japanese green tea", "Matcha green tea powder", "Cast iron skillet"]))


def test_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="cannot load text encoder"):
        TextEncoder(str(tmp_path / "no-such-model"))


def test_item_embeddings_cached_and_invalidated(tmp_path, minilm):
    d = tmp_path / "toy"
    d.mkdir()
    item = d / "toy.item"
    item.write_text('item_id:token\tdomain:token\ttitle:token_seq\na1\tA\tGreen tea\nb1\tB\t"Pan 12"" wide"\n')
    tokens, doms, emb = item_text_embeddings(str(d), "toy", minilm)
    assert list(tokens) == ["a1", "b1"] and list(doms) == ["A", "B"] and emb.shape == (2, 384)
    assert np.allclose(emb[1], minilm.encode(['Pan 12" wide'])[0], atol=1e-5)
    man = json.loads((d / "toy.textemb-all-MiniLM-L6-v2.json").read_text())
    assert man["identity"]["encoder"]["name"] == "all-MiniLM-L6-v2" and man["identity"]["items"] == 2
    npy = d / "toy.textemb-all-MiniLM-L6-v2.npy"
    mtime = os.path.getmtime(npy)
    item_text_embeddings(str(d), "toy", minilm)
    assert os.path.getmtime(npy) == mtime  # reused
    item.write_text("item_id:token\tdomain:token\ttitle:token_seq\na1\tA\tGreen tea\nb1\tB\tKnife\n")
    _, _, emb2 = item_text_embeddings(str(d), "toy", minilm)
    assert np.allclose(emb2[1], minilm.encode(["Knife"])[0], atol=1e-5)  # rebuilt for the new file
