"""Stage 2 of LLMCDSR: collaborative-textual contrastive pre-training of one domain (its
network and training loop; :func:`recbole_cdsr.stages.llmcdsr.pretrain_tables` runs it per
domain and caches the outputs).

For domain D: a SASRec encoder trained only on D-sequences (single-domain D users plus the
D-only subsequence of every overlapped training user; the last item of each sequence is
held out for validation), and a projection ``W_D = Linear(d_text -> hidden, no bias)``.

    loss = next-item BCE (one negative per position, from D, not in the sequence)
         + infonce_weight x NT-Xent(W_D T_D[i], E_D[i]) over the distinct items of the batch
           (inputs, targets and negatives), see :func:`nt_xent`

The encoder is the backbone LLMCDSR trains with (``backbone``: ``public``, the public
code's SASRec, or ``recbole``); the projection is xavier-normal initialised, Adam has betas
(0.9, 0.98), as in the public pre-training script. Early stopping on validation HR@10
(full ranking over D, pessimistic ties). Outputs: ``E_D`` (collaborative item embeddings,
rows in the ``.item`` order of D's items, padding dropped) and ``W_D`` (``proj`` [hidden,
d_text]). They map the text space of stage 1 into each domain's collaborative space.
"""

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_cdsr.model.layers import bucketed_bce, build_backbone, plan_length_buckets

logger = logging.getLogger(__name__)


def nt_xent(a, b, tau=1.0):
    """NT-Xent between two views of the same n items, as the public pre-training code
    computes it: logits are raw dot products over ``tau`` (no cosine). Row i of ``a`` is
    scored against every row of ``b`` (``b_i`` is its positive) and every other row of ``a``
    (same-view negatives, itself excluded); likewise each row of ``b``. One cross-entropy
    averaged over the 2n rows."""
    n = a.size(0)
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    ab = a @ b.t() / tau
    aa = (a @ a.t() / tau).masked_fill(eye, float("-inf"))
    bb = (b @ b.t() / tau).masked_fill(eye, float("-inf"))
    logits = torch.cat([torch.cat([ab, aa], dim=1), torch.cat([bb, ab.t()], dim=1)], dim=0)
    labels = torch.arange(2 * n, device=a.device)
    return F.cross_entropy(logits, labels)


def domain_sequences(train_seqs, item_domain, item_index, domain):
    """D-only sequences as lists of local ids (1..|D|), dropping those shorter than 2."""
    out = []
    for seq in train_seqs:
        s = [item_index[t] for t in seq if item_domain[t] == domain]
        if len(s) >= 2:
            out.append(s)
    return out


def _pad(seqs, max_len):
    """Left-aligned [N, max_len] with the last ``max_len`` items of each sequence."""
    m = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        m[i, : len(s)] = s
    return torch.from_numpy(m)


