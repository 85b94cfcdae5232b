r"""LeCDSR
################################################
Reference:
    Wang, Zhu, Wang, Ruan. "LeCDSR: Large Language Model Enhanced Cross-Domain Sequential
    Recommendation." Information Fusion, 2025 (doi 10.1016/j.inffus.2025.103762).

One mixed sequence of both domains over the joint item space, with two frozen LLM-made
tables: item text vectors X_item [N, d_llm] and user profile vectors X_user [U, d_llm]
(built by :func:`recbole_cdsr.stages.lecdsr.prepare`, read from the dataset).

For a history of n <= L items (L = ``MAX_ITEM_LIST_LENGTH``; rows are right-aligned inside
the model, newest item in the last slot, padding in front, as in the paper):

- E = id embeddings [B, L, d]; T = item adapter(X_item[seq]) [B, L, d]; u = user
  adapter(X_user[user]) [B, d]; adapter = Linear(d_llm, 768) -> LayerNorm -> GELU ->
  Linear(768, d). Padding slots of E and T are zero.
- Frequency mixing over the sequence axis (real FFT, orthonormal, length L):
  item_conv = irfft(rfft(E) * W_c) with a learnable complex filter W_c [L//2+1, d];
  fusion_conv = irfft(rfft(E) * rfft(T));
  c = item_conv * sigmoid(g1(item_conv)) + fusion_conv * sigmoid(g2(fusion_conv)), g = Linear(d, 1);
  padding slots of c are zeroed.
- Feature gate: h = c * sigmoid(W1 c + W2 u).
- Instance gate: a_t = sigmoid(h_t . w_item + u . W_user[:, t] + P[pos_t] . w_pos), where pos_t
  counts back from the newest item within the item's own domain (1 = newest of its
  domain; 0 = padding); z = sum_t a_t h_t / sum_t a_t over the real slots.
- Score of item j: s_j = b_j + W_j . (u + z + mean of c over the real slots): one matrix
  product for the whole catalogue (``full_sort_predict``).

Loss: pairwise hinge against ``n_neg`` negatives of the target's own domain (uniform,
never the target, drawn anew for every batch): for each sample the sum over its negatives of
relu((s_neg - s_pos) / tau + 1), averaged over the samples; plus ``align_weight`` times the
alignment loss, a symmetric soft-target contrastive loss between E and T over the real slots
of each sequence (logits E T^T / tau2, targets softmax((E E^T + T T^T) / (2 tau2)),
cross-entropy of the rows of the logits and of their transpose, averaged).

Initialisation (``lecdsr_init``): ``xavier`` (default) is what the public main script does
after building the model: xavier-normal on every trainable parameter of two or more
dimensions, fans computed on the public code's shapes (its filter is [1, L//2+1, d, 2]);
one-dimensional parameters keep their constructor values; the padding rows of the id and
position embeddings are zeroed afterwards (they are masked anyway). ``normal`` is the public
model's constructor alone (what its grid-search script trains): id, position, output and
user embeddings normal(0, ``embedding_init_std`` or 1/d), output bias 0, instance-gate
weights xavier-uniform, filter normal(0, 0.02), linear layers PyTorch's default.

Differences from the public code, each deliberate (docs/lecdsr.md has the full table):
the frozen tables are buffers that no initialisation touches (the public script
re-initialises them with every 2-D weight); the hinge compares each positive with its own
negatives ([B, n_neg], the public code broadcasts to [B, B, n_neg]) and is averaged over
samples, not summed over the batch; padding is masked in the mixing, both gates, the mean
and the alignment loss; every real item has a position (the public code leaves the oldest
slot at 0); the alignment term is counted once (the public code adds it twice, as
align(E, T) + align(T, E), which are equal); padding rows of the embeddings stay zero;
held-out users get a profile from their history (the public code gives them zeros);
negatives are drawn anew for every batch (the public code draws them once).
Ablations: ``lecdsr_use_profiles: False`` (u = a trainable user ID embedding, as the public
code, or u = 0 with ``lecdsr_user_vector: zero``), ``lecdsr_use_item_text: False`` (no T:
no fusion branch, no alignment loss; the learnable-filter branch stays).
"""

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_cdsr.model.layers import unique_padded


