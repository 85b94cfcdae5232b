"""Faster training losses for RecBole's sequential models, with the same math.

``train_view: sequence`` (whole-sequence training)
    For causal models (:data:`SEQUENCE_MODELS`), one pass over a training window gives the
    hidden state at every position through the model's own layers; position ``p`` predicts
    ``target_id_list[p]``. A causal model's state at ``p`` depends only on items ``<= p``,
    so it equals the state the prefix view's row for that target computes: the loss (mean
    over the batch's targets of CE, or of BPR with one negative per target) equals the mean
    of the prefix rows' losses (tested, ``tests/test_speed_paths.py``). The model's
    regularisers are added as its ``calculate_loss`` adds them.
``fused_loss`` (prefix view)
    For models whose ``calculate_loss`` is "the sequence representation against every
    item, cross-entropy" plus their own regularisers (:data:`FUSED_CE_MODELS`), the same loss through
    :func:`~recbole_cdsr.model.fused_ce.linear_cross_entropy`, which never holds the full
    logits. BERT4Rec's CE scores only the masked slots that count (RecBole scores
    ``mask_ratio x MAX_ITEM_LIST_LENGTH`` slots per row against every item, padding
    included, then multiplies the padded ones by zero).

:func:`training_loss` picks the loss for a run and names it (recorded in the results file).
"""

import torch

from recbole_cdsr.data.dataset import TARGET_LIST_FIELD
from recbole_cdsr.data.length_groups import NEG_TARGET_LIST_FIELD
from recbole_cdsr.model.fused_ce import linear_cross_entropy


# -- hidden state at every position, through the model's own layers -------------------------
def _sasrec_states(model, item_seq):
    pos = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
    x = model.item_embedding(item_seq) + model.position_embedding(pos)
    x = model.dropout(model.LayerNorm(x))
    mask = model.get_attention_mask(item_seq)
    return model.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]


def _gru4rec_states(model, item_seq):
    out, _ = model.gru_layers(model.emb_dropout(model.item_embedding(item_seq)))
    return model.dense(out)


#: RecBole models with an exact whole-sequence path: name -> states(model, item_seq) [B, L, H]
SEQUENCE_MODELS = {"SASRec": _sasrec_states, "GRU4Rec": _gru4rec_states}

#: Why other causal-looking models have none.
NO_SEQUENCE_REASON = {
    "NextItNet": "RecBole 1.2.1 reads its output at the last padded column (position L-1), "
    "not at the history's end, so a prefix row's score depends on its padding",
    "NARM": "its attention reads every position with the last state as the query; a "
    "per-position version would be a different forward",
    "STAMP": "its attention reads every position with the last item as the query",
}

def _seq_len(m, i):
    return m.forward(i[m.ITEM_SEQ], i[m.ITEM_SEQ_LEN])


#: models whose prefix-view CE loss is ``CE(seq_output @ item_embedding.T)`` (+ the model's
#: own regularisers): name -> (seq_output(model, interaction), extra(model) or None)
FUSED_CE = {
    "SASRec": (_seq_len, None),
    "GRU4Rec": (_seq_len, None),
    "NARM": (_seq_len, None),
    "STAMP": (_seq_len, None),
    "SRGNN": (_seq_len, None),
    "LightSANs": (_seq_len, None),
    "FDSA": (_seq_len, None),
    "SASRecF": (_seq_len, None),
    "GRU4RecF": (_seq_len, None),
    "HRM": (lambda m, i: m.forward(i[m.ITEM_SEQ], i[m.USER_ID], i[m.ITEM_SEQ_LEN]), None),
    "GCSAN": (_seq_len, lambda m: m.reg_weight * m.reg_loss(m.item_embedding.weight)),
    "NextItNet": (
        lambda m, i: m.forward(i[m.ITEM_SEQ]),
        lambda m: m.reg_weight * m.reg_loss([m.item_embedding.weight, m.final_layer.weight]) + m.reg_loss_rb(),
    ),
    "Caser": (
        lambda m, i: m.forward(i[m.USER_ID], i[m.ITEM_SEQ]),
        lambda m: m.reg_weight * m.reg_loss(
            [m.user_embedding.weight, m.item_embedding.weight, m.conv_v.weight, m.fc1.weight, m.fc2.weight]
        ) + m.reg_loss_conv_h(),
    ),
}
FUSED_CE_MODELS = frozenset(FUSED_CE)


