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
- the plugin's keys (and a few of RecBole's) are type- and range-checked with one clear
  message; a key that no part of RecBole or the plugin reads gets a warning naming the
  nearest known key;
- no string is ever evaluated as Python. RecBole runs string values as Python code (of the command
  line, of a config dict, of a checkpoint's stored config); here they are read as Python
  literals (numbers, booleans, None, lists, tuples, dicts, quoted strings) or kept as the
  string, and YAML files are read with a safe loader.
"""

import ast
import difflib
import functools
import logging
import os
import re
from enum import Enum

import yaml
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
    "train_min_items_per_domain": (_INT, None),
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
    "resumable": (_BOOL, None),
    "dynamic_padding": (_STR + _BOOL, ("auto", "on", "off", True, False)),
    "length_group_batches": (_INT, None),
    "fused_loss": (_BOOL, None),
    "show_config": (_BOOL, None),
    "adam_betas": (_LIST + _NONE, None),
    # C2DSR
    "c2dsr_gnn_layers": (_INT, None),
    "c2dsr_lambda": (_NUM, None),
    "c2dsr_loss_positions": (_INT, None),
    "c2dsr_resample_corruption": (_BOOL, None),
    "urllm_attr_size": (_INT, None),
    "urllm_gamma": (_NUM, None),
    "urllm_noise": (_NUM, None),
    "urllm_generator": (_STR + _NONE, ("hf", "openai", None)),
    "urllm_finetune": (_BOOL, None),
    "urllm_domain_words": (_NONE + (dict,), None),
    "urllm_lora_r": (_INT, None),
    "urllm_lora_alpha": (_NUM, None),
    "urllm_lora_dropout": (_NUM, None),
    "urllm_lora_target_modules": (_LIST, None),
    "urllm_lora_lr": (_NUM, None),
    "urllm_lora_epochs": (_INT, None),
    "urllm_lora_batch_size": (_INT, None),
    "urllm_lora_warmup_steps": (_INT, None),
    "urllm_lora_cutoff_len": (_INT, None),
    "llm_num_beams": (_INT + _NONE, None),
    "show_progress": (_BOOL, None),
    # LLMCDSR
    "llmcdsr_mode": (_STR, ("full", "backbone_only", "random_recall", "no_meta")),
    "backbone": (_STR, ("public", "recbole")),
    "length_buckets": (_INT, None),
    "bucket_overhead": (_INT, None),
    "meta_inner_optimizer": (_STR, ("adam", "adam_fresh", "sgd")),
    "generator": (_STR, ("retrieval", "hf", "openai", "import")),
    "llm_parser": (_STR, ("auto", "llm", "regex", "given")),
    "name_pattern": (_STR, ("lines", "public")),
    "pseudo_max_names": (_INT + _NONE, None),
    "pretrain_seed": (_INT + _NONE, None),
    # LLM backends
    "llm_decoding": (_STR, ("model", "greedy", "beam")),
    "llm_prompt_format": (_STR, ("auto", "user_token", "template", "raw")),
    "llm_dtype": (_STR + _NONE, ("bfloat16", "float16", "float32", "auto", None)),
    "llm_max_input_tokens": (_INT + _NONE, None),
    "llm_trust_remote_code": (_BOOL, None),
    # LeCDSR
    "lecdsr_init": (_STR, ("xavier", "normal")),
    "lecdsr_user_vector": (_STR, ("id", "zero")),
    "lecdsr_row_bucket": (_INT, None),
    "profile_generator": (_STR, ("titles", "hf", "openai")),
}

#: key -> (low, low_open, high, high_open): numeric bounds (None: unbounded on that side).
#: A key listed here must hold a number (or None where CONFIG_SCHEMA allows it).
RANGES = {
    # training and evaluation
    "epochs": (1, False, None, False),
    "train_batch_size": (1, False, None, False),
    "eval_batch_size": (1, False, None, False),
    "steps_per_epoch": (1, False, None, False),
    "max_train_steps": (1, False, None, False),
    "train_time_budget": (0, True, None, False),
    "num_threads": (1, False, None, False),
    "eval_neg_num": (1, False, None, False),
    "MAX_ITEM_LIST_LENGTH": (1, False, None, False),
    "train_min_history": (1, False, None, False),
    "train_min_items_per_domain": (0, False, None, False),
    "stopping_step": (1, False, None, False),
    "length_group_batches": (1, False, None, False),
    "eval_step": (0, False, None, False),  # 0: no validation while training (as RecBole)
    "learning_rate": (0, True, None, False),
    "weight_decay": (0, False, None, False),
    # common model keys
    "hidden_size": (1, False, None, False),
    "embedding_size": (1, False, None, False),
    "inner_size": (1, False, None, False),
    "n_layers": (1, False, None, False),
    "n_heads": (1, False, None, False),
    "hidden_dropout_prob": (0, False, 1, True),
    "attn_dropout_prob": (0, False, 1, True),
    "dropout_prob": (0, False, 1, True),
    # C2DSR
    "c2dsr_gnn_layers": (0, False, None, False),
    "c2dsr_lambda": (0, False, 1, False),
    "c2dsr_loss_positions": (1, False, None, False),
    "urllm_attr_size": (1, False, None, False),
    "urllm_gamma": (0, False, 1, False),
    "urllm_noise": (0, False, None, False),
    "urllm_lora_r": (1, False, None, False),
    "urllm_lora_dropout": (0, False, 1, True),
    "urllm_lora_lr": (0, True, None, False),
    "urllm_lora_epochs": (1, False, None, False),
    "urllm_lora_batch_size": (1, False, None, False),
    "urllm_lora_warmup_steps": (0, False, None, False),
    "urllm_lora_cutoff_len": (2, False, None, False),
    "llm_num_beams": (1, False, None, False),
    # LLMCDSR
    "length_buckets": (1, False, None, False),
    "bucket_overhead": (0, False, None, False),
    "pretrain_learning_rate": (0, True, None, False),
    "pseudo_max_names": (0, False, None, False),  # 0 or None: every name
    "neg_resample_rounds": (0, False, None, False),
    "recall_k": (1, False, None, False),
    "aug_batch_size": (1, False, None, False),
    "meta_batch_size": (1, False, None, False),
    "meta_interval": (1, False, None, False),
    "meta_inner_lr": (0, True, None, False),
    "meta_lr": (0, True, None, False),
    "shot": (1, False, None, False),
    "llm_max_names": (1, False, None, False),
    "retrieval_neighbours": (1, False, None, False),
    "pretrain_epochs": (1, False, None, False),
    "pretrain_patience": (1, False, None, False),
    "pretrain_batch_size": (1, False, None, False),
    "infonce_weight": (0, False, None, False),
    "infonce_tau": (0, True, None, False),
    # LLM backends
    "llm_timeout": (0, True, None, False),
    "llm_max_retries": (0, False, None, False),
    "llm_concurrency": (1, False, None, False),
    "llm_max_new_tokens": (1, False, None, False),
    "llm_batch_size": (1, False, None, False),
    "llm_max_input_tokens": (1, False, None, False),
    # LeCDSR
    "lecdsr_row_bucket": (1, False, None, False),
    "adapter_inner_size": (1, False, None, False),
    "tau": (0, True, None, False),
    "tau2": (0, True, None, False),
    "align_weight": (0, False, None, False),
    "n_neg": (1, False, None, False),
    "profile_max_chars": (1, False, None, False),
}

SUPPORTED_METRICS = ("hit", "ndcg", "mrr")
PROTOCOLS = ("sampled", "full")
#: key -> (what the items are, their allowed values): a non-empty list of them, or one as a string
LIST_VALUES = {"eval_protocol": ("protocols", PROTOCOLS)}


class ConfigError(ValueError):
    """A configuration value of the wrong type or outside its allowed values."""


logger = logging.getLogger(__name__)

#: what a literal may become (as RecBole's own conversion); anything else stays the string
_LITERAL_TYPES = (str, int, float, list, tuple, dict, bool, Enum)


def literal_value(text):
    """A configuration string as a value, never evaluated as code.

    Python literals (``5``, ``1e-3``, ``[0.9, 0.98]``, ``{'A': 'a.npz'}``, ``None``,
    ``'quoted'``) become their value, ``true``/``false`` (any case) booleans, ``~`` and
    ``null`` None; anything else, ``__import__('os')`` included, stays the string it was.
    """
    if not isinstance(text, str):
        return text
    s = text.strip()
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        low = s.lower()
        if low == "true":
            return True
        if low == "false":
            return False
        if low in ("~", "null"):
            return None
        return text
    if value is not None and not isinstance(value, _LITERAL_TYPES):
        return text
    return value


class SafeYamlLoader(yaml.SafeLoader):
    """YAML's safe loader (no Python tags) that also reads ``1e-3`` as a float, as RecBole's does."""


SafeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _describe_range(rng):
    lo, lo_open, hi, hi_open = rng
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_value(key, value):
    """What is wrong with ``key: value`` ("must be >= 1, got -1"), or None when it is fine."""
    rule = CONFIG_SCHEMA.get(key)
    if rule is not None:
        types, allowed = rule
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = "/".join("None" if t is type(None) else t.__name__ for t in types)
            return f"must be {names}, got {value!r} ({type(value).__name__})"
        if allowed is not None and value not in allowed:
            return f"must be one of {', '.join(str(a) for a in allowed)}, got {value!r}"
    if key in LIST_VALUES:
        what, items = LIST_VALUES[key]
        listed = [value] if isinstance(value, str) else list(value)
        if not listed or any(v not in items for v in listed):
            return f"must list {what} from {', '.join(items)}, got {value!r}"
    rng = RANGES.get(key)
    if rng is None or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number {_describe_range(rng)}, got {value!r}"
    lo, lo_open, hi, hi_open = rng
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad or value != value:  # NaN is never in range
        return f"must be {_describe_range(rng)}, got {value!r}"
    return None


_KEY_IN_CODE = re.compile(
    r"""(?:config|cfg|conf|final_config_dict|parameters)\w*\s*(?:\[\s*|\.get\(\s*)["']([A-Za-z_][A-Za-z0-9_]*)["']"""
    r"""|["']([A-Za-z_][A-Za-z0-9_]*)["']\s+(?:not\s+)?in\s+(?:self\.)?(?:config|cfg|conf)\b"""
)
#: files under a properties folder whose top-level keys are not config keys
_NOT_CONFIG_FILES = ("url.yaml", "kg_url.yaml")


@functools.lru_cache(maxsize=None)
def known_config_keys():
    """Every key that RecBole or the plugin defines in a properties file or reads in code."""
    import recbole

    import recbole_cdsr

    keys = set(CONFIG_SCHEMA) | set(RANGES)
    roots = [os.path.dirname(recbole.__file__), os.path.dirname(recbole_cdsr.__file__)]
    props = [os.path.join(roots[0], "properties"), properties_dir()]
    for root in props:
        for folder, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".yaml") or name in _NOT_CONFIG_FILES:
                    continue
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        loaded = yaml.load(f, Loader=SafeYamlLoader)
                except (OSError, yaml.YAMLError):
                    continue
                if isinstance(loaded, dict):
                    keys.update(str(k) for k in loaded)
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(folder, name), encoding="utf-8") as f:
                            text = f.read()
                    except (OSError, UnicodeDecodeError):
                        continue
                    for a, b in _KEY_IN_CODE.findall(text):
                        keys.add(a or b)
    return frozenset(keys)


def unknown_key_message(key):
    """A warning for a key nothing reads (None for a known key)."""
    known = known_config_keys()
    if key in known:
        return None
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?" if near else "check its spelling"
    return f"config key {key!r} is read by no part of RecBole or recbole-cdsr, so it changes nothing: {hint}"


def warn_unknown_keys(keys, where=""):
    """Log one WARNING per unknown key; return the messages."""
    out = []
    for key in keys:
        msg = unknown_key_message(key)
        if msg:
            out.append(msg)
            logger.warning("%s%s", f"{where}: " if where else "", msg)
    return out


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
        # RecBole keeps use_gpu: True on a machine without CUDA (and runs on the CPU): say what is used
        self.final_config_dict["use_gpu"] = getattr(self.final_config_dict["device"], "type", "cpu") == "cuda"

    def summary(self):
        """The run in a few lines: model, dataset, device, seed and every key whose value
        differs from the defaults (RecBole's and the plugin's YAML files); ``show_config:
        True`` (``--show_config=True``) prints the whole config instead."""
        d, inner = self.final_config_dict, self.internal_config_dict
        changed = {k: d.get(k) for k in sorted(self.external_config_dict)
                   if k not in ("model", "dataset") and (k not in inner or inner[k] != d.get(k))}
        lines = [f"model {d['model']}, dataset {d['dataset']}, device {d['device']}, seed {d['seed']}",
                 "settings that differ from the defaults" + (":" if changed else ": none")]
        lines += [f"  {k} = {v!r}" for k, v in changed.items()]
        lines.append("(--show_config=True prints the whole config)")
        return "\n".join(lines)

    # -- RecBole hooks ---------------------------------------------------------------
    def _build_yaml_loader(self):
        return SafeYamlLoader

    def _load_config_files(self, file_list):
        out = {}
        for file in file_list or []:
            try:
                with open(file, "r", encoding="utf-8") as f:
                    loaded = yaml.load(f.read(), Loader=SafeYamlLoader)
            except yaml.YAMLError as e:
                raise ConfigError(f"{file}: not valid YAML for a config file ({e})") from None
            if loaded is None:
                continue
            if not isinstance(loaded, dict):
                raise ConfigError(f"{file}: a config file must be a mapping of keys, got {type(loaded).__name__}")
            out.update(loaded)
        return out

    def _convert_config_dict(self, config_dict):
        # RecBole's version runs every string value as Python code; values are data here
        for key in list(config_dict):
            config_dict[key] = literal_value(config_dict[key])
        return config_dict

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
        for key in list(CONFIG_SCHEMA) + [k for k in RANGES if k not in CONFIG_SCHEMA]:
            if key in d:
                msg = check_value(key, d[key])
                if msg:
                    raise ConfigError(f"config key {key!r} {msg}")
        inner = self.internal_config_dict
        self.unknown_keys = warn_unknown_keys(sorted(k for k in self.external_config_dict if k not in inner))
        protos = d["eval_protocol"]  # checked above (check_value), always set (overall.yaml)
        d["eval_protocol"] = [protos] if isinstance(protos, str) else list(protos)
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
