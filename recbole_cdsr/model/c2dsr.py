r"""C2DSR
################################################
Reference:
    Jiangxia Cao, Xin Cong, Jiawei Sheng, Tingwen Liu, Bin Wang. "Contrastive Cross-Domain
    Sequential Recommendation." CIKM 2022. Public code: github.com/cjx96/C2DSR.

What the public code computes, on our left-aligned rows (docs/c2dsr.md lists every
difference):

- Item graphs from the training sequences: ``adj`` with an edge from each item to the
  next one of its sequence, ``adj_single`` from each item to the next item *of the same
  domain*; directed, repeated transitions add up, rows normalised to sum 1
  (:func:`transition_graphs`).
- Three item tables (mixed, A, B), each propagated by a parameter-free GCN
  (:class:`ParamFreeGCN`: the mean of E and A dropout(E) + b); a token enters an encoder as
  (propagated + raw embedding) times sqrt(H).
- Three encoders of the public SASRec port (:class:`~recbole_cdsr.model.layers.PublicSASRecEncoder`
  with C2DSR's positions): on the mixed sequence (positions 1..n), on the A view and on the
  B view (the same slots; items of the other domain are blanked like padding and positions
  count within the domain).
- Four cross-entropy terms on the last ``c2dsr_loss_positions`` inputs of each row, each
  summed over its positions and divided by (rows x ``c2dsr_loss_positions``): from the mixed
  state, the next item when it is in A (``lin_x`` with the extra ``lin_pad`` logit) and when
  it is in B (``lin_y``); from mixed + A-view state at an A slot, the next A item; from
  mixed + B-view state at a B slot, the next B item.
- Two infomax terms: a bilinear discriminator per domain scores the domain's view (mean
  over its slots that have a next item of the domain) against the mixed encoder's mean over
  the *other* domain's slots, of the real sequence (positive) and of the sequence whose
  items of the discriminator's own domain are replaced by random items of that domain
  (negative); BCE with logits.
- Loss = ``c2dsr_lambda`` x (the four CE terms) + (1 - ``c2dsr_lambda``) x (the two infomax terms).
- Score of a domain-A item: ``lin_x`` (mixed state at the last input + A-view state at the
  last A input); likewise for B with ``lin_y``.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_cdsr.model.layers import PublicSASRecEncoder


def _row_normalised(rows, cols, n):
    """Sparse [n, n] COO of edge counts rows -> cols, each row divided by its sum."""
    idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.long)
    adj = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n, n), check_invariants=True).coalesce()  # repeats add up
    i, v = adj.indices(), adj.values()
    deg = torch.zeros(n).index_add_(0, i[0], v)
    return torch.sparse_coo_tensor(i, v / deg[i[0]], (n, n), check_invariants=True).coalesce()


def transition_graphs(sequences, n_items, item_domain):
    """``(adj, adj_single)``: row-normalised sparse [n_items, n_items] graphs of ``sequences``
    (internal item ids, oldest first). ``adj``: item -> the next item of its sequence;
    ``adj_single``: item -> the next item of the same domain (items of the other domain in
    between skipped). Directed, counted (a transition seen twice weighs twice), no other
    self loops than repeated items; an item without a successor has an empty row."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) > 0]
    flat = np.concatenate(seqs)
    sid = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    same = sid[1:] == sid[:-1]
    adj = _row_normalised(flat[:-1][same], flat[1:][same], n_items)
    dom = np.asarray(item_domain)[flat]
    order = np.lexsort((np.arange(len(flat)), dom, sid))  # by sequence, then domain, then time
    f, s, d = flat[order], sid[order], dom[order]
    same = (s[1:] == s[:-1]) & (d[1:] == d[:-1])
    return adj, _row_normalised(f[:-1][same], f[1:][same], n_items)


class ParamFreeGCN(nn.Module):
    """C2DSR's GCN as its public code runs: layer l computes ``A dropout(h_{l-1}) + b_l`` (the
    layer's weight matrix and LeakyReLU are allocated there but never applied), and the
    output is the mean of ``h_0 = E`` and every layer's output."""

    def __init__(self, hidden_size, n_layers, dropout):
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_size)
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound)) for _ in range(n_layers)])
        self.p = dropout

    def forward(self, emb, adj):
        outs, h = [emb], emb
        for b in self.biases:
            h = torch.sparse.mm(adj, F.dropout(h, self.p, self.training)) + b
            outs.append(h)
        return torch.stack(outs).mean(0)


