"""Inputs of stage 1 read from a converted dataset (users' titles, examples, prefixes) and
the backend that answers its prompts."""

import os

from recbole_cdsr.llm.encoders import read_item_titles
from recbole_cdsr.llm.generation import GenerationError, make_requests

PREFIX_FILES = {"A": "candidate_generate_A_icl.txt", "B": "candidate_generate_B_icl.txt"}


def read_rows(path):
    """``[(user, [history items], target)]`` of an ``.inter`` file, in file order."""
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = {c.split(":")[0]: i for i, c in enumerate(header)}
        for need in ("user_id", "item_id_list", "item_id"):
            if need not in cols:
                raise GenerationError(f"{path}: missing column {need}")
        for no, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                raise GenerationError(f"{path}, line {no}: expected {len(header)} columns, got {len(parts)}")
            rows.append((parts[cols["user_id"]], parts[cols["item_id_list"]].split(), parts[cols["item_id"]]))
    return rows


def read_training_sequences(dataset_dir, name):
    """``{user token: [item tokens]}`` of the training file (history then last item)."""
    path = os.path.join(dataset_dir, f"{name}.train.inter")
    return {user: hist + [target] for user, hist, target in read_rows(path)}


def stage1_inputs(dataset_dir, name, items=None, sequences=None):
    """Single-domain users ``[(user, D, D titles)]`` and overlapped examples
    ``{D: [(D titles, D' titles)]}``, from the training file only. ``items`` and
    ``sequences``: ``read_item_titles`` / ``read_training_sequences`` results already read."""
    if items is None:
        items = read_item_titles(os.path.join(dataset_dir, f"{name}.item"))
    tokens, domains, titles = items
    info = {t: (d, ti) for t, d, ti in zip(tokens, domains, titles)}
    doms = sorted(set(domains.tolist()))
    if len(doms) != 2:
        raise GenerationError(f"{name}: expected two domains, found {doms}")
    users, overlapped = [], {d: [] for d in doms}
    if sequences is None:
        sequences = read_training_sequences(dataset_dir, name)
    for user, seq in sequences.items():
        by_dom = {d: [info[t][1] for t in seq if info[t][0] == d] for d in doms}
        present = [d for d in doms if by_dom[d]]
        if len(present) == 1:
            users.append((user, present[0], by_dom[present[0]]))
        else:
            a, b = doms
            overlapped[a].append((by_dom[a], by_dom[b]))
            overlapped[b].append((by_dom[b], by_dom[a]))
    return users, overlapped


def read_prefixes(dataset_dir):
    out = {}
    for dom, fname in PREFIX_FILES.items():
        path = os.path.join(dataset_dir, fname)
        if not os.path.isfile(path):
            raise GenerationError(f"{path} is missing: the prompt prefix of domain {dom} (from the release)")
        with open(path, encoding="utf-8") as f:
            out[dom] = f.read()
    return out


def stage1_requests(dataset_dir, name, shot, seed, with_prompts=True, items=None, sequences=None):
    users, overlapped = stage1_inputs(dataset_dir, name, items, sequences)
    if with_prompts:
        reqs = make_requests(users, overlapped, read_prefixes(dataset_dir), shot, seed)
    else:
        reqs = [{"user": u, "domain": d, "prompt": None} for u, d, _ in users]
    for r, (_, _, titles) in zip(reqs, users):
        r["titles"] = titles
    return reqs, overlapped


def _opt(config, key, default):
    """``config[key]``, or ``default`` where the key is unset (None) or absent."""
    v = config[key]
    return default if v is None else v


def stage1_backend(config, encoder=None, overlapped=None, title_vectors=None):
    """The backend of LLMCDSR's stage 1 for ``config["generator"]``.

    LLM backends get the stage-1 settings that make them generate as the public code does:
    ``llm_decoding`` (default ``model``: the model's own generation config / the server's
    default temperature), ``llm_prompt_format`` (hf, default ``auto``: Baichuan2's user-role
    token after the prompt when the model defines one, else the chat template),
    ``llm_max_input_tokens`` (hf, default 1999, cut on the right), ``llm_dtype`` (hf, default
    bfloat16) and ``llm_trust_remote_code`` (hf, default False)."""
    from recbole_cdsr.llm.backends import HFBackend, OpenAIBackend
    from recbole_cdsr.llm.retrieval import RetrievalBackend

    gen = config["generator"]
    if gen == "retrieval":
        return RetrievalBackend(encoder, overlapped, config["retrieval_neighbours"], config["llm_max_names"],
                                title_vectors=title_vectors)
    decoding = _opt(config, "llm_decoding", "model")
    seed = _opt(config, "generation_seed", 0)
    if gen == "hf":
        if not config["llm_model_path"]:
            raise ValueError("generator: hf needs llm_model_path (a local transformers model folder)")
        return HFBackend(config["llm_model_path"], device=str(config["device"]), batch_size=config["llm_batch_size"],
                         max_new_tokens=config["llm_max_new_tokens"], seed=seed, decoding=decoding,
                         prompt_format=_opt(config, "llm_prompt_format", "auto"),
                         max_input_tokens=config["llm_max_input_tokens"],
                         dtype=config["llm_dtype"],
                         trust_remote_code=bool(config["llm_trust_remote_code"]))
    if gen == "openai":
        return OpenAIBackend(config["llm_base_url"], config["llm_model"], api_key_env=config["llm_api_key_env"],
                             chat=config["llm_chat"], max_tokens=config["llm_max_new_tokens"],
                             timeout=config["llm_timeout"], max_retries=config["llm_max_retries"],
                             concurrency=config["llm_concurrency"], seed=seed, decoding=decoding)
    raise ValueError(f"generator must be one of retrieval, hf, openai, import; got {gen!r}")
