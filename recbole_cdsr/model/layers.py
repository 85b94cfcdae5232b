"""Building blocks shared by the plugin's models."""

import types

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.layers import FeedForward, TransformerEncoder


class FastDropout(nn.Module):
    """Inverted dropout with a mask from ``rand_like(x) >= p``: the same distribution as
    ``nn.Dropout``, about 3x cheaper on CPU than its Bernoulli sampler (measured here on
    [128, 50, 64]: 8.0 ms vs 2.8 ms per call)."""

    def __init__(self, p):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))

    def rows(self, x, idx, n_rows):
        """Dropout of the rows ``idx`` of a [n_rows, H] tensor given as those rows alone (``x``
        [len(idx), H]): the same mask as :meth:`forward` on the whole tensor draws for them
        (one draw for every value of the whole tensor, in its order, so the random stream
        advances exactly as there)."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(n_rows, x.shape[1], dtype=x.dtype, device=x.device).index_select(0, idx) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))

    def extra_repr(self):
        return f"p={self.p}"


def use_fast_dropout(module):
    """Replace every ``nn.Dropout`` inside ``module`` with :class:`FastDropout` (same p)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module


def fuse_gelu(module):
    """Give every RecBole ``FeedForward`` that uses RecBole's hand-written gelu
    (``x * 0.5 * (1 + erf(x / sqrt 2))``, five autograd ops) the same function as one fused
    op, ``F.gelu``: ~2.5x faster forward and backward on CPU, with a double backward."""
    for m in module.modules():
        if isinstance(m, FeedForward) and getattr(m.intermediate_act_fn, "__func__", None) is FeedForward.gelu:
            m.intermediate_act_fn = F.gelu
    return module


def _caser_conv_forward(self, user, item_seq):
    """RecBole's ``Caser.forward`` with the same parameters and function, its convolutions
    computed in a cheaper form (see :func:`fast_caser`)."""
    emb = self.item_embedding(item_seq)  # [B, L, d]
    user_emb = self.user_embedding(user).squeeze(1)
    parts = []
    if self.n_v:
        # conv_v: n_v filters as tall as the sequence, one column wide: a weighted sum of rows
        w = self.conv_v.weight.view(self.n_v, -1)  # [n_v, L]
        out_v = torch.matmul(w, emb) + self.conv_v.bias.view(1, -1, 1)  # [B, n_v, d]
        parts.append(out_v.reshape(emb.size(0), self.fc1_dim_v))
    if self.n_h:
        # conv_h[i]: n_h filters i+1 rows tall and as wide as the embedding, i.e. a
        # convolution along the positions with the d embedding columns as input channels. In
        # channels-last layout both views share the memory of RecBole's tensors (no copy):
        # input [B, d, 1, L], weight [n_h, d, 1, i+1]. The max over positions is taken before
        # the ReLU (relu(max) == max(relu): ReLU is monotone).
        x = emb.transpose(1, 2).unsqueeze(2)
        pooled = [F.conv2d(x, conv.weight.permute(0, 3, 1, 2), conv.bias).amax(dim=(2, 3))
                  for conv in self.conv_h]
        parts.append(self.ac_conv(torch.cat(pooled, 1)))
    out = self.dropout(torch.cat(parts, 1))
    z = self.ac_fc(self.fc1(out))
    return self.ac_fc(self.fc2(torch.cat([z, user_emb], 1)))


def fast_caser(module):
    """Give every RecBole ``Caser`` inside ``module`` a forward that computes the same function
    with the same parameters (state dict unchanged): each horizontal convolution as a
    convolution along the positions with the embedding columns as channels, the vertical one
    as a matrix product. RecBole's 2-d convolutions with one input channel and 50 heights are the
    cost of a Caser epoch on CPU (``benchmarks/train_speed.py``)."""
    from recbole.model.sequential_recommender.caser import Caser

    for m in module.modules():
        if isinstance(m, Caser):
            m.forward = types.MethodType(_caser_conv_forward, m)
    return module


