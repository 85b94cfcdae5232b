"""Model and trainer lookup: the plugin's models first, then RecBole's sequential models.

RecBole's ``get_model`` only finds classes inside recbole (and probes optional libraries
first); its ``get_trainer`` silently falls back to ``Trainer``. This registry gives one
clear error listing the valid names instead.
"""

import importlib
import inspect

from recbole_cdsr.utils import disable_anomaly_detection

#: Plugin models: name -> "module:Class". Filled as models are added to recbole_cdsr.model.
PLUGIN_MODELS = {
    "LLMCDSR": "recbole_cdsr.model.llmcdsr:LLMCDSR",
    "LeCDSR": "recbole_cdsr.model.lecdsr:LeCDSR",
    "C2DSR": "recbole_cdsr.model.c2dsr:C2DSR",
    "URLLM": "recbole_cdsr.model.urllm:URLLM",
}

#: Trainers of plugin models that need their own: name -> "module:Class".
PLUGIN_TRAINERS = {
    "LLMCDSR": "recbole_cdsr.trainer.llmcdsr:LLMCDSRTrainer",
    "S3Rec": "recbole_cdsr.trainer.s3rec:S3RecCDSRTrainer",
}

#: Stages of plugin models that need them (run before the dataset is loaded): name -> "module:function".
PLUGIN_STAGES = {
    "LLMCDSR": "recbole_cdsr.stages.llmcdsr:prepare",
    "LeCDSR": "recbole_cdsr.stages.lecdsr:prepare",
}

#: Stages that run after a plugin model has trained (before the test split is ranked):
#: name -> "module:function(config, trainer, train_data, valid_data, test_data) -> record".
PLUGIN_AFTER_TRAINING = {
    "URLLM": "recbole_cdsr.stages.urllm:after_training",
}

#: RecBole sequential models that cannot be scored under the protocol, with the reason.
UNSUPPORTED_RECBOLE_MODELS = {
    "SASRecCPR": "its predict is not implemented in RecBole 1.2.1 (assert False)",
    "GRU4RecCPR": "its predict is not implemented in RecBole 1.2.1 (assert False)",
    "DIN": "a click-through-rate model: no full_sort_predict, the protocol scores each "
    "history once against all items",
    "DIEN": "a click-through-rate model: no full_sort_predict, the protocol scores each "
    "history once against all items",
    "KSR": "needs a knowledge graph with pre-trained entity and relation embeddings, "
    "which the cross-domain releases do not have",
    "GRU4RecKG": "needs pre-trained knowledge-graph entity embeddings, which the "
    "cross-domain releases do not have",
}


def _load(spec):
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def recbole_sequential_models():
    """Names of RecBole's sequential model classes (imports RecBole's model package)."""
    from recbole.model.abstract_recommender import AbstractRecommender

    mod = importlib.import_module("recbole.model.sequential_recommender")
    disable_anomaly_detection()
    return sorted(
        n
        for n, c in vars(mod).items()
        if inspect.isclass(c) and issubclass(c, AbstractRecommender) and c is not AbstractRecommender
    )


def model_names():
    return sorted(PLUGIN_MODELS) + [m for m in recbole_sequential_models() if m not in PLUGIN_MODELS]


def get_model(name):
    """Return the model class called ``name`` (plugin first, then RecBole's sequential models)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a model name (str), got {name!r}")
    if name in PLUGIN_MODELS:
        return _load(PLUGIN_MODELS[name])
    seq = recbole_sequential_models()
    if name in seq:
        if name in UNSUPPORTED_RECBOLE_MODELS:
            raise ValueError(
                f"model {name} cannot be evaluated: {UNSUPPORTED_RECBOLE_MODELS[name]}"
            )
        mod = importlib.import_module("recbole.model.sequential_recommender")
        disable_anomaly_detection()
        return getattr(mod, name)
    valid = [m for m in model_names() if m not in UNSUPPORTED_RECBOLE_MODELS]
    close = [m for m in valid if m.lower() == name.lower()]
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} recbole-cdsr runs its own models and RecBole's "
        f"sequential models; valid names: {', '.join(valid)}"
    )


def get_trainer(model_name):
    """Trainer class for ``model_name``: the model's own trainer, else ``CDSRTrainer``."""
    if model_name in PLUGIN_TRAINERS:
        return _load(PLUGIN_TRAINERS[model_name])
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    return CDSRTrainer


def get_stages(model_name):
    """``prepare(config) -> (config updates, record)`` of ``model_name``'s stages, or None."""
    spec = PLUGIN_STAGES.get(model_name)
    return _load(spec) if spec else None


def get_after_training(model_name):
    """The stage ``model_name`` runs after training (before the test split), or None."""
    spec = PLUGIN_AFTER_TRAINING.get(model_name)
    return _load(spec) if spec else None
