"""CDSRConfig: RecBole's Config plus the plugin's properties files and checks.

Priority, lowest to highest (as in RecBole, with the plugin's files placed right above
RecBole's own internal files):
RecBole internal (overall, model, dataset, quick-start type files)
< plugin ``properties/overall.yaml`` < ``properties/model/<Model>.yaml``
< ``properties/dataset/<dataset>.yaml`` < config files < config dict < command line.

Differences from RecBole's Config, each deliberate:
- the model class is looked up in the plugin's registry (plugin first, then RecBole's);
- ``sys.argv`` is never parsed implicitly (pytest's or a notebook's arguments would leak
  in): the command line arrives as ``cmd_args`` (``run_recbole_cdsr.py`` passes it);
- with ``loss_type: CE`` and no explicit ``train_neg_sample_args``, negative sampling is
  turned off (RecBole requires it to be None for CE);
- the plugin's keys (and a few of RecBole's) are type-checked with one clear message.
"""

import os

from recbole.config import Config

from recbole_cdsr import registry
from recbole_cdsr.utils import properties_dir

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list, tuple)
_BOOL = (bool,)
_NONE = (type(None),)

#: key -> (accepted types, allowed values or None)
CONFIG_SCHEMA = {
    "train_view": (_STR, ("auto", "prefix", "sequence")),
    "train_neg_domain": (_STR, ("same", "any")),
    "train_min_history": (_INT, None),
    "steps_per_epoch": (_INT + _NONE, None),
    "train_time_budget": (_NUM + _NONE, None),
    "max_train_steps": (_INT + _NONE, None),
    "num_threads": (_INT + _NONE, None),
    "raw_path": (_STR + _NONE, None),
    "eval_protocol": (_LIST + _STR, None),
    "eval_neg_num": (_INT, None),
    "eval_candidate_seed": (_INT, None),
    "eval_exclude_history": (_BOOL, None),
    "model_selection": (_STR, ("per_domain", "joint")),
    "metrics": (_LIST + _STR, None),
    "topk": (_LIST + _INT, None),
    "valid_metric": (_STR, None),
    "results_dir": (_STR, None),
    "DOMAIN_FIELD": (_STR, None),
    "MAX_ITEM_LIST_LENGTH": (_INT, None),
    "epochs": (_INT, None),
    "train_batch_size": (_INT, None),
    "eval_batch_size": (_INT, None),
    "learning_rate": (_NUM, None),
    "stopping_step": (_INT, None),
    "freeze_stopped_domains": (_BOOL, None),
    "eval_step": (_INT, None),
    "seed": (_INT, None),
    "use_gpu": (_BOOL, None),
    "cpu_allocator_tuning": (_BOOL, None),
    "fast_layers": (_BOOL, None),
}

SUPPORTED_METRICS = ("hit", "ndcg", "mrr")
PROTOCOLS = ("sampled", "full")


class ConfigError(ValueError):
    """A configuration value of the wrong type or outside its allowed values."""