def fast_layers(module):
    """:func:`use_fast_dropout`, :func:`fuse_gelu` and :func:`fast_caser`: the same functions
    and distributions, different random streams than RecBole's own modules."""
    return fast_caser(fuse_gelu(use_fast_dropout(module)))


def unique_padded(ids, multiple=1024, fill=0):
    """``torch.unique(ids, return_inverse=True)`` with the sorted unique values padded with
    ``fill`` to a length that is a multiple of ``multiple``: ``(values, inverse)`` with
    ``values[inverse] == ids``.

    A layer applied to the unique rows of every batch then sees one of a few shapes instead
    of a new one per batch. On CPU, oneDNN keeps a primitive (with its buffers) per shape it
    has run, up to 1024 of them, so a new shape per step grows the process without bound:
    LeCDSR's text adapter on Food-Kitchen grew by ~150 MB per step and was OOM-killed at
    22 GB; with this padding it stays flat (``benchmarks/lecdsr_memory.py``).
    """
    values, inverse = torch.unique(ids, return_inverse=True)
    n = values.numel()
    pad = -n % multiple
    if pad:
        values = torch.cat([values, values.new_full((pad,), fill)])
    return values, inverse


class CausalSeqEncoder(nn.Module):
    """SASRec's encoder (Kang and McAuley, ICDM 2018): item + position embeddings, a causal
    Transformer, layer norm and dropout. ``forward`` returns the hidden state at every
    position, so a model can train on all positions of a whole sequence in one pass."""

    def __init__(self, n_items, hidden_size=64, max_len=50, n_layers=2, n_heads=1, inner_size=256,
                 dropout=0.5, attn_dropout=0.5, hidden_act="gelu", layer_norm_eps=1e-12,
                 initializer_range=0.02):
        super().__init__()
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.encoder = TransformerEncoder(
            n_layers=n_layers, n_heads=n_heads, hidden_size=hidden_size, inner_size=inner_size,
            hidden_dropout_prob=dropout, attn_dropout_prob=attn_dropout, hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.max_len = max_len
        self.initializer_range = initializer_range
        self.apply(self._init_weights)
        fast_layers(self)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq, item_emb=None):
        """``item_seq`` [B, L] (0 = padding, left-aligned). ``item_emb`` [B, L, H] replaces the
        embedding lookup when given (e.g. embeddings carrying gradients from elsewhere)."""
        L = item_seq.size(1)
        pos = torch.arange(L, device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        if item_emb is None:
            item_emb = self.item_embedding(item_seq)
        x = self.dropout(self.layer_norm(item_emb + self.position_embedding(pos)))
        keep = (item_seq != 0).unsqueeze(1).unsqueeze(2)
        mask = torch.tril(keep.expand(-1, -1, L, -1))
        mask = torch.where(mask, 0.0, -10000.0)
        return self.encoder(x, mask, output_all_encoded_layers=True)[-1]


def plan_length_buckets(lengths, max_buckets=3, overhead=512):
    """Split the rows of a batch of left-aligned sequences into at most ``max_buckets`` groups
    of similar length, so that each group can run the encoder trimmed to its own longest row.

    ``lengths`` [B]: real inputs per row. The split minimises the positions computed,
    ``sum over groups of rows x longest row``, plus ``overhead`` positions per extra group
    (the fixed cost of one more encoder pass). Returns a list of ``(rows, length)``: a
    LongTensor of row indices (on the device of ``lengths``) and the group's longest row,
    shortest group first. Exact for a causal encoder whose rows do not interact: every real
    position sees the same inputs as in the untrimmed batch.
    """
    import numpy as np

    lens = lengths.detach().cpu().numpy().astype(np.int64).clip(min=1)
    n = len(lens)
    order = np.argsort(lens, kind="stable")
    s = lens[order]
    # a group boundary only ever falls where the sorted length changes: candidates c_0 = 0 <
    # ... < c_m = n. best[k][b]: cheapest split of the c_b shortest rows into k groups; a
    # group of rows c_a..c_b - 1 costs (c_b - c_a) * s[c_b - 1]
    cand = np.concatenate([[0], np.nonzero(s[1:] != s[:-1])[0] + 1, [n]])
    top = s[cand[1:] - 1]  # longest row below each candidate boundary
    m = len(cand)
    inf = np.iinfo(np.int64).max // 4
    span = cand[None, :] - cand[:, None]  # [a, b]: rows in c_a..c_b - 1
    step = np.where(span > 0, span * np.concatenate([[0], top])[None, :] + overhead, inf)
    best = [np.where(np.arange(m) == 0, 0, inf)]
    cut = []
    for _ in range(max(int(max_buckets), 1)):
        cost = np.minimum(best[-1][:, None] + step, inf)
        cut.append(cost.argmin(0))
        best.append(cost.min(0))
    k = int(np.argmin([b[m - 1] for b in best[1:]])) + 1
    groups, b = [], m - 1
    for level in range(k, 0, -1):
        a = int(cut[level - 1][b])
        groups.append((order[cand[a]:cand[b]], int(s[cand[b] - 1])))
        b = a
    groups.reverse()
    dev = lengths.device
    return [(torch.as_tensor(rows.copy(), dtype=torch.long, device=dev), length) for rows, length in groups]


def bucketed_bce(encoder, embedding, inputs, targets, neg, mask, groups, extra=None, detach_inputs=False):
    """Next-item BCE of a causal sequence encoder, summed over the masked positions, with
    the rows run in length groups.

    At each position t of each row: ``softplus(-h_t . e(targets_t)) + softplus(h_t . e(neg_t))``
    (BCE with logits, label 1 for the target and 0 for the negative), where
    ``h = encoder(ids, item_emb=e(inputs) [+ extra])`` and ``e = embedding``; positions count
    with weight ``mask`` [B, L]. ``groups``: ``[(rows or None, length), ...]`` from
    :func:`plan_length_buckets` (``[(None, L)]``: the whole batch); each group runs trimmed to
    its own length, which for a causal encoder whose rows do not interact gives the loss of
    the whole batch. One embedding lookup serves inputs, targets and negatives of every
    group: one dense gradient of the table instead of one per group and kind. With
    ``detach_inputs`` the input embeddings carry no gradient into the table.

    Returns ``(total, count)``: the summed loss and the summed mask of the positions run.
    """
    parts = []
    for rows, L in groups:
        pick = (lambda x: x[:, :L]) if rows is None else (lambda x: x[rows, :L])
        parts.append(torch.cat([pick(inputs), pick(targets), pick(neg)], dim=1))
    looked_all = embedding(torch.cat([x.reshape(-1) for x in parts]))
    total, count = 0.0, 0.0
    for (rows, L), ids, looked in zip(groups, parts, looked_all.split([x.numel() for x in parts])):
        looked = looked.view(*ids.shape, -1)
        in_emb = looked[:, :L].detach() if detach_inputs else looked[:, :L]
        if extra is not None:
            in_emb = in_emb + (extra[:, :L] if rows is None else extra[rows, :L])
        h = encoder(ids[:, :L], item_emb=in_emb)
        ps = (h * looked[:, L : 2 * L]).sum(-1)
        ns = (h * looked[:, 2 * L :]).sum(-1)
        m = mask[:, :L] if rows is None else mask[rows, :L]
        total = total + ((F.softplus(-ps) + F.softplus(ns)) * m).sum()
        count = count + m.sum()
    return total, count


class PadKeyAttention(nn.Module):
    """Causal multi-head self-attention of the SASRec port that LLMCDSR's public code uses
    (``torch.nn.MultiheadAttention`` with a causal mask and no key-padding mask), computed on
    left-aligned rows.

    In the public code a row is right-aligned in a window of ``max_len`` slots; its ``P``
    leading padded slots are zero vectors, so every one of them offers the key ``b_k`` and
    the value ``b_v`` (the input projection's biases), and every real query attends to them.
    Here the real items sit at the front of the row and the ``P`` padded slots are folded
    into one extra key ``b_k`` whose logit carries ``+ log P``: the same softmax, at any row
    width. Attention dropout (on the weights, as ``MultiheadAttention`` does) drops each of
    the ``P`` slots independently in the public code; here the folded slot's weight is
    scaled by ``K / (P (1 - p))`` with ``K ~ Binomial(P, 1 - p)``, the same distribution.

    Parameters have ``MultiheadAttention``'s shapes: ``in_proj_weight`` [3H, H],
    ``in_proj_bias`` [3H], ``out_proj``.
    """

    def __init__(self, hidden_size, n_heads, dropout):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of n_heads {n_heads}")
        self.h = n_heads
        self.p = float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, kv, n_pad):
        """``query`` (the normalised input), ``kv`` (the input) [B, W, H]; ``n_pad`` [B]
        float: padded slots of each row's public window. Returns [B, W, H]."""
        B, W, H = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        out = self._attend(F.linear(query, wq, bq), F.linear(kv, wk, bk), F.linear(kv, wv, bv), bk, bv, n_pad)
        return self.out_proj(out.reshape(B, W, H))

    def packed(self, query, kv, idx, B, W, n_pad):
        """:meth:`forward` for rows given as their kept slots alone: ``query`` and ``kv``
        [N, H] are the slots ``idx`` (flat indices into [B * W]) of the [B, W, H] inputs, every
        other slot holding a zero input (padding, or a slot blanked in a view). Those offer the
        key ``b_k`` and the value ``b_v`` as in :meth:`forward`; their own outputs are not
        computed. Returns [N, H], the outputs of the kept slots; the projections run on the N
        kept slots only, the attention itself (and its dropout draws) on the whole [B, W]."""
        H = query.shape[1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        spread = lambda rows: rows.new_zeros(B * W, rows.shape[1]).index_copy(0, idx, rows)  # noqa: E731
        kv_all = spread(F.linear(kv, torch.cat([wk, wv]))) + torch.cat([bk, bv])
        out = self._attend(spread(F.linear(query, wq, bq)).view(B, W, H), kv_all[:, :H].view(B, W, H),
                           kv_all[:, H:].view(B, W, H), bk, bv, n_pad)
        return self.out_proj(out.reshape(B * W, H).index_select(0, idx))

    def _attend(self, q, k, v, bk, bv, n_pad):
        """Attention of the projected ``q``, ``k``, ``v`` [B, W, H] (``bk``, ``bv``: the key and
        value biases, the padded slots' keys and values): [B, W, h, dh]. The biases come from
        the caller's one split of ``in_proj_bias``: a second split would give it its gradient
        as a sum in another order, so training would drift apart by rounding."""
        B, W, H = q.shape
        h, dh = self.h, H // self.h
        q = q.view(B, W, h, dh).transpose(1, 2) * dh**-0.5
        k = k.view(B, W, h, dh).transpose(1, 2)
        v = v.view(B, W, h, dh).transpose(1, 2)
        causal = torch.ones(W, W, dtype=torch.bool, device=q.device).tril()
        s = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # [B, h, W, W]
        s0 = q @ bk.view(h, dh, 1) + torch.log(n_pad).view(B, 1, 1, 1)  # the folded padded slots
        probs = torch.softmax(torch.cat([s0, s], dim=-1), dim=-1)
        w0, w = probs[..., :1], probs[..., 1:]
        if self.training and self.p > 0:
            keep = 1.0 - self.p
            w = w * ((torch.rand_like(w) < keep).to(w.dtype) / keep)
            count = n_pad.view(B, 1, 1, 1).expand_as(w0).contiguous()
            kept = torch.binomial(count, torch.full_like(count, keep))
            w0 = w0 * (kept / count.clamp(min=1.0) / keep)
        out = w0 * bv.view(1, h, 1, dh) + w @ v
        return out.transpose(1, 2)


class PointWiseFeedForward(nn.Module):
    """The public SASRec port's feed-forward: two width-H position-wise layers (1x1
    convolutions there, ``Linear`` here: the same function and parameter count), dropout,
    ReLU, dropout, plus the block's input."""

    def __init__(self, hidden_size, dropout):
        super().__init__()
        self.conv1 = nn.Linear(hidden_size, hidden_size)
        self.conv2 = nn.Linear(hidden_size, hidden_size)
        self.dropout1 = FastDropout(dropout)
        self.dropout2 = FastDropout(dropout)

    def forward(self, x):
        return self.dropout2(self.conv2(F.relu(self.dropout1(self.conv1(x))))) + x

    def rows(self, x, idx, n_rows, whole_draws=True):
        """:meth:`forward` of the rows ``idx`` of an [n_rows, H] input given as those rows
        alone (``x`` [len(idx), H]), with the dropout masks the whole input draws for them
        (``whole_draws``), or with masks drawn for these rows alone (the same distribution,
        another random stream)."""
        if not whole_draws:
            return self.forward(x)
        h = F.relu(self.dropout1.rows(self.conv1(x), idx, n_rows))
        return self.dropout2.rows(self.conv2(h), idx, n_rows) + x


class PublicSASRecEncoder(nn.Module):
    """The SASRec of LLMCDSR's public code (the widely used PyTorch port of SASRec), on
    left-aligned rows.

    As the public ``log2feats``: item embeddings times sqrt(H); each row treated as
    right-aligned in a window of ``max_len`` slots, positions 0..max_len-1 over that window
    (so a row's last item always has position max_len - 1); embedding dropout; padded slots
    zeroed; blocks of LayerNorm -> causal attention (every real query also sees the padded
    slots, see :class:`PadKeyAttention`) with the residual taken from the normalised query,
    LayerNorm -> :class:`PointWiseFeedForward`, padded slots zeroed again; a final
    LayerNorm; every LayerNorm with eps 1e-8. Initialisation as the public training
    scripts: xavier-normal for every weight of two or more dimensions, ``MultiheadAttention``'s
    zero biases, the convolution's default uniform biases, the padding row zero.

    Rows are left-aligned here (real items first, then 0s), so a row can be cut to any
    width that holds its items (length buckets) and the function stays the same: the
    padded slots enter only as a count. ``forward`` returns [B, W, H] in the input's layout.

    The same blocks serve C2DSR's public encoder (the same port), which differs only in what
    goes in: ``n_items=0`` (no item table: the caller gives ``item_emb``), positions the
    caller gives (``position_padding_idx=0``: position 0 is a zero vector), a ``keep`` mask
    of the slots that are real in a view, and ``xavier=False`` (torch's default
    initialisations, as C2DSR's public code leaves them); ``input_scale`` replaces sqrt(H)
    (URLLM scales its 2d-wide tokens by sqrt(d)).
    """

    def __init__(self, n_items, hidden_size=64, max_len=50, n_layers=2, n_heads=1, dropout=0.5, eps=1e-8,
                 position_padding_idx=None, xavier=True, input_scale=None):
        super().__init__()
        self.max_len = max_len
        # run the per-slot layers on the kept slots alone when at most this share of a batch's
        # slots is kept (1: always, 0: never); the same function and random draws either way.
        # It pays for wide tokens only (benchmarks/packed_encoder.py: URLLM's 656 wide, 1.86x
        # per training step; C2DSR's 256, 1.04x): on from 512
        self.pack_below = 0.8 if hidden_size >= 512 else 0.0
        # packed: draw the dropout masks of the per-slot layers for the kept slots alone (True),
        # or for every slot of the batch so that the random stream is the padded path's (False)
        self.kept_draws = False
        self.scale = hidden_size**0.5 if input_scale is None else float(input_scale)
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0) if n_items else None
        self.position_embedding = nn.Embedding(max_len, hidden_size, padding_idx=position_padding_idx)
        self.dropout = FastDropout(dropout)
        self.attention_layernorms = nn.ModuleList([nn.LayerNorm(hidden_size, eps=eps) for _ in range(n_layers)])
        self.attention_layers = nn.ModuleList([PadKeyAttention(hidden_size, n_heads, dropout) for _ in range(n_layers)])
        self.forward_layernorms = nn.ModuleList([nn.LayerNorm(hidden_size, eps=eps) for _ in range(n_layers)])
        self.forward_layers = nn.ModuleList([PointWiseFeedForward(hidden_size, dropout) for _ in range(n_layers)])
        self.last_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        if xavier:
            xavier_normal_weights(self)
        with torch.no_grad():
            if self.item_embedding is not None:
                self.item_embedding.weight[0].zero_()
            if position_padding_idx is not None:
                self.position_embedding.weight[position_padding_idx].zero_()

    def forward(self, item_seq, item_emb=None, positions=None, keep=None):
        """``item_seq`` [B, W] left-aligned (0 = padding); ``item_emb`` [B, W, H] instead of
        the item table's rows; ``positions`` [B, W] instead of the window positions; ``keep``
        [B, W] bool: the slots that are real (default: ``item_seq > 0``); the others are
        zeroed like padding and, as in the public code, still offer their keys."""
        B, W = item_seq.shape
        if W > self.max_len:
            raise ValueError(f"rows of {W} items exceed the backbone's window of {self.max_len}")
        n = (item_seq > 0).sum(1)
        keep = (item_seq > 0 if keep is None else keep).unsqueeze(-1)
        if positions is None:
            positions = ((self.max_len - n).unsqueeze(1) + torch.arange(W, device=item_seq.device)).clamp(
                max=self.max_len - 1)
        if item_emb is None:
            item_emb = self.item_embedding(item_seq)
        n_pad = (self.max_len - n).to(item_emb.dtype)
        blocks = list(zip(self.attention_layernorms, self.attention_layers, self.forward_layernorms,
                          self.forward_layers))
        idx = keep.view(-1).nonzero().squeeze(1) if self.pack_below > 0 else None  # (a device sync)
        if idx is not None and idx.numel() <= self.pack_below * B * W:
            # the slots that are zeroed (padding, the other domain's slots of a view) enter the
            # blocks only as keys b_k and values b_v and leave them as zeros: the per-slot layers
            # run on the kept slots alone, with the dropout draws of the whole tensor (or, with
            # kept_draws, of the kept slots alone)
            if self.kept_draws:
                xk = self.dropout(item_emb.reshape(B * W, -1).index_select(0, idx) * self.scale
                                  + self.position_embedding(positions.reshape(-1).index_select(0, idx)))
            else:
                x = self.dropout(item_emb * self.scale + self.position_embedding(positions)) * keep
                xk = x.reshape(B * W, -1).index_select(0, idx)
            for ln_a, attn, ln_f, ffn in blocks:
                q = ln_a(xk)
                xk = q + attn.packed(q, xk, idx, B, W, n_pad)
                xk = ffn.rows(ln_f(xk), idx, B * W, whole_draws=not self.kept_draws)
            ln = self.last_layernorm  # a zeroed slot's output: LayerNorm(0) = its bias
            return ln.bias.expand(B * W, -1).index_copy(0, idx, ln(xk)).view(B, W, -1)
        x = self.dropout(item_emb * self.scale + self.position_embedding(positions)) * keep
        for ln_a, attn, ln_f, ffn in blocks:
            q = ln_a(x)
            x = q + attn(q, x, n_pad)
            x = ffn(ln_f(x)) * keep
        return self.last_layernorm(x)


def xavier_normal_weights(module):
    """xavier-normal for every parameter of two or more dimensions of ``module`` (what the
    public LLMCDSR scripts do to their models after building them)."""
    for p in module.parameters():
        if p.dim() >= 2:
            nn.init.xavier_normal_(p)
    return module


def build_backbone(kind, n_items, hidden_size, max_len, n_layers, n_heads, dropout, attn_dropout=None,
                   inner_size=256, hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02):
    """LLMCDSR's sequence encoder: ``public`` (:class:`PublicSASRecEncoder`, as the public
    code) or ``recbole`` (:class:`CausalSeqEncoder`, RecBole's SASRec layers)."""
    if kind == "public":
        return PublicSASRecEncoder(n_items, hidden_size, max_len, n_layers, n_heads, dropout)
    if kind == "recbole":
        return CausalSeqEncoder(n_items, hidden_size, max_len, n_layers, n_heads, inner_size, dropout,
                                dropout if attn_dropout is None else attn_dropout, hidden_act,
                                layer_norm_eps, initializer_range)
    raise ValueError(f"backbone must be 'public' or 'recbole', got {kind!r}")
