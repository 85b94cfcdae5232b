"""LLMCDSR's stages, run before the model trains: stage 1 (pseudo items for single-domain
users) and stage 2 (collaborative-textual pre-training, per domain). Every output is a
cached artefact next to the dataset (:mod:`recbole_cdsr.cache`), reused while its inputs are
unchanged; :func:`prepare` returns the config keys that name them (``pseudo_items``,
``recall_tables``, loaded by the dataset) and a record for the results file.

``generator`` picks stage 1's source:

``retrieval``  the documented no-LLM stand-in (loudly reported as such);
``hf``         a local transformers causal LM (``llm_model_path``);
``openai``     an OpenAI-compatible server (``llm_base_url``, ``llm_model``);
``import``     the paper's released generation embeddings (``import_path``).
"""

import hashlib
import json
import logging
import os
import time

import numpy as np

from recbole_cdsr.cache import Artefact
from recbole_cdsr.utils import sha256_file

logger = logging.getLogger(__name__)

GENERATORS = ("retrieval", "hf", "openai", "import")
PRETRAIN_FORMAT_VERSION = 7  # 6: the public code's NT-Xent, backbone, init, betas, validation users; 7: shared manifest, learning rate and buckets from the config


def prepare(config):
    """Run (or reuse) stages 1 and 2 for ``config``'s dataset; returns (updates, record)."""
    from recbole_cdsr.data.atomic import read_item_titles, read_training_sequences
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings

    if config["llmcdsr_mode"] == "backbone_only":
        return {}, {"stages": "skipped (backbone_only)"}
    name, d = config["dataset"], config["data_path"]
    encoder = TextEncoder(config["text_encoder"], device=str(config["device"]))
    items = read_item_titles(os.path.join(d, f"{name}.item"))  # each input file is read once
    sequences = read_training_sequences(d, name)
    item_domain = dict(zip(items[0], items[1]))
    if not any(len({item_domain[t] for t in seq}) == 1 for seq in sequences.values()):
        logger.warning(
            f"LLMCDSR on {name}: the dataset has no single-domain training user, so there is nobody to "
            "generate pseudo items for and nothing for the augmentation and the meta recall network to "
            "work on: this run trains LLMCDSR's backbone alone (llmcdsr_mode: backbone_only; stages 1 and 2 "
            "skipped). The results file records it."
        )
        return {"llmcdsr_mode": "backbone_only"}, {
            "stages": "skipped: no single-domain training users, the run is llmcdsr_mode backbone_only"}
    gen = config["generator"]
    record = {"generator": gen, "text_encoder": encoder.identity()}
    if gen == "import":  # first: a file of another width fails before anything is embedded or trained
        pseudo, record["stage1"] = import_pseudo_items(config, d, name, set(sequences), encoder)
    tokens, domains, emb = item_text_embeddings(d, name, encoder, items=items, stage="stage 1: ")
    if gen != "import":
        pseudo, record["stage1"] = generate_pseudo_items(config, d, name, encoder, items, sequences, emb)
    hp = pretrain_hyper_parameters(config)
    tables = pretrain_tables(d, name, encoder, list(sequences.values()), tokens, domains, emb, hp=hp,
                             device=str(config["device"]))
    record["stage2"] = {"files": {dom: v["path"] for dom, v in tables.items()}, "hyper_parameters": hp}
    return {"pseudo_items": pseudo, "recall_tables": record["stage2"]["files"]}, record


