"""CDSRDataset: RecBole's SequentialDataset over the cross-domain atomic files.

The files hold one row per sequence (``user_id``, ``item_id_list``, ``item_id``): for
training users the whole chronological sequence (history, then last item), for
valid/test users the release's evaluation instance. Two training views are built from
those same rows when the dataset is built:

``prefix``
    one row per prefix of every training sequence (RecBole's own augmentation: predict
    item t from items < t). What RecBole's built-in models train on.
``sequence``
    one row per training user (the whole sequence); models that train on every position
    in one pass (the SASRec paper's way, LLMCDSR's backbone) read targets from
    ``item_id_list[1:] + item_id``. For RecBole's models (``windows=True``) the rows carry
    exactly the prefix view's targets: ``target_id_list`` [rows, L] holds at each position
    the item to predict there (0 = no target), a sequence longer than
    ``MAX_ITEM_LIST_LENGTH + 1`` gets its first window plus one row per later target (whose
    history is that target's last L items, as in the prefix view), and targets before
    ``train_min_history`` are 0.

Histories keep their last ``MAX_ITEM_LIST_LENGTH`` items (RecBole's ``seq_len`` would
keep the first ones). Valid and test rows are exactly the files' rows, in file order.
"""

import os
import warnings

import numpy as np
import torch

from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

TRAIN_VIEWS = ("prefix", "sequence")
TARGET_LIST_FIELD = "target_id_list"

# RecBole 1.2.1 uses pandas idioms that pandas 2.x flags as deprecated; they still work
# with pandas<3 (pinned). Keep the log readable.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


class CDSRDataError(ValueError):
    """The atomic files do not describe a cross-domain sequential dataset."""


