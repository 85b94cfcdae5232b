r"""URLLM's dual-graph model
################################################
Reference:
    Tingjia Shen, Hao Wang, Jiaqing Zhang, Sirui Zhao, Liangyue Li, Zulong Chen, Defu Lian,
    Enhong Chen. "Exploring User Retrieval Integration towards Large Language Models for
    Cross-Domain Sequential Recommendation." arXiv 2406.03085, 2024. Public code:
    github.com/TingJShen/URLLM (``DG_Final/DG_src``).

The dual-graph (DG) model is C2DSR (:class:`~recbole_cdsr.model.c2dsr.C2DSR`, whose parts
it reuses) with a second, item-attribute graph:

- attribute words from each item's text (:func:`attribute_words`; our datasets carry titles
  only, so the text is the title): ``_`` and punctuation become spaces, lower case, the
  articles a/an/the dropped; a word is a node when at least two items of one domain hold it;
- ``adj_att`` (:func:`attribute_graph`): item <-> word edges, both directions, weight 1,
  rows normalised; one table of width ``urllm_attr_size`` over items and words, propagated
  by the same parameter-free GCN;
- tokens of width 2d: [propagated + raw item embedding (d) ; ``lin_align`` of the propagated
  and raw attribute rows (d_a -> d)] scaled by sqrt(d); the A and B views project the
  propagated attribute row with their own layer (``lin_align_view``) and the raw one with
  the shared ``lin_align``;
- corrupted sequences get noise sign(e) N(0, 1) ``urllm_noise`` on their tokens;
- two alignment terms: binary cross-entropy with logits between the item half (input) and
  the attribute half (target) of each domain view's tokens, averaged over every slot of the
  public window, padding included;
- loss = ``urllm_gamma`` x [C2DSR's loss] + (1 - ``urllm_gamma``) x (the two alignment terms).

The LLM part of URLLM (retrieval, prompt, fine-tuning, generation, refinement) runs after
training (:mod:`recbole_cdsr.stages.urllm`) and sets ``llm_item``: the item each test user
is recommended, ranked first, before the dual-graph ranking (docs/urllm.md).
"""

import re
import string

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_cdsr.model.c2dsr import C2DSR, ParamFreeGCN, RowLookup, _row_normalised, csr_parts

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation + "\u2018\u2019\u00b4`") + "]")


