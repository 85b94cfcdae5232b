"""URLLM's LLM stage, run after the dual-graph (DG) model has trained (the retrieval needs
its user representations):

1. **Retrieval**: every user is represented by the DG vector of its target's domain (the
   mixed state at the last input plus that domain view's state at its last input), with
   the DG weights selected for that domain; the most similar training row by dot product
   is the user's neighbour (a training row never retrieves itself).
2. **Prompt** (:func:`build_prompt`, the public code's layout in the Alpaca wrapper
   :func:`alpaca`): the neighbour's items, then the user's own items, each as
   `` <domain word>:<title> |``, oldest first; the neighbour's items stop once the own part and
   the neighbour part hold 512 words; then the request for the target's domain.
3. **Fine-tuning** (``urllm_generator: hf`` with ``urllm_finetune``): LoRA adapters on the
   DG's training rows (each row's last item is the response), cached (:mod:`recbole_cdsr.llm.lora`).
4. **Generation** for every test user through the project's backends (``hf``: the base
   model with the adapters, beam search; ``openai``: a served model, greedy), resumable per
   user (:class:`~recbole_cdsr.llm.generation.GenerationJob`).
5. **Refinement** (:func:`refine`, our design; the public code has none): the answer's exact
   title among the target domain's items, else the nearest title by text embedding within
   that domain, else (an empty or unusable answer) the DG's top item.
6. **Ranking**: the refined item first, then the DG ranking (``URLLM.llm_item``), under both
   protocols.

Without ``urllm_generator`` nothing of this runs: the DG model ranks alone, and the log and
the results file say so.
"""

import hashlib
import json
import logging
import os
import re

import numpy as np
import torch

from recbole_cdsr.data.atomic import domain_labels, read_item_titles, read_rows, read_training_sequences

logger = logging.getLogger(__name__)

PROMPT_VERSION = "urllm-alpaca-v1"
MAX_WORDS = 512
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def domain_words(config, dataset_dir, name, domains):
    """The word that names each domain in the prompt: ``urllm_domain_words`` or the last
    word of the dataset's domain name, lower case (Food-Kitchen: food, kitchen)."""
    words = config["urllm_domain_words"]
    if words:
        missing = [d for d in domains if d not in words]
        if missing:
            raise ValueError(f"urllm_domain_words must name every domain ({', '.join(domains)}); missing {missing}")
        return {d: str(words[d]) for d in domains}
    labels = domain_labels(dataset_dir, name)
    return {d: labels.get(d, d).split()[-1].lower() for d in domains}


def build_prompt(similar, own, target_domain, words):
    """``{"instruction", "input"}`` for a user. ``similar`` / ``own``: ``[(domain, title)]``
    oldest first (the neighbour's whole sequence; the user's history); ``words``: domain ->
    word. As the public code: no separator between the parts, "played" in both headers, the
    neighbour's items added while the own part (split on single spaces) and the neighbour
    part (split on whitespace) hold fewer than 512 words."""
    doms = sorted(words)
    pair = " or ".join(words[d] for d in doms)
    own_part = f"The user has played the following {pair} before:" + "".join(f" {words[d]}:{t} |" for d, t in own)
    sim_part = f"There is another similar user who has played {pair} before:"
    for d, t in similar:
        if len(own_part.split(" ")) + len(sim_part.split()) >= MAX_WORDS:
            break
        sim_part += f" {words[d]}:{t} |"
    return {
        "instruction": f"Given a list of {pair} the user has bought before, please recommend a new {pair} "
                       "that the user likes to the user.",
        "input": sim_part + own_part + f"Please recommend a new {words[target_domain]}\n",
    }


def alpaca(prompt, response=""):
    """The Alpaca text of ``prompt`` (``instruction``, ``input``), followed by ``response``."""
    return ALPACA.format(**prompt) + response


_USABLE = re.compile(r"[A-Za-z0-9]")


def clean_answer(text, words=()):
    """The first non-empty line of an answer, without end-of-sequence marks, quotes or a
    leading ``<domain word>:`` tag."""
    text = (text or "").replace("</s>", "\n")
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip("\"' |")
    for w in words:
        if line.lower().startswith(f"{w.lower()}:"):
            line = line[len(w) + 1:].strip()
    return line


