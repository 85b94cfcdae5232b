r"""LLMCDSR
################################################
Reference:
    Haoran Xin, Ying Sun, Chao Wang, Hui Xiong. "LLMCDSR: Enhancing Cross-Domain Sequential
    Recommendation with Large Language Models." ACM TOIS 43(5), 2025.

Stage 3 of the method: a SASRec backbone over the joint item space, trained on whole
sequences (every position in one pass), plus the Relevance-aware Meta Recall Network (RMRN)
that turns a single-domain user's LLM "pseudo items" into real items of the other domain
and inserts them into the user's sequence as context.

Backbone (``backbone``): ``public`` (default), the SASRec of the public code
(:class:`~recbole_cdsr.model.layers.PublicSASRecEncoder`); ``recbole``, RecBole's SASRec
layers (:class:`~recbole_cdsr.model.layers.CausalSeqEncoder`). The backbone-only ablation
uses the same backbone.

Recall, for single-domain users of domain D with pseudo-item text embeddings G [K, d_text]
(D' is the other domain), all batched:
  G' = G W_{D'}^T (frozen projection from stage 2); weights = masked softmax over the K rows
  of pooler_{D'}(G') (Linear(hidden -> 1), zero-initialised: pooling starts as a mean);
  g = sum_k weights_k G'_k; the top-``recall_k`` items of D' by cosine between g and the
  pre-trained embeddings E_{D'} (stage 2). Each recalled item is inserted before one of the
  n real items of the user's sequence, chosen uniformly (never after the last one; items
  that land in the same gap keep their recall order). At an inserted position the input
  embedding is the backbone's current embedding of the item plus a straight-through term
  ``(g - stopgrad(g)) / k``: its value is zero, and the gradient reaching the k inserted
  embeddings flows back to g as their mean (top-k itself is not differentiable). Inserted
  items are context only: no loss has an inserted item as its target. Sequences keep their
  last ``MAX_ITEM_LIST_LENGTH`` inputs.

Loss: BCE with one negative per position, drawn from the positive item's own domain and
not in the user's sequence; ONE mean over every real target position of the rows it is
given. A training step concatenates the original batch and the augmented batch, so the
loss is (sum over original positions + sum over augmented positions) / (their count):
augmented sequences weigh by their share of positions (:meth:`joint_mean`). The bilevel
meta step that trains the poolers lives in :class:`recbole_cdsr.trainer.llmcdsr.LLMCDSRTrainer`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_cdsr.model.layers import build_backbone, bucketed_bce, plan_length_buckets

MODES = ("full", "backbone_only", "random_recall", "no_meta")


class LLMCDSR(SequentialRecommender):
    input_type = InputType.POINTWISE
    TRAIN_VIEW = "sequence"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.mode = config["llmcdsr_mode"]  # one of MODES (checked by the config schema)
        self.hidden_size = config["hidden_size"]
        self.recall_k = config["recall_k"]
        self.neg_resample_rounds = config["neg_resample_rounds"]
        self.length_buckets = config["length_buckets"]
        self.bucket_overhead = config["bucket_overhead"]
        self.backbone_kind = config["backbone"]
        self.backbone = build_backbone(
            self.backbone_kind, self.n_items, self.hidden_size, self.max_seq_length, config["n_layers"],
            config["n_heads"], config["hidden_dropout_prob"], attn_dropout=config["attn_dropout_prob"],
            inner_size=config["inner_size"], hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"], initializer_range=config["initializer_range"],
        )
        # domains of the joint item space
        item_domain = torch.as_tensor(dataset.item_domain, dtype=torch.long)
        self.domain_names = list(dataset.domain_names)
        self.register_buffer("item_domain", item_domain.clamp(min=0), persistent=False)
        dom_items = [torch.as_tensor(x, dtype=torch.long) for x in dataset.domain_items]
        self.register_buffer("domain_sizes", torch.tensor([len(x) for x in dom_items]), persistent=False)
        self.register_buffer("domain_start", torch.tensor([0] + [len(x) for x in dom_items[:-1]]).cumsum(0), persistent=False)
        self.register_buffer("domain_items_flat", torch.cat(dom_items), persistent=False)
        # recall network: needs pseudo items and stage-2 artefacts unless backbone only
        self.poolers = nn.ModuleList([nn.Linear(self.hidden_size, 1, bias=False) for _ in self.domain_names])
        for p in self.poolers:
            nn.init.zeros_(p.weight)
        self.has_recall = self.mode != "backbone_only"
        if self.has_recall:
            pseudo = getattr(dataset, "pseudo_items", None)
            recall = getattr(dataset, "recall_tables", None)
            if pseudo is None or recall is None:
                raise ValueError(
                    "LLMCDSR needs pseudo items (stage 1) and pre-trained recall tables (stage 2) "
                    "on the dataset; run it through run_recbole_cdsr (which runs recbole_cdsr.stages.llmcdsr), "
                    "or set llmcdsr_mode: backbone_only"
                )
            self.register_buffer("pseudo_emb", pseudo["emb"].float(), persistent=False)
            self.register_buffer("pseudo_index", pseudo["index"], persistent=False)
            for d, name in enumerate(self.domain_names):
                t = recall[name]
                # frozen: projection W_D [H, d_text], normalised E_D [|D|, H], internal ids [|D|]
                self.register_buffer(f"proj_{d}", t["proj"].float(), persistent=False)
                self.register_buffer(f"recall_emb_{d}", F.normalize(t["item_emb"].float(), dim=-1), persistent=False)
                self.register_buffer(f"recall_ids_{d}", t["item_ids"].long(), persistent=False)

    # -- sequences --------------------------------------------------------------------
    def whole_sequence(self, interaction):
        """[B, L + 1]: history then target, left-aligned (0 = padding)."""
        hist = interaction[self.ITEM_SEQ]
        n = interaction[self.ITEM_SEQ_LEN]
        seq = torch.cat([hist, torch.zeros_like(hist[:, :1])], dim=1)
        seq[torch.arange(len(n), device=seq.device), n] = interaction[self.POS_ITEM_ID]
        return seq

    def sample_negatives(self, pos, seq):
        """One negative per position: same domain as ``pos``, not in the row's ``seq``."""
        dom = self.item_domain[pos]
        size = self.domain_sizes[dom]
        neg = self.domain_items_flat[self.domain_start[dom] + (torch.rand(pos.shape, device=pos.device) * size).long()]
        for _ in range(self.neg_resample_rounds):
            clash = (neg.unsqueeze(-1) == seq.unsqueeze(1)).any(-1) & (pos > 0)
            if not clash.any():
                break
            fresh = self.domain_items_flat[self.domain_start[dom] + (torch.rand(pos.shape, device=pos.device) * size).long()]
            neg = torch.where(clash, fresh, neg)
        return neg

    @staticmethod
    def _trim(inputs, targets, target_ok, extra=None):
        """Sequences are left-aligned: columns past the longest row are padding everywhere,
        and with causal attention dropping them changes no real position (~30% less work on
        a Food-Kitchen batch of 128, whose longest row averages 35 of 50 inputs)."""
        n = max(int((inputs > 0).sum(1).max()), 1)
        extra = None if extra is None else extra[:, :n]
        return inputs[:, :n], targets[:, :n], target_ok[:, :n], extra

    def seq_loss(self, net, inputs, targets, target_ok, extra=None, neg=None, return_items=False,
                 detach_inputs=False):
        """BCE over positions whose target is real, as ``(sum, count)``: divide by the count
        of every part of a step (:meth:`joint_mean`). ``net``: the backbone (or a functional
        copy); ``extra`` [B, L, H] is added to the input embeddings; ``neg``: negatives drawn
        beforehand (see :meth:`loss_plan`); ``detach_inputs``: the input embeddings carry no
        gradient into the item table (targets and negatives still do). With
        ``return_items`` also the item ids whose embeddings the loss reads.

        Rows run in up to ``length_buckets`` groups of similar length, each trimmed to its own
        longest row (:func:`plan_length_buckets`): rows never interact in the causal encoder,
        so the loss is the one of the whole batch, at a fraction of the positions (a
        Food-Kitchen batch holds 7.8 real inputs per row on average and up to 50)."""
        inputs, targets, target_ok, extra = self._trim(inputs, targets, target_ok, extra)
        if neg is None:
            neg = self.sample_negatives(targets, torch.cat([inputs, targets], dim=1))
        mask = (target_ok & (targets > 0)).float()
        if self.length_buckets > 1:
            groups = plan_length_buckets((inputs > 0).sum(1), self.length_buckets, self.bucket_overhead)
        else:
            groups = [(None, inputs.size(1))]
        total, count = bucketed_bce(net, net.item_embedding, inputs, targets, neg, mask, groups, extra,
                                    detach_inputs=detach_inputs)
        out = (total, mask.sum())
        if return_items:
            return out + (torch.cat([inputs.reshape(-1), targets.reshape(-1), neg.reshape(-1)]),)
        return out

    @staticmethod
    def joint_mean(*parts):
        """One mean over the positions of every ``(sum, count)`` part (the public code
        concatenates the original and the augmented batch and takes one mean)."""
        total = sum(p[0] for p in parts)
        count = sum(p[1] for p in parts)
        return total / torch.as_tensor(count).clamp(min=1)

    def orig_loss(self, interaction, net=None, neg=None):
        """``(sum, count)`` of the BCE of the batch's own sequences."""
        net = self.backbone if net is None else net
        seq = self.whole_sequence(interaction)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        return self.seq_loss(net, inputs, targets, targets > 0, neg=neg)

    def calculate_loss(self, interaction, net=None, neg=None):
        """Mean BCE of the batch's own sequences (the trainer adds the augmented batch)."""
        return self.joint_mean(self.orig_loss(interaction, net, neg))

    def loss_plan(self, interaction):
        """Draw the negatives of ``calculate_loss(interaction)`` now (the same random draws
        it would make) and return them with the ids of every item embedding that loss reads."""
        seq = self.whole_sequence(interaction)
        inputs, targets, _, _ = self._trim(seq[:, :-1], seq[:, 1:], seq[:, 1:] > 0)
        neg = self.sample_negatives(targets, torch.cat([inputs, targets], dim=1))
        return neg, torch.cat([inputs.reshape(-1), targets.reshape(-1), neg.reshape(-1)])

    # -- recall and insertion -------------------------------------------------------------
    def user_domain(self, interaction):
        """Domain code of a single-domain user's row (of its first item)."""
        return self.item_domain[interaction[self.ITEM_SEQ][:, 0]]

    def recall(self, interaction, with_grad=True):
        """Recalled item ids [B, k] of the other domain and the pooled vectors g [B, H]."""
        uid = interaction[self.USER_ID]
        own = self.user_domain(interaction)
        other = 1 - own
        B = len(uid)
        ids = torch.zeros(B, self.recall_k, dtype=torch.long, device=uid.device)
        g_all = torch.zeros(B, self.hidden_size, device=uid.device, dtype=self.pseudo_emb.dtype)
        idx = self.pseudo_index[uid]  # [B, K]
        valid = idx > 0
        for d in range(len(self.domain_names)):
            rows = torch.nonzero(other == d).view(-1)
            if len(rows) == 0:
                continue
            G = self.pseudo_emb[idx[rows]]  # [b, K, d_text]
            Gp = G @ getattr(self, f"proj_{d}").t()  # [b, K, H]
            if self.mode == "random_recall":
                pick = torch.randint(0, len(getattr(self, f"recall_ids_{d}")), (len(rows), self.recall_k), device=uid.device)
                ids[rows] = getattr(self, f"recall_ids_{d}")[pick]
                continue
            logits = self.poolers[d](Gp).squeeze(-1).masked_fill(~valid[rows], float("-inf"))
            w = torch.softmax(logits, dim=-1)
            w = torch.nan_to_num(w, nan=0.0)  # users without pseudo items: all masked
            g = (w.unsqueeze(-1) * Gp).sum(1)
            if not with_grad:
                g = g.detach()
            sims = F.normalize(g, dim=-1) @ getattr(self, f"recall_emb_{d}").t()
            top = sims.topk(self.recall_k, dim=-1).indices
            ids[rows] = getattr(self, f"recall_ids_{d}")[top]
            g_all = g_all.index_put((rows,), g)
        return ids, g_all

    def augmented(self, interaction, net=None, with_grad=True):
        """Inputs, targets, target mask, the straight-through term added to the input
        embeddings (zero in value; non-zero only at inserted positions) and the inserted mask
        of the augmented sequences."""
        net = self.backbone if net is None else net
        seq = self.whole_sequence(interaction)  # [B, L + 1]
        B, S = seq.shape
        k = self.recall_k
        ids, g = self.recall(interaction, with_grad=with_grad)
        real_len = (seq > 0).sum(1)  # history + target
        # sort keys: real item j -> j; an inserted item goes before the real item j chosen
        # uniformly among the n real items (never after the last one), and the items of one
        # gap keep their recall order: key j - 1 + (rank + 1) / (k + 1)
        dev = seq.device
        real_key = torch.arange(S, device=dev).float().expand(B, S).clone()
        real_key[seq == 0] = float("inf")
        gap = torch.floor(torch.rand(B, k, device=dev) * real_len.unsqueeze(1).float())
        ins_key = gap - 1.0 + (torch.arange(k, device=dev).float() + 1.0) / (k + 1)
        keys = torch.cat([real_key, ins_key], dim=1)
        order = keys.argsort(dim=1, stable=True)
        items = torch.cat([seq, ids], dim=1).gather(1, order)
        inserted = torch.cat([torch.zeros_like(seq, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1).gather(1, order)
        # keep the last L + 1 items, left-aligned
        total = real_len + k
        L1 = self.max_seq_length + 1
        start = (total - L1).clamp(min=0)
        col = start.unsqueeze(1) + torch.arange(L1, device=dev)
        inside = col < total.unsqueeze(1)
        col = col.clamp(max=items.size(1) - 1)
        items = items.gather(1, col) * inside
        inserted = inserted.gather(1, col) & inside
        inputs, targets = items[:, :-1], items[:, 1:]
        target_ok = ~inserted[:, 1:] & (targets > 0)
        st = ((g - g.detach()) / k).unsqueeze(1)  # value 0; gradient: mean over the k insertions
        extra = st * inserted[:, :-1].unsqueeze(-1).float()
        return inputs, targets, target_ok, extra, inserted[:, :-1]

    def aug_loss(self, interaction, net=None, with_grad=True, return_items=False, detach_inputs=False):
        """``(sum, count)`` of the BCE of the augmented sequences of ``interaction``."""
        net = self.backbone if net is None else net
        inputs, targets, ok, extra, _ = self.augmented(interaction, net, with_grad)
        return self.seq_loss(net, inputs, targets, ok, extra=extra, return_items=return_items,
                             detach_inputs=detach_inputs)

    # -- scoring ----------------------------------------------------------------------
    def _last_hidden(self, interaction):
        h = self.backbone(interaction[self.ITEM_SEQ])
        return self.gather_indexes(h, interaction[self.ITEM_SEQ_LEN] - 1)

    def predict(self, interaction):
        u = self._last_hidden(interaction)
        return (u * self.backbone.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self._last_hidden(interaction) @ self.backbone.item_embedding.weight.t()
