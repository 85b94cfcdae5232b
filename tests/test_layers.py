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


class _PublicLog2Feats(torch.nn.Module):
    """A minimal re-statement of the public LLMCDSR code's ``SASRec.log2feats`` (right-aligned
    rows, ``torch.nn.MultiheadAttention`` with a causal mask and no key-padding mask, positions
    over the padded window), sharing the weights of a PublicSASRecEncoder."""

    def __init__(self, enc, dropout):
        super().__init__()
        self.enc = enc
        self.mha = torch.nn.ModuleList()
        for a in enc.attention_layers:
            H = a.in_proj_weight.shape[1]
            m = torch.nn.MultiheadAttention(H, a.h, dropout)
            with torch.no_grad():
                m.in_proj_weight.copy_(a.in_proj_weight)
                m.in_proj_bias.copy_(a.in_proj_bias)
                m.out_proj.weight.copy_(a.out_proj.weight)
                m.out_proj.bias.copy_(a.out_proj.bias)
            self.mha.append(m)

    def forward(self, log_seqs):
        e = self.enc
        seqs = e.item_embedding(log_seqs) * e.item_embedding.embedding_dim**0.5
        seqs = seqs + e.position_embedding(torch.arange(log_seqs.shape[1]).expand_as(log_seqs))
        timeline = log_seqs == 0
        seqs = seqs * ~timeline.unsqueeze(-1)
        tl = seqs.shape[1]
        causal = ~torch.tril(torch.ones(tl, tl, dtype=torch.bool))
        for i, m in enumerate(self.mha):
            seqs = seqs.transpose(0, 1)
            q = e.attention_layernorms[i](seqs)
            out, _ = m(q, seqs, seqs, attn_mask=causal)
            seqs = (q + out).transpose(0, 1)
            seqs = e.forward_layernorms[i](seqs)
            f = e.forward_layers[i]
            seqs = f.conv2(torch.relu(f.conv1(seqs))) + seqs
            seqs = seqs * ~timeline.unsqueeze(-1)
        return e.last_layernorm(seqs)


def _public_pair(H=16, L=8, heads=2, seed=0):
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    torch.manual_seed(seed)
    enc = PublicSASRecEncoder(30, H, L, n_layers=2, n_heads=heads, dropout=0.5)
    with torch.no_grad():  # non-zero biases: the padded slots' keys and values matter
        for a in enc.attention_layers:
            a.in_proj_bias.normal_()
    return enc, _PublicLog2Feats(enc, 0.5)


def test_public_backbone_equals_the_public_log2feats_on_left_aligned_rows():
    L = 8
    enc, ref = _public_pair(L=L)
    enc.eval(), ref.eval()
    lens = [1, 3, 8, 5, 2]
    left = torch.zeros(len(lens), L, dtype=torch.long)
    right = torch.zeros(len(lens), L, dtype=torch.long)
    for b, n in enumerate(lens):
        items = torch.randint(1, 30, (n,))
        left[b, :n], right[b, L - n:] = items, items
    ours, public = enc(left), ref(right)
    for b, n in enumerate(lens):
        assert torch.allclose(ours[b, :n], public[b, L - n:], atol=1e-5), n
    # the same rows cut to 5 columns (length buckets): the same outputs, positions and padding
    # enter only through each row's length
    short = [b for b, n in enumerate(lens) if n <= 5]
    cut = enc(left[short, :5])
    for i, b in enumerate(short):
        assert torch.allclose(cut[i, : lens[b]], ours[b, : lens[b]], atol=1e-6)
    # positions count over the window: the last item has position L - 1 whatever the length,
    # so an item seen alone gives the same output as the same item at the end of the window
    one = enc(torch.tensor([[7, 0, 0]]))[0, 0]
    moved = enc.position_embedding.weight.detach().clone()
    with torch.no_grad():
        enc.position_embedding.weight[: L - 1] = 0.0  # only position L - 1 left
        assert torch.allclose(enc(torch.tensor([[7, 0, 0]]))[0, 0], one)
        enc.position_embedding.weight.copy_(moved)
    with pytest.raises(ValueError, match="exceed the backbone's window"):
        enc(torch.ones(1, L + 1, dtype=torch.long))


def test_public_backbone_attention_dropout_has_the_public_distribution():
    """The padded slots, folded into one key, are dropped with a binomial count: mean and
    spread of the outputs over many draws match MultiheadAttention's own dropout."""
    L, H = 8, 8
    enc, ref = _public_pair(H=H, L=L, heads=1, seed=3)
    attn, mha = enc.attention_layers[0], ref.mha[0]
    attn.train(), mha.train()
    torch.manual_seed(1)
    n = 2  # a short row: 6 padded slots that every query attends to
    x_right = torch.zeros(1, L, H)
    x_right[0, L - n:] = torch.randn(n, H)
    q_right = torch.nn.functional.layer_norm(x_right, (H,))
    causal = ~torch.tril(torch.ones(L, L, dtype=torch.bool))
    draws = 12000  # one batch of identical rows: every row draws its own dropout
    xs, qs = x_right.expand(draws, L, H), q_right.expand(draws, L, H)
    with torch.no_grad():
        ours = attn(qs[:, L - n:], xs[:, L - n:], torch.full((draws,), float(L - n)))
        public = mha(qs.transpose(0, 1), xs.transpose(0, 1), xs.transpose(0, 1),
                     attn_mask=causal)[0].transpose(0, 1)[:, L - n:]
    assert torch.allclose(ours.mean(0), public.mean(0), atol=0.03)
    assert torch.allclose(ours.std(0), public.std(0), rtol=0.05, atol=0.01)
    attn.eval()  # dropout is unbiased: the mean is the output without dropout
    with torch.no_grad():
        plain = attn(q_right[:, L - n:], x_right[:, L - n:], torch.tensor([float(L - n)]))[0]
    assert torch.allclose(ours.mean(0), plain, atol=0.02)
    # the folded slot alone (dropping all six or none at once) would spread much wider
    assert public.std(0).mean() > 0.05


