"""The stages that run before an LLM-enhanced model trains (called by ``run_recbole_cdsr``).

LeCDSR: item text vectors and user profiles (:func:`prepare_lecdsr`), cached the same way.

LLMCDSR: stage 1 (generation -> pseudo items) and stage 2 (collaborative-textual
pre-training), each cached next to the dataset and skipped when its inputs are unchanged.
Returns config updates (``pseudo_items``, ``recall_tables``) and a record for the results
file. ``generator`` picks stage 1's source:

``retrieval``  the documented no-LLM stand-in (loudly reported as such);
``hf``         a local transformers causal LM (``llm_model_path``);
``openai``     an OpenAI-compatible server (``llm_base_url``, ``llm_model``);
``import``     the paper's released generation embeddings (``import_path``).
"""

import hashlib
import io
import json
import logging
import os

import numpy as np

from recbole_cdsr.utils import atomic_write_bytes, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

GENERATORS = ("retrieval", "hf", "openai", "import")


def _backend(config, encoder=None, overlapped=None, title_vectors=None, gen=None):
    from recbole_cdsr.llm.backends import HFBackend, OpenAIBackend
    from recbole_cdsr.llm.retrieval import RetrievalBackend

    gen = gen or config["generator"]
    if gen == "retrieval":
        return RetrievalBackend(encoder, overlapped, config["retrieval_neighbours"], config["llm_max_names"],
                                title_vectors=title_vectors)
    if gen == "hf":
        if not config["llm_model_path"]:
            raise ValueError("generator: hf needs llm_model_path (a local transformers model folder)")
        return HFBackend(config["llm_model_path"], device=str(config["device"]), batch_size=config["llm_batch_size"],
                         max_new_tokens=config["llm_max_new_tokens"], seed=config["generation_seed"])
    if gen == "openai":
        return OpenAIBackend(config["llm_base_url"], config["llm_model"], api_key_env=config["llm_api_key_env"],
                             chat=config["llm_chat"], max_tokens=config["llm_max_new_tokens"],
                             timeout=config["llm_timeout"], max_retries=config["llm_max_retries"],
                             concurrency=config["llm_concurrency"], seed=config["generation_seed"])
    raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {gen!r}")


def _import_pseudo(config, dataset_dir, name, users, encoder):
    """Pseudo items from the paper's released ``<dataset>_generation_jina.pkl``.

    Entries are (domain 0/1, the user's 1-based line in ``train_A.txt``/``train_B.txt``,
    vectors [L, d]): the single-domain A user of line 5 is the token ``A_5``. Entries of users
    the dataset lacks (a slice) are skipped, and so are users with 2 or fewer vectors (the
    public code never writes them). The vectors must have the width of ``text_encoder``,
    whose item vectors stage 2 maps into the collaborative spaces; this is checked here,
    before any embedding or training. Returns (npz path, record)."""
    from recbole_cdsr.llm.import_release import (ReleaseImportError, generation_width, read_generation_embeddings,
                                                 user_token)

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
    ident = {"generator": "import", "format_version": 2, "source_sha256": sha256_file(path),
             "users_sha256": hashlib.sha256("\n".join(tokens).encode()).hexdigest()}
    record = {**ident, "users_in_file": len(gens), "users_not_in_dataset": len(gens) - len(in_data),
              "users_with_2_or_fewer": len(in_data) - len(kept), "users_imported": len(kept), "dim": width}
    tag = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    out = os.path.join(dataset_dir, f"{name}.pseudo-{tag}.npz")
    if os.path.isfile(out):
        return out, record
    doms, offsets, index, rows = [], [0], [], []
    for (dom, _), arr in kept:
        doms.append(dom)
        index.extend(range(len(rows), len(rows) + len(arr)))
        rows.extend(arr)
        offsets.append(len(index))
    buf = io.BytesIO()
    emb = np.asarray(rows, dtype=np.float32).reshape(len(rows), width or encoder.dim)
    np.savez(buf, users=np.asarray(tokens, dtype=str), domains=np.asarray(doms, dtype=str),
             offsets=np.asarray(offsets, dtype=np.int64), index=np.asarray(index, dtype=np.int32),
             names=np.asarray([""] * len(rows), dtype=str), emb=emb)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_json(out[:-4] + ".json", {"identity": ident, "users": len(tokens), "dim": int(emb.shape[1]),
                                           "npz_sha256": sha256_file(out)})
    return out, record


