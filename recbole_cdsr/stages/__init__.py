"""The stages a model runs before it trains (LLM generation, text vectors, pre-training),
one module per model: :mod:`recbole_cdsr.stages.llmcdsr`, :mod:`recbole_cdsr.stages.lecdsr`.
Each has ``prepare(config) -> (config updates, record)``; the registry names a model's
stages (:func:`recbole_cdsr.registry.get_stages`) as it names its trainer, and
``run_recbole_cdsr`` runs them before the dataset is loaded. Their outputs are cached
artefacts next to the dataset, named by the config keys they return.
"""