def supports_sequence_view(model_class, config=None):
    return getattr(model_class, "__name__", None) in SEQUENCE_MODELS and (
        config is None or str(config["loss_type"]).upper() in ("CE", "BPR")
    )


def _is_ce(model):
    return getattr(model, "loss_type", None) == "CE" and isinstance(
        getattr(model, "loss_fct", None), torch.nn.CrossEntropyLoss
    )


# -- losses ------------------------------------------------------------------------------
def sequence_loss(model, interaction, fused=True):
    """Whole-sequence loss of a RecBole causal model (mean over the batch's targets)."""
    states_fn = SEQUENCE_MODELS[type(model).__name__]
    item_seq = interaction[model.ITEM_SEQ]
    targets = interaction[TARGET_LIST_FIELD]
    states = states_fn(model, item_seq)
    sel = targets > 0
    h = states[sel]
    t = targets[sel]
    if model.loss_type == "CE":
        w = model.item_embedding.weight
        if fused:
            return linear_cross_entropy(h, w, t)
        return model.loss_fct(h @ w.t(), t)
    neg = interaction[NEG_TARGET_LIST_FIELD][sel]
    pos_score = (h * model.item_embedding(t)).sum(-1)
    neg_score = (h * model.item_embedding(neg)).sum(-1)
    return model.loss_fct(pos_score, neg_score)


def fused_prefix_loss(model, interaction):
    """RecBole's CE ``calculate_loss`` of the :data:`FUSED_CE_MODELS`, without full logits."""
    seq_fn, extra = FUSED_CE[type(model).__name__]
    loss = linear_cross_entropy(seq_fn(model, interaction), model.item_embedding.weight, interaction[model.POS_ITEM_ID])
    return loss if extra is None else loss + extra(model)


def bert4rec_loss(model, interaction, fused=True):
    """RecBole's BERT4Rec loss over the masked slots that count (``MASK_INDEX > 0``) only."""
    masked_seq = interaction[model.MASK_ITEM_SEQ]
    masked_index = interaction[model.MASK_INDEX]
    pos_items = interaction[model.POS_ITEMS]
    states = model.forward(masked_seq)  # [B, L, H]
    sel = masked_index > 0
    if not bool(sel.any()):
        return states.sum() * 0.0  # RecBole's loss is 0/0 here; no target, no gradient
    rows = torch.arange(masked_index.size(0), device=masked_index.device).unsqueeze(1).expand_as(masked_index)
    h = states[rows[sel], masked_index[sel]]
    t = pos_items[sel]
    if model.loss_type == "CE":
        w = model.item_embedding.weight[: model.n_items]
        if fused:
            return linear_cross_entropy(h, w, t, bias=model.output_bias)
        return torch.nn.functional.cross_entropy(h @ w.t() + model.output_bias, t)
    neg = interaction[model.NEG_ITEMS][sel]
    pos_score = (h * model.item_embedding(t)).sum(-1) + model.output_bias[t]
    neg_score = (h * model.item_embedding(neg)).sum(-1) + model.output_bias[neg]
    return -torch.log(1e-14 + torch.sigmoid(pos_score - neg_score)).mean()


def training_loss(model, view, fused=True):
    """``(loss_fn, name)`` for training ``model`` on ``view``: the fastest exact path, or
    the model's own ``calculate_loss`` (name ``"calculate_loss"``)."""
    name = type(model).__name__
    if view == "sequence" and name in SEQUENCE_MODELS:
        label = "sequence_fused_ce" if (fused and model.loss_type == "CE") else f"sequence_{model.loss_type.lower()}"
        return (lambda inter: sequence_loss(model, inter, fused=fused)), label
    if not fused:
        return model.calculate_loss, "calculate_loss"
    if name == "BERT4Rec" and model.loss_type in ("CE", "BPR"):
        return (lambda inter: bert4rec_loss(model, inter)), "bert4rec_masked_slots"
    if name in FUSED_CE_MODELS and _is_ce(model):
        return (lambda inter: fused_prefix_loss(model, inter)), "fused_ce"
    return model.calculate_loss, "calculate_loss"