class CDSRConfig(Config):
    def __init__(
        self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None
    ):
        """
        Args:
            model (str or class): model name (plugin or RecBole sequential) or class.
            dataset (str): dataset name.
            config_file_list (list of str): YAML files.
            config_dict (dict): parameters.
            cmd_args (dict or list of str): command-line parameters, highest priority
                (``{"epochs": "5"}`` or ``["--epochs=5"]``); never read from ``sys.argv``.
        """
        if config_file_list:
            for f in config_file_list:
                if not os.path.isfile(f):
                    raise ConfigError(f"config file {f} does not exist")
        self._cdsr_cmd_args = _parse_cmd_args(cmd_args)
        super().__init__(model, dataset, config_file_list, config_dict)
        self._check_cdsr()

    # -- RecBole hooks ---------------------------------------------------------------
    def _load_cmd_line(self):
        return self._convert_config_dict(dict(self._cdsr_cmd_args))

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError(
                    "no model given: pass --model=NAME (or model: in a config file)"
                )
        if isinstance(model, str):
            model_class = registry.get_model(model)
            model_name = model
        else:
            model_class, model_name = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise ConfigError(
                    "no dataset given: pass --dataset=NAME (or dataset: in a config file)"
                )
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        for path, is_dataset in (
            (os.path.join(props, "overall.yaml"), False),
            (os.path.join(props, "model", f"{model}.yaml"), False),
            (os.path.join(props, "dataset", f"{dataset}.yaml"), True),
        ):
            if os.path.isfile(path):
                loaded = self._update_internal_config_dict(path)
                if is_dataset:
                    self.parameters["Dataset"] += [
                        k for k in loaded if k not in self.parameters["Dataset"]
                    ]

    def _get_final_config_dict(self):
        d = super()._get_final_config_dict()
        explicit = "train_neg_sample_args" in self.external_config_dict
        if d.get("loss_type") == "CE":
            args = d.get("train_neg_sample_args")
            if not explicit:
                d["train_neg_sample_args"] = None
            elif isinstance(args, dict) and args.get("distribution") not in (None, "none", "None"):
                raise ConfigError(
                    "loss_type CE scores all items and takes no sampled negatives: "
                    "set train_neg_sample_args: ~ (or choose loss_type: BPR)"
                )
        metrics = d.get("metrics")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
        bad = [m for m in metrics if str(m).lower() not in SUPPORTED_METRICS]
        if bad or not metrics:
            raise ConfigError(
                f"metrics {bad or metrics} are not computed by the CDSR protocol; "
                "supported: Hit, NDCG, MRR"
            )
        return d

    # -- checks ----------------------------------------------------------------------
    def _check_cdsr(self):
        d = self.final_config_dict
        for key, (types, allowed) in CONFIG_SCHEMA.items():
            if key not in d:
                continue
            v = d[key]
            ok = isinstance(v, types) and not (
                isinstance(v, bool) and bool not in types and v is not None
            )
            if not ok:
                names = "/".join("None" if t is type(None) else t.__name__ for t in types)
                raise ConfigError(
                    f"config key {key!r} must be {names}, got {v!r} ({type(v).__name__})"
                )
            if allowed is not None and v not in allowed:
                raise ConfigError(
                    f"config key {key!r} must be one of {', '.join(allowed)}, got {v!r}"
                )
        protos = d.get("eval_protocol")
        protos = [protos] if isinstance(protos, str) else list(protos or [])
        if not protos or any(p not in PROTOCOLS for p in protos):
            raise ConfigError(
                f"config key 'eval_protocol' must list protocols from {', '.join(PROTOCOLS)}, "
                f"got {d.get('eval_protocol')!r}"
            )
        d["eval_protocol"] = protos
        metrics = d.get("metrics")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        bad = [m for m in metrics if str(m).lower() not in SUPPORTED_METRICS]
        if bad:
            raise ConfigError(
                f"metrics {bad} are not computed by the CDSR protocol; supported: Hit, NDCG, MRR"
            )
        d["metrics"] = metrics
        topk = d.get("topk")
        topk = [topk] if isinstance(topk, int) else list(topk)
        if not topk or any(not isinstance(k, int) or k < 1 for k in topk):
            raise ConfigError(f"config key 'topk' must be positive integers, got {d.get('topk')!r}")
        d["topk"] = topk
        for key in ("train_time_budget", "max_train_steps", "num_threads", "steps_per_epoch"):
            if d.get(key) is not None and d[key] <= 0:
                raise ConfigError(f"config key {key!r} must be positive (or ~ for none), got {d[key]!r}")
        if d.get("eval_neg_num", 1) < 1:
            raise ConfigError("config key 'eval_neg_num' must be >= 1")


def _parse_cmd_args(cmd_args):
    if cmd_args is None:
        return {}
    if isinstance(cmd_args, dict):
        return {str(k): str(v) if not isinstance(v, str) else v for k, v in cmd_args.items()}
    out = {}
    for arg in cmd_args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"command-line argument {arg!r} must look like --key=value")
        k, v = arg[2:].split("=", 1)
        if k in out and out[k] != v:
            raise ConfigError(f"command-line key {k!r} given twice with different values")
        out[k] = v
    return out