def prepare_llmcdsr(config):
    """Run (or reuse) stages 1 and 2 for ``config``'s dataset; returns (updates, record)."""
    from recbole_cdsr.data.utils import ensure_atomic_files
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings, read_item_titles
    from recbole_cdsr.llm.generation import GenerationJob
    from recbole_cdsr.llm.retrieval import CachedEncoder
    from recbole_cdsr.llm.stage1 import read_training_sequences, stage1_backend, stage1_requests
    from recbole_cdsr.model.pretrain_ct import pretrain_dataset

    if config["llmcdsr_mode"] == "backbone_only":
        return {}, {"stages": "skipped (backbone_only)"}
    ensure_atomic_files(config)
    name = config["dataset"]
    d = config["data_path"]
    dev = str(config["device"])
    encoder = TextEncoder(config["text_encoder"], device=dev)
    items = read_item_titles(os.path.join(d, f"{name}.item"))  # each input file is read once
    sequences = read_training_sequences(d, name)
    gen = config["generator"]
    if gen == "import":  # first: a file of another width fails before anything is embedded or trained
        pseudo, import_record = _import_pseudo(config, d, name, set(sequences), encoder)
    tokens, domains, emb = item_text_embeddings(d, name, encoder, items=items)
    titles = items[2]
    known = {t: v for t, v in zip(titles, emb)}
    record = {"generator": config["generator"], "text_encoder": encoder.identity()}

    if gen == "import":
        record["stage1"] = import_record
    else:
        if gen == "retrieval":
            logger.warning(
                "LLMCDSR stage 1 uses the RETRIEVAL STAND-IN, NOT AN LLM: pseudo items are the "
                "other-domain titles of the nearest overlapped users. Configure generator: hf "
                "or generator: openai for the method as published."
            )
        reqs, overlapped = stage1_requests(d, name, config["shot"], config["generation_seed"],
                                           with_prompts=gen != "retrieval", items=items, sequences=sequences)
        backend = stage1_backend(config, encoder, overlapped, known)
        job = GenerationJob(d, name, backend, parser=config["llm_parser"] or "auto",
                            name_pattern=config["name_pattern"] or "lines",
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
        pseudo = _cached_pseudo(d, name, records, CachedEncoder(encoder, known), gen_manifest)
        record["stage1"] = {"manifest": gen_manifest, "failed_users": failed,
                            "note": "NOT an LLM: retrieval stand-in" if gen == "retrieval" else "LLM generation"}
    seqs = list(sequences.values())
    hp = pretrain_hyper_parameters(config)
    out = pretrain_dataset(d, name, encoder, seqs, tokens, domains, emb, hp=hp, device=dev,
                           log=lambda m: logger.info(m))
    tables = {dom: v["path"] for dom, v in out.items()}
    record["stage2"] = {"files": tables, "hyper_parameters": hp}
    return {"pseudo_items": pseudo, "recall_tables": tables}, record


def _cached_pseudo(d, name, records, encoder, gen_manifest):
    from recbole_cdsr.llm.pseudo_items import write_pseudo_items

    ident = {"format_version": 1, "generation": gen_manifest["records_sha256"], "encoder": encoder.identity()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    pointer = os.path.join(d, f"{name}.pseudo-latest-{key}.json")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            p = json.load(f)["npz"]
        if os.path.isfile(os.path.join(d, p)):
            return os.path.join(d, p)
    path = write_pseudo_items(d, name, records, encoder, {"records_sha256": gen_manifest["records_sha256"],
                                                         "identity": gen_manifest["identity"]})
    atomic_write_json(pointer, {"npz": os.path.basename(path)})
    return path


def prepare_lecdsr(config):
    """Item text vectors and user profile vectors for LeCDSR; returns (updates, record)."""
    from recbole_cdsr.data.utils import ensure_atomic_files
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings, read_item_titles
    from recbole_cdsr.llm.profiles import build_profiles, write_item_text_table

    use_text, use_prof = config["lecdsr_use_item_text"], config["lecdsr_use_profiles"]
    if not use_text and not use_prof:
        return {}, {"stages": "skipped (no item semantics, no profiles)"}
    ensure_atomic_files(config)
    name, d = config["dataset"], config["data_path"]
    encoder = TextEncoder(config["text_encoder"], device=str(config["device"]))
    items = read_item_titles(os.path.join(d, f"{name}.item"))
    record = {"text_encoder": encoder.identity()}
    updates = {}
    if use_text:
        tokens, _, emb = item_text_embeddings(d, name, encoder, items=items)
        updates["item_text_table"], record["item_text"] = write_item_text_table(d, name, tokens, emb, encoder)
    if use_prof:
        path, rec = build_profiles(config, d, name, encoder, items,
                                   backend_factory=lambda c: _backend(c, gen=c["profile_generator"]),
                                   show_progress=config["show_progress"])
        updates["user_profiles"] = path
        record["profiles"] = {k: v for k, v in rec.items() if k != "encoder"}
    return updates, record


def pretrain_hyper_parameters(config):
    """Stage 2's hyper-parameters from a run's config (they name its cached files)."""
    return {
        "backbone": config["backbone"], "adam_betas": [float(b) for b in config["adam_betas"]],
        "hidden_size": config["hidden_size"], "n_layers": config["n_layers"], "n_heads": config["n_heads"],
        "inner_size": config["inner_size"], "dropout": config["hidden_dropout_prob"],
        "max_len": config["MAX_ITEM_LIST_LENGTH"], "epochs": config["pretrain_epochs"],
        "patience": config["pretrain_patience"], "batch_size": config["pretrain_batch_size"],
        "infonce_weight": config["infonce_weight"], "tau": config["infonce_tau"],
        "seed": config["seed"] if config["pretrain_seed"] is None else config["pretrain_seed"],
    }