def normalise_text(text):
    """The public rule: ``_`` and punctuation (with the curly quotes and accents) become
    spaces, lower case, the whole words a/an/the removed, blanks collapsed."""
    text = _PUNCT.sub(" ", str(text).replace("_", " ").lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def attribute_words(texts, domains, min_items=2):
    """``(vocabulary, words per item)``: each item's distinct words (:func:`normalise_text`),
    kept when at least ``min_items`` items of one domain hold the word (a word in one item
    of each domain is dropped). ``texts`` and ``domains`` are per item (-1: padding, no words);
    the vocabulary is sorted."""
    per_item = [set(normalise_text(t).split()) if d >= 0 else set() for t, d in zip(texts, domains)]
    counts = {}
    for words, d in zip(per_item, domains):
        for w in words:
            counts.setdefault(w, {}).setdefault(int(d), 0)
            counts[w][int(d)] += 1
    vocab = sorted(w for w, c in counts.items() if max(c.values()) >= min_items)
    keep = set(vocab)
    return vocab, [sorted(words & keep) for words in per_item]


def attribute_graph(words_per_item, vocab):
    """Row-normalised sparse graph over [items ; words]: an edge item -> word and word -> item
    for every word of an item (weight 1)."""
    n_items = len(words_per_item)
    index = {w: n_items + i for i, w in enumerate(vocab)}
    items = [i for i, ws in enumerate(words_per_item) for _ in ws]
    words = [index[w] for ws in words_per_item for w in ws]
    rows = np.asarray(items + words, dtype=np.int64)
    cols = np.asarray(words + items, dtype=np.int64)
    return _row_normalised(rows, cols, n_items + len(vocab))


class URLLM(C2DSR):
    """URLLM's dual-graph recommender on C2DSR's parts (module docstring)."""

    def __init__(self, config, dataset):
        self.d = config["hidden_size"]
        self.attr_size = config["urllm_attr_size"]
        super().__init__(config, dataset)
        self.gamma = config["urllm_gamma"]
        self.noise = config["urllm_noise"]
        self.window = self.max_seq_length + 1
        vocab, words = attribute_words(dataset.item_titles(), dataset.item_domain)
        if not vocab:
            raise ValueError("URLLM: no attribute word is held by two items of a domain; the titles give no graph")
        self.n_words = len(vocab)
        self.register_buffer("adj_att", attribute_graph(words, vocab), persistent=False)
        for part, t in zip(("crow", "col", "val"), csr_parts(self.adj_att)):
            self.register_buffer(f"adj_att_{part}", t, persistent=False)
        self.item_emb_att = nn.Embedding(self.n_items + self.n_words, self.attr_size, padding_idx=0)
        self.gcn_att = ParamFreeGCN(self.attr_size, config["c2dsr_gnn_layers"], config["dropout_prob"])
        # the item the LLM stage recommends to each (evaluation) user; 0: none. It is ranked
        # first, the dual-graph ranking follows (recbole_cdsr.stages.urllm)
        self.register_buffer("llm_item", torch.zeros(dataset.user_num, dtype=torch.long), persistent=False)
        self.lin_align = nn.Linear(self.attr_size, self.d)  # raw rows of every view; propagated rows of M
        self.lin_align_view = nn.ModuleList([nn.Linear(self.attr_size, self.d) for _ in range(2)])  # A, B

    def token_width(self, config):
        return 2 * config["hidden_size"]

    def tables(self, ids=None):
        """C2DSR's three tables, then the propagated attribute table (items and words)."""
        if ids is None:
            return super().tables() + (self.gcn_att(self.item_emb_att.weight, self.adj_att),)
        att = self.gcn_att.rows(self.item_emb_att.weight, self.graph("adj_att"), ids[3])
        return super().tables(ids[:3]) + (RowLookup(att, ids[3], self.n_items + self.n_words),)

    def table_ids(self, seq, corrupted=()):
        """C2DSR's rows, and the attribute table at the mixed table's rows (every encoder's
        tokens read it at their items)."""
        ids = super().table_ids(seq, corrupted)
        return ids + (ids[0],)

    def halves(self, k, seq, tables):
        """The item half and the attribute half [B, W, d] of encoder ``k``'s tokens."""
        item = super().tokens(k, seq, tables)
        proj = self.lin_align if k == 0 else self.lin_align_view[k - 1]
        attr = proj(tables[3][seq]) + self.lin_align(self.item_emb_att(seq))
        return item, attr

    def tokens(self, k, seq, tables, corrupted=False):
        e = torch.cat(self.halves(k, seq, tables), -1)
        if corrupted and self.noise:
            e = e + torch.sign(e) * torch.randn_like(e) * self.noise
        return e

    def extra_losses(self, seq, tables):
        """The two alignment terms: BCE with logits of the item half against the attribute
        half of the A view's and the B view's tokens, averaged over the public window of
        every row (``window`` slots x d values), where every slot outside the view (other
        domain, padding) holds the padding token."""
        dom = self.item_domain[seq]
        pad = torch.zeros(1, 1, dtype=seq.dtype, device=seq.device)
        out = []
        for k in (1, 2):
            view = torch.where(dom == k - 1, seq, 0)
            item, attr = self.halves(k, view, tables)
            per_slot = F.binary_cross_entropy_with_logits(item, attr, reduction="none").sum(-1)  # [B, W]
            real = view > 0
            p_item, p_attr = self.halves(k, pad, tables)
            pad_term = F.binary_cross_entropy_with_logits(p_item, p_attr, reduction="none").sum()
            n_pad = self.window - real.sum(1)  # every other slot of the window holds the padding token
            total = per_slot[real].sum() + (n_pad.to(per_slot.dtype) * pad_term).sum()
            out.append(total / (len(seq) * self.window * self.d))
        return tuple(out)

    def full_sort_predict(self, interaction):
        """The dual-graph scores, with the LLM stage's item (if any) of each user first."""
        scores = super().full_sort_predict(interaction)
        item = self.llm_item[interaction[self.USER_ID]]
        rows = torch.nonzero(item > 0).view(-1)
        scores[rows, item[rows]] = float("inf")
        return scores

    def calculate_loss(self, interaction):
        share_x, share_y, x, y, mi_x, mi_y, align_a, align_b = self.losses(interaction)
        c2dsr = self.lam * (share_x + share_y + x + y) + (1 - self.lam) * (mi_x + mi_y)
        return self.gamma * c2dsr + (1 - self.gamma) * (align_a + align_b)