def generate_pseudo_items(config, d, name, encoder, items, sequences, title_emb):
    """Stage 1 with a backend: prompts, the resumable generation job, names embedded.
    Returns (pseudo-item file, record)."""
    from recbole_cdsr.llm.generation import GenerationJob
    from recbole_cdsr.llm.pseudo_items import write_pseudo_items
    from recbole_cdsr.llm.retrieval import CachedEncoder
    from recbole_cdsr.stages.backend import make_backend
    from recbole_cdsr.stages.llmcdsr_inputs import PROMPT_VERSION, extract_prompt, stage1_requests

    gen = config["generator"]
    if gen == "retrieval":
        logger.warning(
            "LLMCDSR stage 1 uses the RETRIEVAL STAND-IN, NOT AN LLM: pseudo items are the "
            "other-domain titles of the nearest overlapped users. Configure generator: hf "
            "or generator: openai for the method as published."
        )
    reqs, overlapped = stage1_requests(d, name, config["shot"], config["generation_seed"],
                                       with_prompts=gen != "retrieval", items=items, sequences=sequences)
    known = dict(zip(items[2], title_emb))
    backend = make_backend(config, gen, encoder, overlapped, known)
    job = GenerationJob(d, name, backend, PROMPT_VERSION, parser=config["llm_parser"],
                        name_pattern=config["name_pattern"], extract_prompt=extract_prompt,
                        settings={"shot": config["shot"], "seed": config["generation_seed"]},
                        batch_size=config["llm_batch_size"] if gen != "openai" else 4 * config["llm_concurrency"],
                        show_progress=config["show_progress"],
                        desc="stage 1: " + ("retrieval stand-in (not an LLM)" if gen == "retrieval"
                                            else "LLM generation"))
    records = job.run(reqs)
    failed = sum(1 for r in records.values() if r["status"] != "ok")
    with open(job.manifest) as f:
        gen_manifest = json.load(f)
    gen_manifest["records_sha256"] = hashlib.sha256(
        json.dumps(sorted((u, r["status"], r["names"]) for u, r in records.items())).encode()
    ).hexdigest()
    pseudo = write_pseudo_items(d, name, records, CachedEncoder(encoder, known),
                                {"records_sha256": gen_manifest["records_sha256"],
                                 "identity": gen_manifest["identity"]})
    return pseudo, {"manifest": gen_manifest, "failed_users": failed,
                    "note": "NOT an LLM: retrieval stand-in" if gen == "retrieval" else "LLM generation"}


def import_pseudo_items(config, dataset_dir, name, users, encoder):
    """Pseudo items from the paper's released ``<dataset>_generation_jina.pkl``.

    Entries are (domain 0/1, the user's 1-based line in ``train_A.txt``/``train_B.txt``,
    vectors [L, d]): the single-domain A user of line 5 is the token ``A_5``. Entries of users
    the dataset lacks (a slice) are skipped, and so are users with 2 or fewer vectors (the
    public code never writes them). The vectors must have the width of ``text_encoder``,
    whose item vectors stage 2 maps into the collaborative spaces; this is checked here,
    before any embedding or training. Returns (npz path, record)."""
    from recbole_cdsr.llm.import_release import (ReleaseImportError, generation_width, read_generation_embeddings,
                                                 user_token)
    from recbole_cdsr.llm.pseudo_items import pseudo_arrays

    path = config["import_path"]
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"generator: import needs import_path (the released generation pickle), got {path!r}")
    gens = read_generation_embeddings(path)
    width = generation_width(gens)
    if width is not None and width != encoder.dim:
        raise ReleaseImportError(
            f"generator: import: {path} holds {width}-d vectors, but text_encoder {config['text_encoder']!r} gives "
            f"{encoder.dim}-d vectors. Stage 2 learns its text-to-item mapping on item titles embedded with "
            f"text_encoder and applies it to these vectors, so both must come from the same model: set "
            f"text_encoder to the encoder that wrote the file (the paper's release: a {width}-d jina embedding "
            f"model, e.g. a local folder of jina-embeddings-v2-base-en)."
        )
    in_data = [(k, arr) for k, arr in sorted(gens.items()) if user_token(*k) in users]
    if gens and not in_data:
        first = user_token(*next(iter(sorted(gens))))
        raise ReleaseImportError(
            f"generator: import: none of the {len(gens)} users of {path} (tokens such as {first}) is a training "
            f"user of {name}; is it the release file of this dataset?"
        )
    kept = [(k, arr) for k, arr in in_data if len(arr) > 2]
    tokens = [user_token(*k) for k, _ in kept]
    ident = {"generator": "import", "format_version": 3, "source_sha256": sha256_file(path),
             "users_sha256": hashlib.sha256("\n".join(tokens).encode()).hexdigest()}
    record = {**ident, "users_in_file": len(gens), "users_not_in_dataset": len(gens) - len(in_data),
              "users_with_2_or_fewer": len(in_data) - len(kept), "users_imported": len(kept), "dim": width}
    art = Artefact(dataset_dir, f"{name}.pseudo", ident)
    if art.cached("imported pseudo items"):
        return art.path, record
    doms, offsets, index, rows = [], [0], [], []
    for (dom, _), arr in kept:
        doms.append(dom)
        index.extend(range(len(rows), len(rows) + len(arr)))
        rows.extend(arr)
        offsets.append(len(index))
    emb = np.asarray(rows, dtype=np.float32).reshape(len(rows), width or encoder.dim)
    art.write_arrays(pseudo_arrays(tokens, doms, offsets, index, [""] * len(rows), emb),
                     users=len(tokens), dim=int(emb.shape[1]))
    return art.path, record


