"""Stage 2 of LLMCDSR: collaborative-textual contrastive pre-training, once per domain.

For domain D: a SASRec encoder trained only on D-sequences (single-domain D users plus the
D-only subsequence of every overlapped training user; the last item of each sequence is
held out for validation), and a projection ``W_D = Linear(d_text -> hidden, no bias)``.

    loss = next-item BCE (one negative per position, from D, not in the sequence)
         + infonce_weight x NT-Xent(W_D T_D[i], E_D[i]) over the distinct items of the batch
           (inputs, targets and negatives), see :func:`nt_xent`

The encoder is the backbone LLMCDSR trains with (``backbone``: ``public``, the public
code's SASRec, or ``recbole``); the projection is xavier-normal initialised, Adam has betas
(0.9, 0.98), as in the public pre-training script. Early stopping on validation HR@10
(full ranking over D, pessimistic ties). Outputs, per
domain, written next to the dataset with a manifest: ``E_D`` (collaborative item embeddings,
rows in the ``.item`` order of D's items, padding dropped) and ``W_D`` (``proj`` [hidden,
d_text]). They map the text space of stage 1 into each domain's collaborative space.
"""

import hashlib
import io
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_cdsr.model.layers import bucketed_bce, build_backbone, plan_length_buckets
from recbole_cdsr.utils import atomic_write_bytes, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

PRETRAIN_FORMAT_VERSION = 6  # 2: vectorised negatives; 3: FastDropout; 4: padding columns dropped (random streams differ); F.gelu is the same function; 5: length buckets, fused Adam (random streams differ); 6: the public code's NT-Xent, backbone, init, betas, validation users

DEFAULTS = {
    "backbone": "public",
    "hidden_size": 64,
    "n_layers": 2,
    "n_heads": 1,
    "inner_size": 256,
    "dropout": 0.5,
    "max_len": 50,
    "learning_rate": 1e-3,
    "batch_size": 128,
    "epochs": 200,
    "patience": 10,
    "infonce_weight": 0.1,
    "tau": 1.0,
    "adam_betas": [0.9, 0.98],
    "seed": 2020,
}
LENGTH_BUCKETS = 3  # rows of a batch run in up to this many groups of similar length (exact, see losses)
BUCKET_OVERHEAD = 512  # positions: the fixed cost of one more encoder pass


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

    def losses(self, inp, pos, neg, text, buckets=LENGTH_BUCKETS):
        """``(bce, infonce)`` of a batch of left-aligned rows ``inp``/``pos``/``neg`` [B, L].

        The rows run in up to ``buckets`` groups of similar length, each trimmed to its own
        longest row (:func:`plan_length_buckets`): rows never interact in the causal encoder,
        so the losses are those of the whole batch (a Kitchen batch holds 7 real inputs per
        row on average and up to 50). One embedding lookup serves every group."""
        lens = (inp > 0).sum(1)
        if buckets > 1:
            groups = plan_length_buckets(lens, buckets, BUCKET_OVERHEAD)
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


def pretrain_domain(seqs, text, hp=None, device="cpu", log=None):
    """Train on ``seqs`` (lists of local ids 1..n); ``text`` float [n + 1, d] (row 0 padding).

    Returns a dict with ``item_emb`` [n, H] (padding dropped), ``proj`` [H, d_text],
    ``best_epoch``, ``valid_hit@10``, ``epoch_seconds``."""
    hp = dict(DEFAULTS, **(hp or {}))
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
        times.append(time.time() - t0)
        hit = model.hit_at_10(val_hist, val_tgt)
        if log:
            log(f"pre-train epoch {epoch}: bce {bce.item():.4f} infonce {nce.item():.4f} valid hit@10 {hit:.4f}")
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


def pretrain_dataset(dataset_dir, name, encoder, train_seqs, item_tokens, item_domains, text_emb,
                     hp=None, device="cpu", log=None):
    """Stage 2 for both domains of a dataset, cached: skipped when the manifest matches.

    ``item_tokens``/``item_domains``/``text_emb`` in ``.item`` order; ``train_seqs``: lists of
    item tokens of every training user (history then last item).
    Returns ``{domain: {"item_emb", "proj", "item_tokens"}}``."""
    hp = dict(DEFAULTS, **(hp or {}))
    hp["adam_betas"] = [float(b) for b in hp["adam_betas"]]  # as it reads back from the manifest
    seq_digest = hashlib.sha256("\n".join(" ".join(s) for s in train_seqs).encode()).hexdigest()
    ident = {
        "format_version": PRETRAIN_FORMAT_VERSION,
        "encoder": encoder.identity(),
        "item_file_sha256": sha256_file(os.path.join(dataset_dir, f"{name}.item")),
        "train_sequences_sha256": seq_digest,
        "hyper_parameters": hp,
    }
    tag = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    item_domain = dict(zip(item_tokens, item_domains))
    out = {}
    for dom in sorted(set(item_domains)):
        base = os.path.join(dataset_dir, f"{name}.pretrain-{dom}-{tag}")
        npz, man = base + ".npz", base + ".json"
        rows = np.nonzero(np.asarray(item_domains) == dom)[0]
        toks = np.asarray(item_tokens)[rows]
        if os.path.isfile(npz) and os.path.isfile(man):
            with open(man) as f:
                m = json.load(f)
            if m.get("identity") == ident and m.get("npz_sha256") == sha256_file(npz):
                with np.load(npz, allow_pickle=False) as z:
                    out[dom] = {"item_emb": z["item_emb"], "proj": z["proj"], "item_tokens": toks, "path": npz}
                continue
        index = {t: i + 1 for i, t in enumerate(toks)}
        seqs = domain_sequences(train_seqs, item_domain, index, dom)
        text = np.concatenate([np.zeros((1, text_emb.shape[1]), np.float32), text_emb[rows]])
        res = pretrain_domain(seqs, text, hp, device, log)
        buf = io.BytesIO()
        np.savez(buf, item_emb=res["item_emb"], proj=res["proj"], item_tokens=toks.astype(str))
        atomic_write_bytes(npz, buf.getvalue())
        atomic_write_json(man, {
            "identity": ident, "domain": dom, "sequences": len(seqs), "best_epoch": res["best_epoch"],
            "valid_hit@10": res["valid_hit@10"], "epoch_seconds": res["epoch_seconds"],
            "npz_sha256": sha256_file(npz),
        })
        out[dom] = {"item_emb": res["item_emb"], "proj": res["proj"], "item_tokens": toks, "path": npz}
    return out