class CDSRDataset(SequentialDataset):
    def __init__(self, config, train_view="prefix", windows=False):
        if train_view not in TRAIN_VIEWS:
            raise CDSRDataError(f"train_view must be one of {TRAIN_VIEWS}, got {train_view!r}")
        if config["benchmark_filename"] is None or len(config["benchmark_filename"]) != 3:
            raise CDSRDataError(
                "CDSR datasets are pre-split: benchmark_filename must be [train, valid, test]"
            )
        self.train_view = train_view
        self.windows = bool(windows) and train_view == "sequence"
        super().__init__(config)
        self._init_domains()
        self._init_side_information()

    # -- domains -----------------------------------------------------------------------
    def _init_domains(self):
        field = self.config["DOMAIN_FIELD"]
        if self.item_feat is None or field not in self.item_feat:
            raise CDSRDataError(
                f"{self.dataset_path}: the .item file must carry a '{field}:token' column "
                "(load_col: item must include it); convert the release with dataset_converters"
            )
        self.domain_field = field
        tokens = self.field2id_token[field]
        # Domains in token order (A, B, ...), excluding padding.
        self.domain_names = sorted(str(t) for t in tokens[1:])
        code_of_token_id = np.full(len(tokens), -1, dtype=np.int64)
        for tid, tok in enumerate(tokens):
            if tid > 0:
                code_of_token_id[tid] = self.domain_names.index(tok)
        feat = self.item_feat
        ids = np.asarray(feat[self.iid_field])
        doms = np.nan_to_num(np.asarray(feat[field], dtype=np.float64)).astype(np.int64)
        item_domain = np.full(self.item_num, -1, dtype=np.int64)
        item_domain[ids] = code_of_token_id[doms]
        if (item_domain[1:] < 0).any():
            bad = int(np.nonzero(item_domain[1:] < 0)[0][0]) + 1
            raise CDSRDataError(
                f"{self.dataset_path}: item {self.field2id_token[self.iid_field][bad]} appears in "
                "the interactions but has no domain in the .item file"
            )
        #: domain code (index into domain_names) of every internal item id; -1 for padding
        self.item_domain = item_domain
        #: internal item ids of each domain, ascending
        self.domain_items = [np.nonzero(item_domain == d)[0] for d in range(len(self.domain_names))]

    # -- side information of LLM-enhanced models ---------------------------------------------
    def _resolve(self, path):
        return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(self.dataset_path, path)

    def _side_file(self, key, path):
        """``path`` (of config ``key``) resolved and checked against its manifest."""
        from recbole_cdsr.cache import verified_manifest

        path = self._resolve(path)
        try:
            verified_manifest(path)
        except (OSError, ValueError) as e:
            raise CDSRDataError(f"{key}: {e} (run the model's stages first)") from None
        return path

    def _init_side_information(self):
        """``pseudo_items`` (stage-1 names embedded) and ``recall_tables`` (stage-2 item
        embeddings and projections) of LLMCDSR, ``item_text`` [item_num, d] and
        ``user_profiles`` [user_num, d] of LeCDSR, when the config names their files; None
        otherwise."""
        from recbole_cdsr.llm.pseudo_items import load_pseudo_items

        self.pseudo_items = None
        self.recall_tables = None
        if self.config["pseudo_items"]:
            self.pseudo_items = load_pseudo_items(
                self._resolve(self.config["pseudo_items"]),
                self.field2token_id[self.uid_field],
                self.user_num,
                self.config["pseudo_max_names"],
            )
        tables = self.config["recall_tables"]
        if tables:
            if not isinstance(tables, dict) or set(tables) != set(self.domain_names):
                raise CDSRDataError(
                    f"recall_tables must map every domain ({', '.join(self.domain_names)}) to a "
                    f"stage-2 .npz file, got {tables!r}"
                )
            tok2id = self.field2token_id[self.iid_field]
            self.recall_tables = {}
            for dom, path in tables.items():
                with np.load(self._side_file("recall_tables", path), allow_pickle=False) as z:
                    toks, emb, proj = z["item_tokens"], z["item_emb"], z["proj"]
                ids = [tok2id.get(str(t), 0) for t in toks]
                self.recall_tables[dom] = {
                    "item_ids": torch.tensor(ids, dtype=torch.long),
                    "item_emb": torch.from_numpy(emb),
                    "proj": torch.from_numpy(proj),
                }
        self.item_text = self._token_table("item_text_table", "item_tokens", self.iid_field, self.item_num)
        self.user_profiles = self._token_table("user_profiles", "users", self.uid_field, self.user_num)

    def _token_table(self, key, token_key, field, n_rows):
        """A float table [n_rows, d] in internal-id order from an npz of (tokens, emb) named
        by config ``key``; rows of ids the file does not cover (and padding) are zeros."""
        path = self.config[key]
        if not path:
            return None
        with np.load(self._side_file(key, path), allow_pickle=False) as z:
            toks, emb = z[token_key], z["emb"]
        tok2id = self.field2token_id[field]
        table = np.zeros((n_rows, emb.shape[1]), dtype=np.float32)
        ids = np.array([tok2id.get(str(t), 0) for t in toks], dtype=np.int64)
        keep = ids > 0
        table[ids[keep]] = emb[keep]
        return torch.from_numpy(table)

    def item_titles(self):
        """The title of every internal item id (padding and items without one: ""), read
        from the ``.item`` file (RecBole does not load the column)."""
        from recbole_cdsr.data.atomic import read_item_titles

        tokens, _, titles = read_item_titles(os.path.join(self.dataset_path, f"{self.dataset_name}.item"))
        tok2id = self.field2token_id[self.iid_field]
        out = [""] * self.item_num
        for tok, title in zip(tokens, titles):
            i = tok2id.get(str(tok))
            if i is not None:
                out[i] = str(title)
        return out

    def domain_mask(self):
        """Bool tensor [n_domains, item_num]: which items belong to each domain."""
        m = torch.zeros(len(self.domain_names), self.item_num, dtype=torch.bool)
        for d, items in enumerate(self.domain_items):
            m[d, torch.as_tensor(items)] = True
        return m

    # -- views -------------------------------------------------------------------------
    def _change_feat_format(self):
        """Build the training view and fixed-width histories, then convert to Interaction.
        ``training_sequences``: every training row's whole sequence (history then target,
        internal ids), before any cut or filter."""
        df = self.inter_feat
        list_field = self.item_id_list_field
        length_field = self.item_list_length_field
        max_len = self.max_item_list_len
        bounds = np.cumsum([0] + list(self.file_size_list))
        parts, sizes = [], []
        for i in range(3):
            part = df.iloc[bounds[i] : bounds[i + 1]]
            uid = part[self.uid_field].to_numpy(dtype=np.int64)
            hist = list(part[list_field].values)
            target = part[self.iid_field].to_numpy(dtype=np.int64)
            if any(len(h) == 0 for h in hist):
                split = self.benchmark_filename_list[i]
                raise CDSRDataError(f"{split} file holds a row with an empty history")
            if i == 0:
                self.training_sequences = [np.append(np.asarray(h, dtype=np.int64), t) for h, t in zip(hist, target)]
                uid, hist, target = self._min_per_domain(uid, hist, target, max_len)
            if i == 0 and self.train_view == "prefix":
                cols = _prefix_rows(uid, hist, target, max_len, self.config["train_min_history"])
            elif i == 0 and self.windows:
                cols = _window_rows(uid, hist, target, max_len, self.config["train_min_history"])
            else:
                cols = _last_rows(uid, hist, target, max_len)
            parts.append(cols)
            sizes.append(len(cols[0]))
        uid, mat, length, target = (np.concatenate([p[j] for p in parts]) for j in range(4))
        feat = {
            self.uid_field: torch.from_numpy(uid),
            self.iid_field: torch.from_numpy(target),
            list_field: torch.from_numpy(mat),
            length_field: torch.from_numpy(length),
        }
        if self.windows:
            # targets of the training rows; evaluation rows have none (their target is item_id)
            tgt = np.zeros_like(mat)
            tgt[: sizes[0]] = parts[0][4]
            feat[TARGET_LIST_FIELD] = torch.from_numpy(tgt)
        self.inter_feat = Interaction(feat)
        self.file_size_list = sizes
        self.field2seqlen[list_field] = max_len
        if self.windows:
            self.set_field_property(TARGET_LIST_FIELD, FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, max_len)
        self.set_field_property(length_field, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
        for feat_name in self.feat_name_list:
            if feat_name == "inter_feat":
                continue
            feat = getattr(self, feat_name)
            setattr(self, feat_name, self._dataframe_to_interaction(feat))

    def _min_per_domain(self, uid, hist, target, max_len):
        """Training rows whose sequence holds at least ``train_min_items_per_domain`` items of
        every domain (0: all rows). The sequence counted is what the view trains on: the last
        ``max_len`` history items and the target in the whole-sequence view, the whole
        sequence otherwise."""
        k = self.config["train_min_items_per_domain"] or 0
        if not k:
            return uid, hist, target
        cut = self.train_view == "sequence" and not self.windows
        keep = []
        for h, t in zip(hist, target):
            seq = np.append(np.asarray(h[-max_len:] if cut else h, dtype=np.int64), t)
            counts = np.bincount(self.item_domain[seq], minlength=len(self.domain_names))
            keep.append(bool((counts >= k).all()))
        keep = np.asarray(keep, dtype=bool)
        if not keep.any():
            raise CDSRDataError(f"train_min_items_per_domain {k}: no training sequence has {k} items of every "
                                "domain")
        self.logger.info(f"train_min_items_per_domain {k}: {int(keep.sum())} of {len(keep)} training sequences "
                         "kept (the others lack items of a domain)")
        return uid[keep], [h for h, m in zip(hist, keep) if m], target[keep]

    def split_names(self):
        return list(self.benchmark_filename_list)


def _last_rows(uid, hist, target, max_len):
    n = len(uid)
    mat = np.zeros((n, max_len), dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    for r, h in enumerate(hist):
        h = h[-max_len:]
        mat[r, : len(h)] = h
        length[r] = len(h)
    return uid, mat, length, target


def _prefix_rows(uid, hist, target, max_len, min_history=1):
    """Every prefix of every sequence (history + target): predict item j from items < j,
    for j >= ``min_history`` (0-based)."""
    seqs = [np.append(np.asarray(h, dtype=np.int64), t) for h, t in zip(hist, target)]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    n_rows = lens - 1
    seq_start = np.repeat(starts, n_rows)
    # Global position of each target: seq_start + 1, ..., seq_start + len - 1.
    offset = np.arange(n_rows.sum()) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    pos = seq_start + 1 + offset
    hist_start = np.maximum(seq_start, pos - max_len)
    length = pos - hist_start
    cols = np.arange(max_len)
    idx = np.minimum(hist_start[:, None] + cols, len(flat) - 1)
    mat = np.where(cols < length[:, None], flat[idx], 0)
    keep = offset + 1 >= min_history  # the target's 0-based index in its sequence
    return np.repeat(uid, n_rows)[keep], mat[keep], length[keep], flat[pos][keep]


def _window_rows(uid, hist, target, max_len, min_history=1):
    """Whole-sequence rows holding exactly the targets of :func:`_prefix_rows`.

    Returns ``uid, items, length, last_target, targets`` where ``targets[r, p]`` is the item
    to predict at position ``p`` of row ``r`` (0: none). A sequence ``s`` of n items gives
    one row with ``s[:min(n - 1, L)]`` whose position p predicts ``s[p + 1]`` (the prefix
    view's rows for targets 1..L, which all start at item 0), and, for every later target
    j > L, one row holding ``s[j - L:j]`` that predicts ``s[j]`` at its last position only.
    """
    rows_uid, rows_items, rows_targets = [], [], []
    for u, h, t in zip(uid, hist, target):
        s = np.append(np.asarray(h, dtype=np.int64), t)
        n = len(s)
        k = min(n - 1, max_len)
        tg = s[1 : k + 1].copy()
        tg[: max(min_history - 1, 0)] = 0  # target index p + 1 < min_history
        rows_uid.append(u)
        rows_items.append(s[:k])
        rows_targets.append(tg)
        for j in range(max_len + 1, n):
            if j < min_history:
                continue
            tg = np.zeros(max_len, dtype=np.int64)
            tg[-1] = s[j]
            rows_uid.append(u)
            rows_items.append(s[j - max_len : j])
            rows_targets.append(tg)
    m = len(rows_uid)
    mat = np.zeros((m, max_len), dtype=np.int64)
    tmat = np.zeros((m, max_len), dtype=np.int64)
    length = np.zeros(m, dtype=np.int64)
    for r, (it, tg) in enumerate(zip(rows_items, rows_targets)):
        mat[r, : len(it)] = it
        tmat[r, : len(tg)] = tg
        length[r] = len(it)
    last = tmat[np.arange(m), length - 1]
    keep = tmat.any(axis=1)  # a sequence shorter than train_min_history + 1 has no target
    return np.asarray(rows_uid, dtype=np.int64)[keep], mat[keep], length[keep], last[keep], tmat[keep]