class _GatheredScores(torch.autograd.Function):
    """``scores[b, j] = table[items[b, j]] . rep[b]`` [B, n] as one batched product; backward
    gives the table its gradient as one sparse [rows, B] x [B, d] product (every (b, j) adds
    ``grad[b, j] rep[b]`` to row ``items[b, j]``), without the [B, n, d] outer product that
    autograd would build first."""

    @staticmethod
    def forward(ctx, table, items, rep):
        w = table[items]  # [B, n, d]
        ctx.save_for_backward(w, items, rep)
        ctx.rows = table.shape[0]
        return torch.bmm(w, rep.unsqueeze(2)).squeeze(2)

    @staticmethod
    def backward(ctx, grad):
        w, items, rep = ctx.saved_tensors
        grad_rep = torch.bmm(grad.unsqueeze(1), w).squeeze(1) if ctx.needs_input_grad[2] else None
        grad_table = None
        if ctx.needs_input_grad[0]:
            B, n = items.shape
            cols = torch.arange(B, device=items.device).repeat_interleave(n)
            spread = torch.sparse_coo_tensor(torch.stack([items.reshape(-1), cols]), grad.reshape(-1),
                                             (ctx.rows, B), check_invariants=False)
            grad_table = torch.sparse.mm(spread, rep)
        return grad_table, None, grad_rep


class TextAdapter(nn.Module):
    """Linear(d_in, inner) -> LayerNorm -> GELU -> Linear(inner, d_out) (LayerNorm's eps:
    PyTorch's default, as the public code)."""

    def __init__(self, d_in, d_out, inner=768, eps=1e-5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, inner), nn.LayerNorm(inner, eps=eps), nn.GELU(), nn.Linear(inner, d_out))

    def forward(self, x):
        return self.net(x)


def hinge_loss(pos, neg, tau):
    """``pos`` [B], ``neg`` [B, n]: mean over samples of sum_n relu((neg - pos) / tau + 1)."""
    return F.relu((neg - pos.unsqueeze(1)) / tau + 1.0).sum(dim=1).mean()


def alignment_loss(x, y, mask, tau2):
    """Symmetric soft-target contrastive loss between x and y [B, L, d] over the real slots
    (``mask`` [B, L]) of each sequence; averaged over the real slots of the batch."""
    logits = x @ y.transpose(1, 2) / tau2  # [B, L, L]
    sim = (x @ x.transpose(1, 2) + y @ y.transpose(1, 2)) / (2 * tau2)
    col = mask.unsqueeze(1)  # which columns are real
    neg_inf = torch.finfo(logits.dtype).min
    targets = torch.softmax(sim.masked_fill(~col, neg_inf), dim=-1)
    ce_rows = -(targets * torch.log_softmax(logits.masked_fill(~col, neg_inf), dim=-1)).sum(-1)
    lt = logits.transpose(1, 2)
    targets_t = torch.softmax(sim.transpose(1, 2).masked_fill(~col, neg_inf), dim=-1)
    ce_cols = -(targets_t * torch.log_softmax(lt.masked_fill(~col, neg_inf), dim=-1)).sum(-1)
    per_slot = (ce_rows + ce_cols) / 2
    m = mask.float()
    return (per_slot * m).sum() / m.sum().clamp(min=1.0)