def test_public_backbone_initialisation_is_xavier_normal():
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    torch.manual_seed(0)
    enc = PublicSASRecEncoder(3001, 64, 50, n_layers=2, n_heads=1, dropout=0.5)
    w = enc.item_embedding.weight
    assert torch.equal(w[0], torch.zeros(64))  # padding row
    assert abs(w[1:].std().item() - (2.0 / (3001 + 64)) ** 0.5) < 0.05 * (2.0 / (3001 + 64)) ** 0.5
    a = enc.attention_layers[0]
    assert abs(a.in_proj_weight.std().item() - (2.0 / (64 + 192)) ** 0.5) < 0.01
    assert torch.equal(a.in_proj_bias, torch.zeros(192)) and torch.equal(a.out_proj.bias, torch.zeros(64))
    f = enc.forward_layers[0]
    assert abs(f.conv1.weight.std().item() - (1.0 / 64) ** 0.5) < 0.01
    assert 0 < f.conv1.bias.abs().max().item() <= 1.0 / 8  # the convolution's uniform(+-1/sqrt(64)) bias
    assert enc.last_layernorm.eps == 1e-8


@pytest.mark.parametrize("training", [True, False])
def test_public_backbone_packed_slots_give_the_padded_function_and_draws(training):
    """Run on the kept slots alone (padding and a view's blanked slots out of the per-slot
    layers), the encoder gives the outputs and gradients of the run over every slot, with
    dropout on at the same seed, and leaves the random stream where that run leaves it."""
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    torch.manual_seed(0)
    H, W = 24, 9
    enc = PublicSASRecEncoder(0, H, W + 1, n_layers=2, n_heads=2, dropout=0.3, position_padding_idx=0,
                              xavier=False, input_scale=H**0.5)
    with torch.no_grad():  # non-zero biases: the blanked slots' keys and values matter
        for a in enc.attention_layers:
            a.in_proj_bias.normal_()
        enc.last_layernorm.bias.normal_()
    enc.train(training)
    n = torch.tensor([9, 1, 4, 7, 2, 9])
    seq = torch.randint(1, 50, (len(n), W)) * (torch.arange(W) < n.unsqueeze(1))
    keep = (seq > 0) & (seq % 3 != 0)  # a view: some real slots blanked like padding
    keep[1, 0] = False  # a row with no kept slot at all
    pos = torch.where(keep, keep.cumsum(1), 0)
    emb = torch.randn(len(n), W, H)
    weight = torch.randn(len(n), W, H)

    def run(pack_below):
        enc.pack_below = pack_below
        enc.zero_grad()
        e = emb.clone().requires_grad_()
        torch.manual_seed(7)
        out = enc(seq, item_emb=e, positions=pos, keep=keep)
        after = torch.rand(3)
        (out * weight).sum().backward()
        return out.detach(), e.grad, [p.grad.clone() for p in enc.parameters()], after

    padded, packed = run(0.0), run(1.0)
    assert torch.allclose(packed[0], padded[0], atol=1e-5)
    # a blanked slot's output is the last LayerNorm of a zero vector: its bias
    assert torch.allclose(packed[0][~keep], enc.last_layernorm.bias.detach().expand(int((~keep).sum()), H))
    assert torch.allclose(packed[1], padded[1], atol=1e-5) and packed[1][keep].abs().sum() > 0
    assert not packed[1][~keep].any()  # nothing flows into a blanked slot's input
    for a, b in zip(packed[2], padded[2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in packed[2][1:])  # the position table's padding row aside
    assert torch.equal(packed[3], padded[3])  # the same number of draws
    if training:  # the dropout masks are the draws of the padded run: another seed differs
        enc.pack_below = 1.0
        torch.manual_seed(8)
        assert not torch.allclose(enc(seq, item_emb=emb, positions=pos, keep=keep), packed[0], atol=1e-3)


@pytest.mark.parametrize("pack_below", [0.0, 1.0])
def test_public_backbone_attention_biases_enter_the_graph_once(pack_below):
    """Each attention layer splits its in-projection bias once per call (its key and value
    parts serve both the projections and the padded slots): a second split would hand the
    bias its gradient as two partial sums, added in another order than the single split's,
    and a long training run would drift apart by rounding (LLMCDSR on Food-Kitchen: valid
    A/hit@10 0.1653 vs 0.1543 after one epoch)."""
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    torch.manual_seed(0)
    enc = PublicSASRecEncoder(30, 16, 8, n_layers=2, n_heads=2, dropout=0.2)
    enc.pack_below = pack_below
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 1, 2, 3, 4, 9], [7, 8, 9, 10, 11, 12]])
    out = enc(seq)
    biases = {id(a.in_proj_bias): 0 for a in enc.attention_layers}
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(getattr(nxt, "variable", None)) in biases:
                biases[id(nxt.variable)] += 1
            todo.append(nxt)
    assert list(biases.values()) == [1, 1]
