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
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_cdsr.model.fused_ce import linear_cross_entropy
from recbole_cdsr.model.layers import PublicSASRecEncoder


#: rows per chunk of the fused heads: one [items, 1024] block of logits at a time (113 MB for
#: Food-Kitchen's 27,637 B items); larger chunks run the head's matrix products faster on CPU
HEAD_CHUNK = 1024


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


def csr_parts(adj):
    """``(crow, col, val)`` of a coalesced sparse COO matrix: its CSR arrays (the columns of a
    row ascending)."""
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta
        warnings.simplefilter("ignore", UserWarning)
        csr = adj.coalesce().to_sparse_csr()
    return csr.crow_indices().long(), csr.col_indices().long(), csr.values()


def csr_rows(crow, col, val, rows):
    """The nonzeros of rows ``rows`` of a CSR matrix: ``(local row, column, value)``, local row
    ``i`` standing for ``rows[i]``; row by row, columns ascending within a row."""
    start = crow[rows]
    count = crow[rows + 1] - start
    local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)
    first = torch.repeat_interleave(count.cumsum(0) - count, count)
    pos = torch.repeat_interleave(start, count) + torch.arange(len(local), device=rows.device) - first
    return local, col[pos], val[pos]


class RowLookup:
    """Rows of an [n, H] table computed only for the items ``ids`` (sorted, distinct),
    indexed with item ids like the whole table: ``lookup[seq]`` is ``table[seq]``. An id
    outside ``ids`` is an error, never a wrong row."""

    def __init__(self, rows, ids, n):
        self.rows = rows
        self.where = torch.full((n,), -1, dtype=torch.long, device=ids.device)
        self.where[ids] = torch.arange(len(ids), device=ids.device)

    def __getitem__(self, seq):
        w = self.where[seq]
        if bool((w < 0).any()):
            raise IndexError("RowLookup: an item outside the rows computed for this batch")
        return self.rows[w]


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

    def rows(self, emb, graph, ids):
        """:meth:`forward`'s rows ``ids`` (sorted, distinct) alone, [len(ids), H]: each layer
        propagates only the rows the next one (or the output) reads, from the rows of the
        layer below that those rows link to. ``graph``: the adjacency's CSR arrays
        (:func:`csr_parts`). The same function as :meth:`forward`; dropout draws one mask per
        table row it reads (each row's mask shared by every row that links to it, as the
        whole-table dropout), from ``rand`` rather than ``bernoulli``: the same distribution,
        another random stream."""
        need, links = [ids], []
        for _ in self.biases:  # top layer first: the rows below that each layer reads
            local, c, v = csr_rows(*graph, need[0])
            below = torch.unique(torch.cat([ids, c]))
            links.insert(0, (local, torch.searchsorted(below, c), v))
            need.insert(0, below)
        h = emb[need[0]]
        outs = [h[torch.searchsorted(need[0], ids)]]
        for layer, (b, (local, c, v)) in enumerate(zip(self.biases, links)):
            if self.training and self.p > 0:
                h = h * ((torch.rand_like(h) >= self.p).to(h.dtype) * (1.0 / (1.0 - self.p)))
            a = torch.sparse_coo_tensor(torch.stack([local, c]), v, (len(need[layer + 1]), len(need[layer])),
                                        is_coalesced=True, check_invariants=False)
            h = torch.sparse.mm(a, h) + b
            outs.append(h[torch.searchsorted(need[layer + 1], ids)])
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
        # the cheaper exact paths (docs/speed.md): item tables propagated only for the rows a
        # batch reads, the discriminators as (x W) . y (fast_layers); the prediction terms by
        # the fused cross-entropy with lin_pad's logit as one more class (fused_loss). Both
        # False: the path before them, whole tables and full logits (the same random streams)
        self.fast = config["fast_layers"] is not False
        self.fused = config["fused_loss"] is not False
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
        if self.fast:  # the per-slot layers on the kept slots alone, their dropout drawn there alone
            for e in self.encoders:
                e.pack_below, e.kept_draws = 0.8, True
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
        for name, g in (("adj", adj), ("adj_single", adj_single)):
            for part, t in zip(("crow", "col", "val"), csr_parts(g)):
                self.register_buffer(f"{name}_{part}", t, persistent=False)
        # one uniform number per (user, slot): the items that corrupt a user's sequence are the
        # same in every epoch, as the public code draws them once (c2dsr_resample_corruption)
        gen = torch.Generator().manual_seed(int(config["seed"]))
        self.register_buffer("corrupt_u", torch.rand(dataset.user_num, self.max_seq_length, generator=gen),
                             persistent=False)

    # -- encoding (the hooks a model built on C2DSR changes) -------------------------------
    def token_width(self, config):
        """Width of the encoders' tokens: H."""
        return config["hidden_size"]

    def graph(self, name):
        """The CSR arrays of graph ``name`` (``adj``, ``adj_single``)."""
        return tuple(getattr(self, f"{name}_{part}") for part in ("crow", "col", "val"))

    def tables(self, ids=None):
        """The three propagated item tables (mixed over ``adj``; A and B over ``adj_single``):
        whole [n_items, H] tensors, or with ``ids`` (per table, sorted distinct item ids, from
        :meth:`table_ids`) a :class:`RowLookup` of those rows alone."""
        parts = ((self.gcn[0], self.item_emb, "adj"), (self.gcn[1], self.item_emb_a, "adj_single"),
                 (self.gcn[2], self.item_emb_b, "adj_single"))
        if ids is None:
            return tuple(g(e.weight, getattr(self, a)) for g, e, a in parts)
        return tuple(RowLookup(g.rows(e.weight, self.graph(a), i), i, self.n_items)
                     for (g, e, a), i in zip(parts, ids))

    def table_ids(self, seq, corrupted=()):
        """The rows each table is read at for history ``seq`` (and ``corrupted`` sequences, which
        only the mixed encoder reads): the mixed table at every item (and padding), a view's
        table at its domain's items and padding (:meth:`view_seq`)."""
        pad = seq.new_zeros(1)
        dom = self.item_domain[seq]
        return (torch.unique(torch.cat([pad, seq.reshape(-1)] + [c.reshape(-1) for c in corrupted])),
                torch.unique(torch.cat([pad, seq[dom == 0]])), torch.unique(torch.cat([pad, seq[dom == 1]])))

    def view_seq(self, k, seq):
        """What encoder ``k`` reads its tokens at: the history itself for the mixed encoder
        (and for every encoder on the whole-table path); for a view on the row path, the
        history with the other domain's items as padding (those slots are zeroed inside the
        encoder whatever their token, so the result is the same)."""
        if k == 0 or not self.fast:
            return seq
        return torch.where(self.item_domain[seq] == k - 1, seq, 0)

    def disc_score(self, k, x, y):
        """Discriminator ``k``'s logit [B, 1] of ``x`` against ``y``: ``x W y + b`` (nn.Bilinear;
        as ``(x W) . y`` on the fast path: no [B, H, H] tensors in its backward)."""
        d = self.disc[k]
        if not self.fast:
            return d(x, y)
        return ((x @ d.weight[0]) * y).sum(-1, keepdim=True) + d.bias

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
            out.append(self.encoders[k](seq, item_emb=self.tokens(k, self.view_seq(k, seq), tables, corrupted),
                                        positions=pos, keep=keep))
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
        dom_next = dom_full[:, 1:]
        dom_in = dom_full[:, :-1]
        next_a, next_b = self.next_of_domain(full, dom_full, 0), self.next_of_domain(full, dom_full, 1)
        pool_a, pool_b = (dom_in == 0) & (next_a > 0), (dom_in == 1) & (next_b > 0)
        both = pool_a.any(1) & pool_b.any(1)  # rows with a view target in each domain
        has_mi = bool(both.any())
        false_a = false_b = None
        if self.fast and has_mi:  # the corrupted sequences first: the mixed table is read at their items too
            uid = interaction[self.USER_ID]
            false_a, false_b = self.corrupt(seq, uid, 0), self.corrupt(seq, uid, 1)
        tables = self.tables(self.table_ids(seq, [c for c in (false_a, false_b) if c is not None])
                             if self.fast else None)
        h_mix, h_a, h_b = self.encode(seq, tables)
        denom = len(seq) * self.loss_positions

        def ce(h, head, h_pad, mask, target):
            sel = mask.nonzero(as_tuple=True)
            if self.fused:
                if len(sel[0]) == 0:
                    return h.sum() * 0
                pad = self.lin_pad(h_pad[sel]).squeeze(1)
                mean = linear_cross_entropy(h[sel], head.weight, self.rank_in_domain[target[sel]], bias=head.bias,
                                            extra=pad, chunk=HEAD_CHUNK)
                return mean * (len(sel[0]) / denom)
            logits = torch.cat([head(h[sel]), self.lin_pad(h_pad[sel])], -1)
            return F.cross_entropy(logits, self.rank_in_domain[target[sel]], reduction="sum") / denom

        share_x = ce(h_mix, self.lin_x, h_mix, tail & (dom_next == 0), nxt)
        share_y = ce(h_mix, self.lin_y, h_mix, tail & (dom_next == 1), nxt)
        x = ce(h_mix + h_a, self.lin_x, h_a, tail & pool_a, next_a)
        y = ce(h_mix + h_b, self.lin_y, h_b, tail & pool_b, next_b)

        extra = self.extra_losses(seq, tables)
        if not has_mi:
            zero = h_mix.sum() * 0
            return (share_x, share_y, x, y, zero, zero) + extra

        def pool(h, m):
            w = m[both].float()
            return (h[both] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)

        if false_a is None:
            uid = interaction[self.USER_ID]
            false_a, false_b = self.corrupt(seq, uid, 0), self.corrupt(seq, uid, 1)
        (h_false_a,) = self.encode(false_a, tables, which=(0,), corrupted=True)  # A randomised
        (h_false_b,) = self.encode(false_b, tables, which=(0,), corrupted=True)  # B randomised
        r_a, r_b = pool(h_a, pool_a), pool(h_b, pool_b)
        real_on_b, real_on_a = pool(h_mix, pool_b), pool(h_mix, pool_a)
        bce = F.binary_cross_entropy_with_logits

        def mi(k, spec, real, fake):
            pos, neg = self.disc_score(k, real, spec), self.disc_score(k, fake, spec)
            return bce(pos, torch.ones_like(pos)) + bce(neg, torch.zeros_like(neg))

        mi_x = mi(0, r_a, real_on_b, pool(h_false_a, pool_b))
        mi_y = mi(1, r_b, real_on_a, pool(h_false_b, pool_a))
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
        h_mix, h_a, h_b = self.encode(seq, self.tables(self.table_ids(seq) if self.fast else None))
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