class LeCDSR(SequentialRecommender):
    input_type = InputType.POINTWISE
    TRAIN_VIEW = "prefix"
    INIT_SCHEMES = ("xavier", "normal")  # lecdsr_init (checked by the config schema)
    USER_VECTORS = ("id", "zero")  # lecdsr_user_vector: u without profiles

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.hidden_size = config["hidden_size"]
        L = self.max_seq_length
        self.tau = float(config["tau"])
        self.tau2 = float(config["tau2"])
        self.align_weight = float(config["align_weight"])
        self.n_neg = int(config["n_neg"])
        self.use_profiles = bool(config["lecdsr_use_profiles"])
        self.use_item_text = bool(config["lecdsr_use_item_text"])
        self.init_scheme = config["lecdsr_init"]
        self.user_vector = "profile" if self.use_profiles else config["lecdsr_user_vector"]
        self.row_bucket = config["lecdsr_row_bucket"]  # distinct items of a batch padded to a multiple (forward)
        # fast_layers: the candidates' scores as one batched matrix product (no [B, n, d]
        # product tensor forward and backward: ~3x cheaper) and the fused AdamW of the trainer;
        # False: the elementwise product and sum, as before (the same values to rounding)
        self.fast = config["fast_layers"] is not False
        std = config["embedding_init_std"] or 1.0 / d

        # the public model's constructor ("normal"); "xavier" re-initialises on top of it
        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        self.position_embedding = nn.Embedding(L + 1, d, padding_idx=0)
        self.out_embedding = nn.Embedding(self.n_items, d)
        self.out_bias = nn.Embedding(self.n_items, 1)
        if self.user_vector == "id":
            # no profiles: a trainable vector per RecBole user id, as the public code. Users seen
            # only in validation/test never get a gradient: theirs stay at their initial values.
            self.user_embedding = nn.Embedding(dataset.user_num, d)
        for emb in (self.item_embedding, self.position_embedding, self.out_embedding,
                    getattr(self, "user_embedding", None)):
            if emb is not None:
                nn.init.normal_(emb.weight, 0.0, std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.position_embedding.weight[0].zero_()
        nn.init.zeros_(self.out_bias.weight)
        self.filter = nn.Parameter(torch.randn(L // 2 + 1, d, 2) * 0.02)
        self.item_conv_gate = nn.Linear(d, 1)
        self.fusion_conv_gate = nn.Linear(d, 1)
        self.feature_gate_item = nn.Linear(d, d)
        self.feature_gate_user = nn.Linear(d, d)
        self.instance_gate_item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, 1)))
        self.instance_gate_user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, L)))
        self.instance_gate_position = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, 1)))

        if self.use_item_text:
            table = getattr(dataset, "item_text", None)
            if table is None:
                raise ValueError("LeCDSR needs item text vectors on the dataset (item_text_table); run it through "
                                 "run_recbole_cdsr, or set lecdsr_use_item_text: False")
            self.register_buffer("item_text", table.clone().float())  # frozen, saved with the model
            self.item_adapter = TextAdapter(table.shape[1], d, config["adapter_inner_size"])
        if self.use_profiles:
            table = getattr(dataset, "user_profiles", None)
            if table is None:
                raise ValueError("LeCDSR needs user profile vectors on the dataset (user_profiles); run it through "
                                 "run_recbole_cdsr, or set lecdsr_use_profiles: False")
            self.register_buffer("user_profiles", table.clone().float())
            self.user_adapter = TextAdapter(table.shape[1], d, config["adapter_inner_size"])

        if self.init_scheme == "xavier":
            self.xavier_init_()

        # domains: for positions and for negatives of the target's own domain
        item_domain = torch.as_tensor(dataset.item_domain, dtype=torch.long)
        self.n_domains = len(dataset.domain_names)
        self.register_buffer("item_domain", item_domain, persistent=False)  # -1 = padding
        dom_items = [torch.as_tensor(x, dtype=torch.long) for x in dataset.domain_items]
        sizes = torch.tensor([len(x) for x in dom_items])
        self.register_buffer("domain_sizes", sizes, persistent=False)
        self.register_buffer("domain_start", torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]),
                             persistent=False)
        self.register_buffer("domain_items_flat", torch.cat(dom_items), persistent=False)
        rank = torch.zeros(self.n_items, dtype=torch.long)
        for x in dom_items:
            rank[x] = torch.arange(len(x))
        self.register_buffer("rank_in_domain", rank, persistent=False)

    def public_shape(self, name, param):
        """The shape the public code gives this parameter (its fans decide xavier's std)."""
        if name == "filter":
            return (1,) + tuple(param.shape)  # public: [1, L//2+1, d, 2]
        return tuple(param.shape)

    @torch.no_grad()
    def xavier_init_(self):
        """The public main script's initialisation: xavier-normal on every trainable
        parameter of two or more dimensions (std sqrt(2 / (fan_in + fan_out)) of the public
        shape). Buffers (the frozen LLM tables) are not parameters and stay untouched; 1-D
        parameters keep their values; the padding rows of the id and position embeddings are
        zeroed again."""
        for name, p in self.named_parameters():
            if p.requires_grad and p.dim() >= 2:
                nn.init.xavier_normal_(p.data.view(self.public_shape(name, p)))
        self.item_embedding.weight[0].zero_()
        self.position_embedding.weight[0].zero_()

    # -- sequence layout -----------------------------------------------------------------
    def right_align(self, seq, length):
        """Left-aligned rows [B, L] (RecBole's layout) -> newest item in the last slot."""
        L = seq.shape[1]
        src = torch.arange(L, device=seq.device).unsqueeze(0) - (L - length).unsqueeze(1)
        real = src >= 0
        return torch.where(real, seq.gather(1, src.clamp(min=0)), torch.zeros_like(seq)), real

    def positions(self, seq, real):
        """Per slot: how many items of the slot's own domain are at or after it (1 = the
        newest item of its domain); 0 at padding."""
        dom = self.item_domain[seq]
        pos = torch.zeros_like(seq)
        for d in range(self.n_domains):
            m = (dom == d) & real
            count = m.long().flip(1).cumsum(1).flip(1)
            pos = torch.where(m, count, pos)
        return pos

    # -- model ---------------------------------------------------------------------------
    def _user_vector(self, interaction, batch, device):
        if self.user_vector == "profile":
            return self.user_adapter(self.user_profiles[interaction[self.USER_ID]])
        if self.user_vector == "id":
            return self.user_embedding(interaction[self.USER_ID])
        return torch.zeros(batch, self.hidden_size, device=device)

    def forward(self, interaction, with_parts=False):
        seq, real = self.right_align(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        L = seq.shape[1]
        m = real.unsqueeze(-1).float()
        E = self.item_embedding(seq) * m
        # the FFTs run along the sequence axis; on the fast path over a [B, d, L] view of the
        # same tensors (the transform axis last: fewer layout copies, the same transforms)
        seq_dim = -1 if self.fast else 1

        def along(x):
            return x.transpose(1, 2) if self.fast else x

        filt = torch.view_as_complex(self.filter)
        spec = torch.fft.rfft(along(E), dim=seq_dim, norm="ortho")
        item_conv = along(torch.fft.irfft(spec * along(filt.unsqueeze(0)), n=L, dim=seq_dim, norm="ortho"))
        c = item_conv * torch.sigmoid(self.item_conv_gate(item_conv))
        T = None
        if self.use_item_text:
            # the adapter runs once per distinct item of the batch (rows are independent), on a
            # row count padded to a multiple of row_bucket so that oneDNN's per-shape cache
            # stays small (see unique_padded)
            uniq, inv = unique_padded(seq, self.row_bucket)
            T = self.item_adapter(self.item_text[uniq])[inv] * m
            fusion_conv = along(torch.fft.irfft(spec * torch.fft.rfft(along(T), dim=seq_dim, norm="ortho"), n=L,
                                                dim=seq_dim, norm="ortho"))
            c = c + fusion_conv * torch.sigmoid(self.fusion_conv_gate(fusion_conv))
        c = c * m
        u = self._user_vector(interaction, seq.shape[0], seq.device)
        h = c * torch.sigmoid(self.feature_gate_item(c) + self.feature_gate_user(u).unsqueeze(1))
        pos = self.positions(seq, real)
        logit = (
            (h @ self.instance_gate_item).squeeze(-1)
            + u @ self.instance_gate_user[:, :L]
            + (self.position_embedding(pos) @ self.instance_gate_position).squeeze(-1)
        )
        a = torch.sigmoid(logit) * real.float()
        z = (a.unsqueeze(-1) * h).sum(1) / a.sum(1, keepdim=True).clamp(min=1e-12)
        n = real.float().sum(1, keepdim=True).clamp(min=1.0)
        rep = u + z + c.sum(1) / n
        if with_parts:
            return rep, E, T, real
        return rep

    def score(self, rep, items):
        """Scores of ``items`` (any shape [B, ...]) for representations ``rep`` [B, d]."""
        b = self.out_bias(items).squeeze(-1)
        if self.fast and items.dim() == 2:
            return _GatheredScores.apply(self.out_embedding.weight, items, rep) + b
        w = self.out_embedding(items)
        shape = (rep.shape[0],) + (1,) * (items.dim() - 1) + (rep.shape[1],)
        return (w * rep.view(shape)).sum(-1) + b

    def sample_negatives(self, pos, n):
        """[B, n] items of each target's own domain, uniform, never the target."""
        dom = self.item_domain[pos]
        size = self.domain_sizes[dom].unsqueeze(1)
        r = (torch.rand(pos.shape[0], n, device=pos.device) * (size - 1)).long()
        r = r + (r >= self.rank_in_domain[pos].unsqueeze(1)).long()  # skip the target's own slot
        return self.domain_items_flat[self.domain_start[dom].unsqueeze(1) + r]

    def calculate_loss(self, interaction, neg=None):
        pos = interaction[self.POS_ITEM_ID]
        rep, E, T, real = self.forward(interaction, with_parts=True)
        if neg is None:
            neg = self.sample_negatives(pos, self.n_neg)
        loss = hinge_loss(self.score(rep, pos.unsqueeze(1)).squeeze(1), self.score(rep, neg), self.tau)
        if self.use_item_text and self.align_weight:
            loss = loss + self.align_weight * alignment_loss(E, T, real, self.tau2)
        return loss

    def predict(self, interaction):
        rep = self.forward(interaction)
        return self.score(rep, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction):
        rep = self.forward(interaction)
        return rep @ self.out_embedding.weight.t() + self.out_bias.weight.t()
