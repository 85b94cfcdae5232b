"""The text source of a model's LLM stage, from the run's config (one factory for every
stage; the defaults of each key are in the model's YAML file)."""

GENERATORS = ("retrieval", "hf", "openai")


def make_backend(config, generator, encoder=None, overlapped=None, title_vectors=None, adapter_path=None):
    """The backend for ``generator``:

    ``retrieval``  the no-LLM stand-in (needs ``encoder``, ``overlapped`` and ``title_vectors``);
    ``hf``         a local transformers causal LM (``llm_model_path``, ``llm_decoding``,
                   ``llm_prompt_format``, ``llm_max_input_tokens``, ``llm_dtype``,
                   ``llm_trust_remote_code``, ``llm_batch_size``, ``llm_max_new_tokens``,
                   ``llm_num_beams`` for ``llm_decoding: beam``; ``adapter_path``: LoRA adapters);
    ``openai``     an OpenAI-compatible server (``llm_base_url``, ``llm_model``,
                   ``llm_api_key_env``, ``llm_chat``, ``llm_timeout``, ``llm_max_retries``,
                   ``llm_concurrency``, ``llm_decoding``, ``llm_max_new_tokens``).
    Sampling is seeded by ``generation_seed``."""
    from recbole_cdsr.llm.backends import HFBackend, OpenAIBackend
    from recbole_cdsr.llm.retrieval import RetrievalBackend

    if generator == "retrieval":
        return RetrievalBackend(encoder, overlapped, config["retrieval_neighbours"], config["llm_max_names"],
                                title_vectors=title_vectors)
    if generator == "hf":
        if not config["llm_model_path"]:
            raise ValueError("generator hf needs llm_model_path (a local transformers model folder)")
        return HFBackend(config["llm_model_path"], device=str(config["device"]), batch_size=config["llm_batch_size"],
                         max_new_tokens=config["llm_max_new_tokens"], seed=config["generation_seed"],
                         decoding=config["llm_decoding"], prompt_format=config["llm_prompt_format"],
                         max_input_tokens=config["llm_max_input_tokens"], dtype=config["llm_dtype"],
                         trust_remote_code=bool(config["llm_trust_remote_code"]), adapter_path=adapter_path,
                         **({"num_beams": config["llm_num_beams"]} if config["llm_num_beams"] else {}))
    if generator == "openai":
        return OpenAIBackend(config["llm_base_url"], config["llm_model"], api_key_env=config["llm_api_key_env"],
                             chat=config["llm_chat"], max_tokens=config["llm_max_new_tokens"],
                             timeout=config["llm_timeout"], max_retries=config["llm_max_retries"],
                             concurrency=config["llm_concurrency"], seed=config["generation_seed"],
                             decoding=config["llm_decoding"])
    raise ValueError(f"the generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