class CollabTextPretrainer(nn.Module):
    def __init__(self, n_items, d_text, hp):
        super().__init__()
        self.n_items = n_items  # including padding row 0
        self.enc = build_backbone(
            hp["backbone"], n_items, hp["hidden_size"], hp["max_len"], hp["n_layers"], hp["n_heads"],
            hp["dropout"], inner_size=hp["inner_size"],
        )
        self.proj = nn.Linear(d_text, hp["hidden_size"], bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        self.tau = hp["tau"]
        self.w = hp["infonce_weight"]
        self.length_buckets = hp["length_buckets"]
        self.bucket_overhead = hp["bucket_overhead"]

    def losses(self, inp, pos, neg, text):
        """``(bce, infonce)`` of a batch of left-aligned rows ``inp``/``pos``/``neg`` [B, L].

        The rows run in up to ``length_buckets`` groups of similar length, each trimmed to its own
        longest row (:func:`plan_length_buckets`): rows never interact in the causal encoder,
        so the losses are those of the whole batch (a Kitchen batch holds 7 real inputs per
        row on average and up to 50). One embedding lookup serves every group."""
        lens = (inp > 0).sum(1)
        if self.length_buckets > 1:
            groups = plan_length_buckets(lens, self.length_buckets, self.bucket_overhead)
        else:
            groups = [(None, max(int(lens.max()), 1))]
        emb = self.enc.item_embedding
        total, count = bucketed_bce(self.enc, emb, inp, pos, neg, (pos > 0).float(), groups)
        bce = total / torch.as_tensor(count).clamp(min=1)
        both = torch.cat([inp.reshape(-1), pos.reshape(-1), neg.reshape(-1)])
        items = torch.unique(both[both > 0])
        nce = nt_xent(self.proj(text[items]), emb(items), self.tau)
        return bce, nce

    @torch.no_grad()
    def hit_at_10(self, hist, target, chunk=1024):
        """Validation HR@10 by full ranking over the domain (pessimistic ties:
        ``rank = 1 + #{c != target, c != padding : score(c) >= score(target)}``; a NaN target
        score ranks last). Rows go by length, in chunks of ``chunk`` sequences (a whole
        domain at once would hold |users| x |items| scores), each chunk trimmed to its longest
        row (left-aligned rows, causal encoder: the same last states)."""
        self.eval()
        hits = 0
        table = self.enc.item_embedding.weight.t()
        lens = (hist > 0).sum(1)
        order = torch.argsort(lens, stable=True)
        for i in range(0, len(hist), chunk):
            sel = order[i : i + chunk]
            n = max(int(lens[sel].max()), 1)
            hb, tb = hist[sel, :n], target[sel]
            h = self.enc(hb)
            rows = torch.arange(len(hb), device=hb.device)
            scores = h[rows, (hb > 0).sum(1) - 1] @ table  # [b, n_items + 1], column 0 padding
            t = scores.gather(1, tb.view(-1, 1))
            # every column with score >= t, less the target itself and the padding column
            rank = (scores >= t).sum(1) - (scores[:, 0:1] >= t).squeeze(1).long()
            rank = torch.where(torch.isnan(t.squeeze(1)), torch.full_like(rank, scores.size(1)), rank)
            hits += int((rank <= 10).sum())
        self.train()
        return hits / max(len(hist), 1)


def pretrain_domain(seqs, text, hp, device="cpu", stage="stage 2"):
    """Train on ``seqs`` (lists of local ids 1..n); ``text`` float [n + 1, d] (row 0 padding);
    ``hp``: every key of :func:`recbole_cdsr.stages.llmcdsr.pretrain_hyper_parameters`. Logs
    one line per epoch, prefixed with ``stage``, with the time left at most.

    Returns a dict with ``item_emb`` [n, H] (padding dropped), ``proj`` [H, d_text],
    ``best_epoch``, ``valid_hit@10``, ``epoch_seconds``."""
    torch.manual_seed(hp["seed"])
    rng = np.random.default_rng(hp["seed"])
    n = text.shape[0]
    model = CollabTextPretrainer(n, text.shape[1], hp).to(device)
    text = torch.as_tensor(text, dtype=torch.float32, device=device)
    # training part: all but the held-out last item (sequences of 3 or more give a target);
    # validation: predict the last item from the others (every sequence of 2 or more)
    train = [s[:-1] for s in seqs if len(s) >= 3]
    val_hist = _pad([s[:-1] for s in seqs if len(s) >= 2], hp["max_len"]).to(device)
    val_tgt = torch.tensor([s[-1] for s in seqs if len(s) >= 2], device=device)
    full = _pad(train, hp["max_len"] + 1)
    inp, pos = full[:, :-1].clone(), full[:, 1:].clone()
    # a sequence that fits keeps its first item as input only (targets start at item 2)
    # fused: one kernel over each weight (CPU and CUDA), 3 ms instead of ~20 for a Kitchen table
    opt = torch.optim.Adam(model.parameters(), lr=hp["learning_rate"], betas=tuple(hp["adam_betas"]),
                           fused=torch.device(device).type in ("cpu", "cuda"))
    best, best_state, best_epoch, stale, times = -1.0, None, -1, 0, []
    whole = np.zeros((len(train), max(len(s) for s in train)), dtype=np.int64)  # every item of each sequence
    for i, s_ in enumerate(train):
        whole[i, : len(s_)] = s_
    for epoch in range(hp["epochs"]):
        t0 = time.time()
        order = rng.permutation(len(train))
        for i in range(0, len(order), hp["batch_size"]):
            idx = order[i : i + hp["batch_size"]]
            b_inp, b_pos = inp[idx].to(device), pos[idx].to(device)
            neg = rng.integers(1, n, size=b_pos.shape)
            rows = whole[idx][:, None, :]
            bad = (neg[:, :, None] == rows).any(-1)
            while bad.any():  # resample negatives that are in the user's sequence
                neg[bad] = rng.integers(1, n, size=int(bad.sum()))
                bad = (neg[:, :, None] == rows).any(-1)
            b_neg = torch.from_numpy(neg).to(device) * (b_pos > 0)
            bce, nce = model.losses(b_inp, b_pos, b_neg, text)
            loss = bce + model.w * nce
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.time() - t0)  # training only, as recorded
        hit = model.hit_at_10(val_hist, val_tgt)
        took = time.time() - t0
        left = min(hp["epochs"] - epoch - 1, hp["patience"] - (0 if hit > best else stale + 1))
        logger.info(f"{stage}: epoch {epoch + 1}/{hp['epochs']}: bce {bce.item():.4f} infonce {nce.item():.4f} "
                    f"valid hit@10 {hit:.4f} ({took:.1f} s; at most {max(left, 0) * took / 60:.1f} min left: "
                    f"early stopping, patience {hp['patience']})")
        if hit > best:
            best, best_epoch, stale = hit, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= hp["patience"]:
                break
    model.load_state_dict(best_state)
    return {
        "item_emb": model.enc.item_embedding.weight[1:].detach().cpu().numpy().astype(np.float32),
        "proj": model.proj.weight.detach().cpu().numpy().astype(np.float32),
        "best_epoch": best_epoch,
        "valid_hit@10": best,
        "epoch_seconds": times,
        "hyper_parameters": hp,
    }