class C2DSR(SequentialRecommender):
    input_type = InputType.POINTWISE
    TRAIN_VIEW = "sequence"  # one row per training user: its last MAX_ITEM_LIST_LENGTH + 1 items

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if len(dataset.domain_names) != 2:
            raise ValueError(f"C2DSR needs two domains, the dataset has {dataset.domain_names}")
        H = self.hidden_size = config["hidden_size"]
        p = config["dropout_prob"]
        self.lam = config["c2dsr_lambda"]
        self.loss_positions = config["c2dsr_loss_positions"]
        self.resample_corruption = config["c2dsr_resample_corruption"]
        window = self.max_seq_length + 1  # the public window: inputs of at most window - 1 items
        item_domain = torch.as_tensor(dataset.item_domain, dtype=torch.long)
        self.register_buffer("item_domain", item_domain, persistent=False)  # -1: padding
        dom_items = [torch.as_tensor(x, dtype=torch.long) for x in dataset.domain_items]
        rank = torch.zeros(self.n_items, dtype=torch.long)
        for x in dom_items:
            rank[x] = torch.arange(len(x))
        self.register_buffer("rank_in_domain", rank, persistent=False)  # column of an item in its head
        self.register_buffer("items_a", dom_items[0], persistent=False)
        self.register_buffer("items_b", dom_items[1], persistent=False)

        self.item_emb = nn.Embedding(self.n_items, H, padding_idx=0)
        self.item_emb_a = nn.Embedding(self.n_items, H, padding_idx=0)
        self.item_emb_b = nn.Embedding(self.n_items, H, padding_idx=0)
        self.gcn = nn.ModuleList([ParamFreeGCN(H, config["c2dsr_gnn_layers"], p) for _ in range(3)])
        width = self.token_width(config)
        enc = dict(hidden_size=width, max_len=window, n_layers=config["n_layers"], n_heads=config["n_heads"],
                   dropout=p, position_padding_idx=0, xavier=False, input_scale=H**0.5)
        self.encoders = nn.ModuleList([PublicSASRecEncoder(0, **enc) for _ in range(3)])  # mixed, A, B
        self.lin_x = nn.Linear(width, len(dom_items[0]))
        self.lin_y = nn.Linear(width, len(dom_items[1]))
        self.lin_pad = nn.Linear(width, 1)
        self.disc = nn.ModuleList([nn.Bilinear(width, width, 1) for _ in range(2)])  # D_X, D_Y
        for d in self.disc:
            nn.init.xavier_uniform_(d.weight)
            nn.init.zeros_(d.bias)

        adj, adj_single = transition_graphs(dataset.training_sequences, self.n_items, dataset.item_domain)
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("adj_single", adj_single, persistent=False)
        # one uniform number per (user, slot): the items that corrupt a user's sequence are the
        # same in every epoch, as the public code draws them once (c2dsr_resample_corruption)
        gen = torch.Generator().manual_seed(int(config["seed"]))
        self.register_buffer("corrupt_u", torch.rand(dataset.user_num, self.max_seq_length, generator=gen),
                             persistent=False)

    # -- encoding (the hooks a model built on C2DSR changes) -------------------------------
    def token_width(self, config):
        """Width of the encoders' tokens: H."""
        return config["hidden_size"]

    def tables(self):
        """The three propagated item tables (mixed over ``adj``; A and B over ``adj_single``)."""
        return (self.gcn[0](self.item_emb.weight, self.adj), self.gcn[1](self.item_emb_a.weight, self.adj_single),
                self.gcn[2](self.item_emb_b.weight, self.adj_single))

    def tokens(self, k, seq, tables, corrupted=False):
        """Input of encoder ``k`` (0 mixed, 1 A view, 2 B view) before the sqrt(H) scaling:
        propagated + raw embedding [B, W, H] (a corrupted sequence is no different here)."""
        raw = (self.item_emb, self.item_emb_a, self.item_emb_b)[k]
        return tables[k][seq] + raw(seq)

    def encode(self, seq, tables, which=(0, 1, 2), corrupted=False):
        """States [B, W, width] of the mixed encoder (0), the A view (1) and the B view (2) for
        left-aligned ``seq`` [B, W]; ``corrupted``: ``seq`` is a corrupted sequence (C2DSR
        encodes it as any other)."""
        real = seq > 0
        dom = self.item_domain[seq]
        slots = torch.arange(1, seq.shape[1] + 1, device=seq.device)
        out = []
        for k in which:
            keep = real if k == 0 else dom == k - 1
            pos = torch.where(keep, slots if k == 0 else keep.cumsum(1), 0)
            out.append(self.encoders[k](seq, item_emb=self.tokens(k, seq, tables, corrupted), positions=pos,
                                        keep=keep))
        return out

    @staticmethod
    def next_of_domain(full, dom, d):
        """[B, W] for ``full`` [B, W + 1]: the first item of domain ``d`` after each input slot
        (0 where there is none)."""
        W = full.shape[1] - 1
        big = W + 1
        at = torch.where(dom == d, torch.arange(W + 1, device=full.device), big)
        nearest = at.flip(1).cummin(1).values.flip(1)  # first domain-d position >= j
        after = nearest[:, 1:]  # > j, for the input slots j = 0 .. W - 1
        found = after < big
        return torch.where(found, full.gather(1, after.clamp(max=W)), 0)

    def corrupt(self, seq, uid, d):
        """``seq`` with every item of domain ``d`` replaced by a random item of that domain."""
        u = torch.rand(seq.shape, device=seq.device) if self.resample_corruption else self.corrupt_u[uid, : seq.shape[1]]
        items = self.items_a if d == 0 else self.items_b
        rand = items[(u * len(items)).long().clamp(max=len(items) - 1)]
        return torch.where(self.item_domain[seq] == d, rand, seq)

    # -- training -------------------------------------------------------------------------
    def extra_losses(self, seq, tables):
        """Terms a model built on C2DSR adds (C2DSR: none)."""
        return ()

    def losses(self, interaction):
        """``(share_x, share_y, x, y, mi_x, mi_y)``: the six terms of the public loss, then
        :meth:`extra_losses`."""
        hist, n = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        W = int(n.max())
        seq = hist[:, :W]
        rows = torch.arange(len(seq), device=seq.device)
        full = torch.cat([seq, torch.zeros_like(seq[:, :1])], 1)
        full[rows, n] = interaction[self.POS_ITEM_ID]
        nxt = full[:, 1:]
        dom_full = self.item_domain[full]
        slot = torch.arange(W, device=seq.device)
        tail = (slot >= (n - self.loss_positions).unsqueeze(1)) & (slot < n.unsqueeze(1))
        tables = self.tables()
        h_mix, h_a, h_b = self.encode(seq, tables)
        denom = len(seq) * self.loss_positions

        def ce(h, head, h_pad, mask, target):
            sel = mask.nonzero(as_tuple=True)
            logits = torch.cat([head(h[sel]), self.lin_pad(h_pad[sel])], -1)
            return F.cross_entropy(logits, self.rank_in_domain[target[sel]], reduction="sum") / denom

        dom_next = dom_full[:, 1:]
        dom_in = dom_full[:, :-1]
        next_a, next_b = self.next_of_domain(full, dom_full, 0), self.next_of_domain(full, dom_full, 1)
        pool_a, pool_b = (dom_in == 0) & (next_a > 0), (dom_in == 1) & (next_b > 0)
        share_x = ce(h_mix, self.lin_x, h_mix, tail & (dom_next == 0), nxt)
        share_y = ce(h_mix, self.lin_y, h_mix, tail & (dom_next == 1), nxt)
        x = ce(h_mix + h_a, self.lin_x, h_a, tail & pool_a, next_a)
        y = ce(h_mix + h_b, self.lin_y, h_b, tail & pool_b, next_b)

        extra = self.extra_losses(seq, tables)
        both = pool_a.any(1) & pool_b.any(1)  # rows with a view target in each domain
        if not both.any():
            zero = h_mix.sum() * 0
            return (share_x, share_y, x, y, zero, zero) + extra

        def pool(h, m):
            w = m[both].float()
            return (h[both] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)

        uid = interaction[self.USER_ID]
        (h_false_a,) = self.encode(self.corrupt(seq, uid, 0), tables, which=(0,), corrupted=True)  # A randomised
        (h_false_b,) = self.encode(self.corrupt(seq, uid, 1), tables, which=(0,), corrupted=True)  # B randomised
        r_a, r_b = pool(h_a, pool_a), pool(h_b, pool_b)
        real_on_b, real_on_a = pool(h_mix, pool_b), pool(h_mix, pool_a)
        bce = F.binary_cross_entropy_with_logits

        def mi(disc, spec, real, fake):
            pos, neg = disc(real, spec), disc(fake, spec)
            return bce(pos, torch.ones_like(pos)) + bce(neg, torch.zeros_like(neg))

        mi_x = mi(self.disc[0], r_a, real_on_b, pool(h_false_a, pool_b))
        mi_y = mi(self.disc[1], r_b, real_on_a, pool(h_false_b, pool_a))
        return (share_x, share_y, x, y, mi_x, mi_y) + extra

    def calculate_loss(self, interaction):
        share_x, share_y, x, y, mi_x, mi_y = self.losses(interaction)
        return self.lam * (share_x + share_y + x + y) + (1 - self.lam) * (mi_x + mi_y)

    # -- scoring --------------------------------------------------------------------------
    def user_states(self, interaction):
        """``(A vector, B vector)`` [B, width] of each row: the mixed state at the last input
        plus the view's state at the last input of that domain (the last input when there is
        none: a blank slot, as in the public code). They score the domain's items and, in
        URLLM, represent the user for retrieval."""
        hist, n = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        seq = hist[:, : int(n.max())]
        h_mix, h_a, h_b = self.encode(seq, self.tables())
        rows = torch.arange(len(seq), device=seq.device)
        last = n - 1
        dom = self.item_domain[seq]
        slot = torch.arange(seq.shape[1], device=seq.device)

        def last_of(d):
            at = torch.where(dom == d, slot, -1).max(1).values
            return torch.where(at >= 0, at, last)

        m = h_mix[rows, last]
        return m + h_a[rows, last_of(0)], m + h_b[rows, last_of(1)]

    def full_sort_predict(self, interaction):
        """[B, n_items]: A items scored by ``lin_x``, B items by ``lin_y`` (padding -inf); the
        protocol ranks a target among the items of its own domain."""
        u_a, u_b = self.user_states(interaction)
        scores = torch.full((len(u_a), self.n_items), float("-inf"), device=u_a.device)
        scores[:, self.items_a] = self.lin_x(u_a)
        scores[:, self.items_b] = self.lin_y(u_b)
        return scores

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].view(-1, 1)).squeeze(1)
