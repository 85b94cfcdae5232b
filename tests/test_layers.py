import math

import pytest
import torch

from recbole.model.layers import FeedForward

from recbole_cdsr.model.layers import CausalSeqEncoder, FastDropout, unique_padded


def test_fast_dropout_keeps_the_distribution_and_is_identity_in_eval():
    torch.manual_seed(0)
    d = FastDropout(0.3)
    x = torch.ones(200_000)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # keep probability 1 - p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))  # inverted scaling
    d.eval()
    assert torch.equal(d(x), x)


def test_encoder_gelu_is_recboles_gelu_and_no_torch_dropout_is_left():
    enc = CausalSeqEncoder(n_items=50, hidden_size=16, max_len=10, n_layers=2, inner_size=32)
    ffs = [m for m in enc.modules() if isinstance(m, FeedForward)]
    assert len(ffs) == 2 and not any(isinstance(m, torch.nn.Dropout) for m in enc.modules())
    x = torch.randn(1000)
    assert torch.allclose(ffs[0].intermediate_act_fn(x), ffs[0].gelu(x), atol=1e-6)


def test_fast_layers_on_recboles_encoder_keep_its_function():
    """run_recbole_cdsr applies fast_layers to every model (config fast_layers: True): in eval
    mode the output must be RecBole's own, in train mode no torch Dropout may remain."""
    import copy

    from recbole.model.layers import TransformerEncoder

    from recbole_cdsr.model.layers import fast_layers

    torch.manual_seed(0)
    enc = TransformerEncoder(n_layers=2, n_heads=2, hidden_size=16, inner_size=32, hidden_act="gelu")
    fast = fast_layers(copy.deepcopy(enc))
    assert any(isinstance(m, torch.nn.Dropout) for m in enc.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    assert all(m.intermediate_act_fn is torch.nn.functional.gelu for m in fast.modules() if isinstance(m, FeedForward))
    x, mask = torch.randn(3, 5, 16), torch.zeros(3, 1, 5, 5)
    enc.eval(), fast.eval()
    assert torch.allclose(enc(x, mask)[-1], fast(x, mask)[-1], atol=1e-5)
    relu = fast_layers(TransformerEncoder(n_layers=1, n_heads=1, hidden_size=8, inner_size=8, hidden_act="relu"))
    assert all(m.intermediate_act_fn is not torch.nn.functional.gelu for m in relu.modules() if isinstance(m, FeedForward))


def test_unique_padded_by_hand():
    ids = torch.tensor([[7, 3, 3, 0], [9, 7, 0, 0]])
    values, inverse = unique_padded(ids, multiple=3)
    assert values.tolist() == [0, 3, 7, 9, 0, 0]  # 4 distinct, padded with 0 to 6
    assert inverse.tolist() == [[2, 1, 1, 0], [3, 2, 0, 0]]
    assert torch.equal(values[inverse], ids)
    values, inverse = unique_padded(ids, multiple=4)  # already a multiple: nothing added
    assert values.tolist() == [0, 3, 7, 9] and torch.equal(values[inverse], ids)
    values, _ = unique_padded(torch.tensor([5, 6]), multiple=5, fill=-1)
    assert values.tolist() == [5, 6, -1, -1, -1]


def test_bucketed_bce_equals_a_loop_over_positions_and_groups_change_nothing():
    from recbole_cdsr.model.layers import bucketed_bce, plan_length_buckets

    torch.manual_seed(0)
    enc = CausalSeqEncoder(n_items=30, hidden_size=8, max_len=6, n_layers=1, n_heads=2, inner_size=16,
                           dropout=0.0, attn_dropout=0.0)
    enc.eval()
    lens = torch.tensor([1, 6, 2, 2, 5, 3])
    inputs = torch.zeros(6, 6, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    for i, n in enumerate(lens.tolist()):
        inputs[i, :n] = torch.randint(1, 30, (n,))
        targets[i, :n] = torch.randint(1, 30, (n,))
    neg = torch.randint(1, 30, inputs.shape)
    mask = (targets > 0).float()
    mask[1, 4] = 0.0  # a real target left out by the mask
    extra = torch.randn(6, 6, 8)

    total, count = bucketed_bce(enc, enc.item_embedding, inputs, targets, neg, mask, [(None, 6)], extra)
    e = enc.item_embedding.weight.detach()
    h = enc(inputs, item_emb=e[inputs] + extra).detach()
    by_hand, n = 0.0, 0
    for i in range(6):
        for t in range(6):
            if mask[i, t]:
                p, q = float(h[i, t] @ e[targets[i, t]]), float(h[i, t] @ e[neg[i, t]])
                by_hand += math.log1p(math.exp(-p)) + math.log1p(math.exp(q))
                n += 1
    assert n == int(lens.sum()) - 1 and float(count) == n
    assert total.item() == pytest.approx(by_hand, rel=1e-5)

    groups = plan_length_buckets(lens, max_buckets=3, overhead=0)
    assert len(groups) > 1 and max(L for _, L in groups[:-1]) < 6  # rows really run trimmed
    g_total, g_count = bucketed_bce(enc, enc.item_embedding, inputs, targets, neg, mask, groups, extra)
    assert float(g_count) == n and g_total.item() == pytest.approx(total.item(), rel=1e-5)