def pretrain_hyper_parameters(config):
    """Stage 2's hyper-parameters from a run's config (they name its cached files)."""
    return {
        "backbone": config["backbone"], "adam_betas": [float(b) for b in config["adam_betas"]],
        "hidden_size": config["hidden_size"], "n_layers": config["n_layers"], "n_heads": config["n_heads"],
        "inner_size": config["inner_size"], "dropout": config["hidden_dropout_prob"],
        "max_len": config["MAX_ITEM_LIST_LENGTH"], "epochs": config["pretrain_epochs"],
        "patience": config["pretrain_patience"], "batch_size": config["pretrain_batch_size"],
        "learning_rate": config["pretrain_learning_rate"],
        "infonce_weight": config["infonce_weight"], "tau": config["infonce_tau"],
        "length_buckets": config["length_buckets"], "bucket_overhead": config["bucket_overhead"],
        "seed": config["seed"] if config["pretrain_seed"] is None else config["pretrain_seed"],
    }


def pretrain_tables(dataset_dir, name, encoder, train_seqs, item_tokens, item_domains, text_emb, hp,
                    device="cpu"):
    """Stage 2 for both domains of a dataset, each domain's table a cached artefact
    (``<dataset>.pretrain-<D>-<tag>.npz``: ``item_emb``, ``proj``, ``item_tokens``).

    ``item_tokens``/``item_domains``/``text_emb`` in ``.item`` order; ``train_seqs``: lists of
    item tokens of every training user (history then last item); ``hp``: every key of
    :func:`pretrain_hyper_parameters`. Returns ``{domain: {"item_emb", "proj", "item_tokens",
    "path"}}``."""
    from recbole_cdsr.trainer.pretrain_ct import domain_sequences, pretrain_domain

    seq_digest = hashlib.sha256("\n".join(" ".join(s) for s in train_seqs).encode()).hexdigest()
    ident = {
        "format_version": PRETRAIN_FORMAT_VERSION,
        "encoder": encoder.identity(),
        "item_file_sha256": sha256_file(os.path.join(dataset_dir, f"{name}.item")),
        "train_sequences_sha256": seq_digest,
        "hyper_parameters": hp,
    }
    item_domain = dict(zip(item_tokens, item_domains))
    doms = sorted(set(item_domains))
    out = {}
    for k, dom in enumerate(doms):
        art = Artefact(dataset_dir, f"{name}.pretrain-{dom}", dict(ident, domain=dom))
        rows = np.nonzero(np.asarray(item_domains) == dom)[0]
        toks = np.asarray(item_tokens)[rows]
        if art.cached(f"stage 2 table of domain {dom}"):
            z = art.load_arrays()
            out[dom] = {"item_emb": z["item_emb"], "proj": z["proj"], "item_tokens": toks, "path": art.path}
            continue
        index = {t: i + 1 for i, t in enumerate(toks)}
        seqs = domain_sequences(train_seqs, item_domain, index, dom)
        text = np.concatenate([np.zeros((1, text_emb.shape[1]), np.float32), text_emb[rows]])
        t0 = time.time()
        res = pretrain_domain(seqs, text, hp, device, stage=f"stage 2 [domain {dom}, {k + 1} of {len(doms)}]")
        art.write_arrays({"item_emb": res["item_emb"], "proj": res["proj"], "item_tokens": toks.astype(str)},
                         domain=dom, sequences=len(seqs), best_epoch=res["best_epoch"],
                         valid_hit_at_10=res["valid_hit@10"], epoch_seconds=res["epoch_seconds"],
                         seconds=time.time() - t0)
        out[dom] = {"item_emb": res["item_emb"], "proj": res["proj"], "item_tokens": toks, "path": art.path}
    return out