def title_index(titles):
    """``{normalised title: first index}`` of ``titles`` (built once per domain)."""
    from recbole_cdsr.model.urllm import normalise_text

    out = {}
    for i, t in enumerate(titles):
        out.setdefault(normalise_text(t), i)
    return out


def refine(answer, index, title_vectors, encoder, words=()):
    """``(index into the titles, how)`` of the answer: ``exact`` (the same title after the
    attribute-word normalisation; ``index`` from :func:`title_index`), ``nearest`` (the
    highest cosine between the answer's embedding and ``title_vectors``, unit rows), or
    ``(None, "fallback")`` for an answer without a letter or digit (the caller takes the
    dual-graph model's top item)."""
    from recbole_cdsr.model.urllm import normalise_text

    text = clean_answer(answer, words)
    if not _USABLE.search(text):
        return None, "fallback"
    if normalise_text(text) in index:
        return index[normalise_text(text)], "exact"
    v = np.asarray(encoder.encode([text]), dtype=np.float32)[0]
    return int(np.argmax(title_vectors @ (v / max(np.linalg.norm(v), 1e-12)))), "nearest"


# -- the stage --------------------------------------------------------------------------------
def _vectors(model, inter, domain, batch=512):
    """DG user vectors [rows, width] of ``inter``'s rows for ``domain`` (0: A, 1: B)."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(inter), batch):
            out.append(model.user_states(inter[i : i + batch].to(dev))[domain].cpu())
    return torch.cat(out)


def _neighbours(query, pool, exclude_self=False):
    """Index of the highest dot product in ``pool`` for each row of ``query``."""
    out = []
    for i in range(0, len(query), 1024):
        sim = query[i : i + 1024] @ pool.t()
        if exclude_self:
            sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))] = float("-inf")
        out.append(sim.argmax(1))
    return torch.cat(out)


def after_training(config, trainer, train_data, valid_data, test_data):
    """URLLM's LLM stage (module docstring); returns the record for the results file."""
    gen = config["urllm_generator"]
    model = trainer.model
    if not gen:
        logger.warning("URLLM: no LLM configured (urllm_generator: ~): the dual-graph model alone ranks the "
                       "test users; set urllm_generator: hf or openai for the method with its LLM")
        return {"llm": None, "note": "no LLM configured: the dual-graph model alone"}
    from recbole_cdsr.llm.encoders import TextEncoder, item_text_embeddings
    from recbole_cdsr.llm.generation import GenerationJob
    from recbole_cdsr.stages.backend import make_backend

    name, d = config["dataset"], config["data_path"]
    ds = train_data.dataset
    doms = list(ds.domain_names)
    words = domain_words(config, d, name, doms)
    tokens, domains, titles = read_item_titles(os.path.join(d, f"{name}.item"))
    info = {t: (dm, ti) for t, dm, ti in zip(tokens, domains, titles)}
    id_of = ds.field2token_id[ds.iid_field]
    uid_tok = ds.field2id_token[ds.uid_field]

    # 1. retrieval, with each domain's selected DG weights
    test_inter, train_inter = test_data.dataset.inter_feat, train_data.dataset.inter_feat
    tgt_dom = ds.item_domain[test_inter[ds.iid_field].numpy()]
    trn_dom = ds.item_domain[train_inter[ds.iid_field].numpy()]
    neigh_test, neigh_train, dg_top = np.zeros(len(tgt_dom), np.int64), np.zeros(len(trn_dom), np.int64), {}
    was_training = model.training
    model.eval()
    for k, dom in enumerate(doms):
        key = "joint" if trainer.selection == "joint" else dom
        model.load_state_dict(trainer.best_states[key]["state"])
        pool = _vectors(model, train_inter, k)
        rows = np.nonzero(tgt_dom == k)[0]
        if len(rows):
            neigh_test[rows] = _neighbours(_vectors(model, test_inter[torch.as_tensor(rows)], k), pool).numpy()
            with torch.no_grad():
                scores = model.full_sort_predict(test_inter[torch.as_tensor(rows)].to(pool.device))
            scores[:, torch.as_tensor(ds.item_domain != k)] = float("-inf")
            for r, top in zip(rows, scores.argmax(1).tolist()):
                dg_top[int(r)] = top
        rows = np.nonzero(trn_dom == k)[0]
        if len(rows):
            mine = _vectors(model, train_inter[torch.as_tensor(rows)], k)
            sim = mine @ pool.t()
            sim[torch.arange(len(rows)), torch.as_tensor(rows)] = float("-inf")  # never itself
            neigh_train[rows] = sim.argmax(1).numpy()
    model.train(was_training)

    # 2. prompts, from the whole sequences in the atomic files
    train_seqs = read_training_sequences(d, name)
    train_users = [str(uid_tok[u]) for u in train_inter[ds.uid_field].tolist()]
    test_rows = read_rows(os.path.join(d, f"{name}.test.inter"))

    def items(toks):
        return [info[t] for t in toks]

    def prompt_for(neighbour_user, own_tokens, target_domain):
        return build_prompt(items(train_seqs[neighbour_user]), items(own_tokens), target_domain, words)

    requests = []
    for r, (user, hist, target) in enumerate(test_rows):
        p = prompt_for(train_users[neigh_test[r]], hist, info[target][0])
        requests.append({"user": user, "domain": info[target][0], "prompt": alpaca(p)})
    record = {"llm": gen, "domain_words": words, "test_users": len(requests),
              "neighbours": {"pool": "the training rows of the dual-graph model", "rows": len(train_users)}}

    # 3. fine-tuning (hf)
    adapters = None
    if gen == "hf" and config["urllm_finetune"]:
        from recbole_cdsr.llm.lora import finetune_lora, lora_settings

        if not config["llm_model_path"]:
            raise ValueError("urllm_generator hf needs llm_model_path (a local causal LM folder)")
        texts = []
        for r, user in enumerate(train_users):
            seq = train_seqs[user]
            p = prompt_for(train_users[neigh_train[r]], seq[:-1], info[seq[-1]][0])
            texts.append(alpaca(p, info[seq[-1]][1]))
        adapters, man = finetune_lora(config["llm_model_path"], texts, d, name, lora_settings(config),
                                      device=str(config["device"]))
        record["lora"] = {"folder": adapters, "epoch_losses": man.get("epoch_losses"), "texts": len(texts),
                          "settings": lora_settings(config)}

    # 4. generation, resumable per user
    if gen == "openai" and config["llm_decoding"] == "beam":
        logger.info("URLLM: an OpenAI-compatible server gives no beam search; decoding greedily")
        config["llm_decoding"] = "greedy"
    backend = make_backend(config, gen, adapter_path=adapters)
    digest = hashlib.sha256(json.dumps([(q["user"], q["prompt"]) for q in requests]).encode()).hexdigest()
    job = GenerationJob(d, name, backend, PROMPT_VERSION, parser="text", kind="urllm",
                        settings={"prompts_sha256": digest, "seed": config["generation_seed"]},
                        batch_size=config["llm_batch_size"], show_progress=config["show_progress"],
                        desc="URLLM: LLM recommendation")
    answers = job.run(requests)

    # 5. refinement within the target's domain; 6. the refined item first
    encoder = TextEncoder(config["text_encoder"], device=str(config["device"]))
    _, _, emb = item_text_embeddings(d, name, encoder, items=(tokens, domains, titles), stage="URLLM: ")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    counts, hits = {"exact": 0, "nearest": 0, "fallback": 0}, 0
    user_id = ds.field2token_id[ds.uid_field]
    by_domain = {dm: np.nonzero(domains == dm)[0] for dm in doms}
    indexes = {dm: title_index([titles[j] for j in rows]) for dm, rows in by_domain.items()}
    for r, q in enumerate(requests):
        rows = by_domain[q["domain"]]
        rec = answers.get(q["user"], {})
        text = rec.get("raw") if rec.get("status") == "ok" else ""
        i, how = refine(text, indexes[q["domain"]], emb[rows], encoder, words.values())
        counts[how] += 1
        item = dg_top[r] if how == "fallback" else id_of[tokens[rows[i]]]
        model.llm_item[user_id[q["user"]]] = int(item)
        hits += int(item) == id_of[test_rows[r][2]]  # for the record only: the ranking never reads it
    record.update(refined=counts, llm_item_is_target=hits, failed_users=sum(1 for a in answers.values() if a.get("status") != "ok"),
                  generation=job.identity)
    logger.info(f"URLLM: {len(requests)} test users: refined {counts}")
    return record
