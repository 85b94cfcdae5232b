"""LLM backends: an OpenAI-compatible HTTP server, or a local transformers causal LM.

Both take a list of prompts and return one :class:`Completion` per prompt, in order. A
prompt is a string (the user message) or a dict ``{"system": ..., "user": ...}``. A
prompt that fails (server error, garbage answer, time-out, after the retries) comes back
with ``error`` set and ``text`` None: callers record it; nothing raises mid-batch and no
prompt is silently dropped.

``OpenAIBackend``
    ``POST {base_url}/chat/completions`` (or ``/completions`` with ``chat: False``) with the
    standard JSON body; works with vLLM, llama.cpp's server, Ollama and hosted APIs. The API
    key is read from an environment variable (``api_key_env``), never from config files.
    Time-out per request, retries with exponential backoff on time-outs, connection errors,
    HTTP 429/5xx and unparseable answers; bounded concurrency (a thread pool).
``HFBackend``
    ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder; batched generation
    with left padding (see the class for the prompt format and input truncation).

Decoding (``decoding``): ``greedy`` (the default of both classes: deterministic, what the
LeCDSR profiles use) or ``model``: the model's own settings, as the public LLMCDSR code
generates (``model.generate`` with the checkpoint's ``generation_config.json``; for
Baichuan2-Chat that samples). For ``OpenAIBackend``, ``model`` sends no temperature, so the
server's default (or the served model's own generation config) applies. Sampling is seeded
(``seed``): the HF backend seeds torch per batch from the seed and the batch's prompts; the
OpenAI backend sends ``seed`` in the request (servers that honour it are reproducible).

The public code feeds Baichuan2-Chat the raw prompt followed by that model's user-role token
(``generation_config.user_token_id``), with no chat template. ``HFBackend`` does the same
with ``prompt_format: user_token`` (``auto`` picks it for models that define that token) and
otherwise wraps the prompt as one user turn of the tokenizer's chat template. An OpenAI
server always applies its own chat template on ``/chat/completions`` (the prompt is one user
message); ``/completions`` (``chat: False``) sends the raw prompt with no role token, and no
input truncation is possible there (no tokenizer: a server rejects an over-long prompt, and
the user is recorded as failed).
"""

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class BackendError(ValueError):
    """A backend that cannot be set up (bad path, bad URL, missing key...)."""


DECODINGS = ("greedy", "model")
HF_DECODINGS = DECODINGS + ("beam",)  # beam search: a local model only (a server gives no beams)


def check_decoding(decoding, allowed=DECODINGS):
    if decoding not in allowed:
        raise BackendError(f"llm_decoding must be one of {', '.join(allowed)}, got {decoding!r}")
    return decoding


def split_prompt(prompt):
    """``(system or None, user)`` of a prompt given as a string or a dict."""
    if isinstance(prompt, dict):
        user = prompt.get("user")
        if not isinstance(user, str):
            raise BackendError(f"a prompt dict needs a 'user' string, got {prompt!r:.120}")
        return prompt.get("system"), user
    return None, prompt


def flat_prompt(prompt):
    """One text for models without chat roles: the system text, a blank line, the user text."""
    system, user = split_prompt(prompt)
    return f"{system.rstrip()}\n\n{user}" if system else user


@dataclass
class Completion:
    text: object  # str, or None when the prompt failed
    error: object = None  # str describing the last failure
    attempts: int = 1
    names: object = None  # item names given directly by a non-LLM backend (the retrieval stand-in)
    extracted: object = None  # the answer of the extraction call (llm_parser llm), set by GenerationJob

    @property
    def ok(self):
        return self.error is None


class OpenAIBackend:
    def __init__(
        self,
        base_url,
        model,
        api_key_env="OPENAI_API_KEY",
        chat=True,
        max_tokens=500,
        temperature=0.0,
        timeout=60.0,
        max_retries=3,
        backoff=1.0,
        concurrency=4,
        seed=None,
        decoding="greedy",
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise BackendError(f"llm_base_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise BackendError("llm_model must name the served model")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.chat = bool(chat)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = max(1, int(concurrency))
        self.seed = seed
        self.decoding = check_decoding(decoding)

    def identity(self):
        ident = {"backend": "openai", "base_url": self.base_url, "model": self.model, "chat": self.chat,
                 "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.decoding == "model":  # (greedy keeps the identity it always had)
            ident.update(decoding="model", temperature=None, seed=self.seed)
        return ident

    def request_body(self, prompt):
        """The JSON body sent for ``prompt`` (``temperature`` only when decoding is greedy)."""
        body = {"model": self.model, "max_tokens": self.max_tokens}
        if self.decoding == "greedy":
            body["temperature"] = self.temperature
        if self.seed is not None:
            body["seed"] = self.seed
        if self.chat:
            system, user = split_prompt(prompt)
            body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
        else:
            body["prompt"] = flat_prompt(prompt)
        return body

    def _request(self, prompt):
        path = "/chat/completions" if self.chat else "/completions"
        body = self.request_body(prompt)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            raw = r.read()
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Garbage(f"unparseable answer: {raw[:120]!r}") from None
        if not isinstance(text, str):
            raise _Garbage(f"answer content is not text: {text!r:.120}")
        return text

    def _one(self, prompt):
        last = None
        for attempt in range(1, self.max_retries + 2):
            try:
                return Completion(self._request(prompt), None, attempt)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.base_url}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    return Completion(None, last, attempt)  # a client error does not heal
            except _Garbage as e:
                last = str(e)
            except (TimeoutError, OSError) as e:  # time-outs, refused/reset connections
                last = f"{type(e).__name__}: {e}"
            if attempt <= self.max_retries:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
        return Completion(None, last, self.max_retries + 1)

    def generate(self, prompts):
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, prompts))


class _Garbage(Exception):
    pass


PROMPT_FORMATS = ("template", "raw", "user_token", "auto")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class HFBackend:
    """A local causal LM.

    Prompt format (``prompt_format``):

    ``template``    one user turn (after a system turn, if the prompt has one) through the
                    tokenizer's chat template, with the assistant's generation prompt; the
                    plain text when the tokenizer has no template (the default of this class);
    ``raw``         the plain text (a system text first, then a blank line);
    ``user_token``  the plain text followed by the token id ``generation_config.user_token_id``:
                    what the public LLMCDSR code feeds Baichuan2-Chat (it appends that model's
                    user-role token after the prompt; the model then answers);
    ``auto``        ``user_token`` when the model's generation config defines a
                    ``user_token_id`` (Baichuan2), else ``template``.

    Input truncation (``max_input_tokens``): the prompt text is cut to its first N tokens, on
    the right, as the public code does (``max_length=1999``; a long prompt loses the end of
    the user's own titles); a role token or chat template is added after the cut. None: no cut.

    ``dtype``: ``auto`` (the checkpoint's), ``bfloat16`` (what the public code loads),
    ``float16``, ``float32``; None leaves it to transformers. ``trust_remote_code``: run the
    model folder's own Python code (needed by Baichuan2; off unless asked for).
    """

    def __init__(self, model_path, device="cpu", batch_size=8, max_new_tokens=500, seed=0, decoding="greedy",
                 prompt_format="template", max_input_tokens=None, dtype=None, trust_remote_code=False,
                 adapter_path=None, num_beams=4):
        if not os.path.isdir(model_path):
            raise BackendError(
                f"llm_model_path {model_path!r} is not a folder with a transformers model "
                "(this project loads models from local paths only)"
            )
        self.decoding = check_decoding(decoding, HF_DECODINGS)
        if prompt_format not in PROMPT_FORMATS:
            raise BackendError(f"llm_prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"llm_dtype must be one of {', '.join(DTYPES)} (or ~), got {dtype!r}")
        if max_input_tokens is not None and int(max_input_tokens) < 1:
            raise BackendError(
                f"llm_max_input_tokens must be a positive number of tokens or ~, got {max_input_tokens!r}"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            remote = {"trust_remote_code": True} if trust_remote_code else {}
            load = dict(remote)
            if dtype is not None:
                load["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, **remote)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, **load).to(device)
        except Exception as e:
            raise BackendError(f"cannot load a causal LM from {model_path}: {type(e).__name__}: {e}") from None
        self.adapter_path = adapter_path
        if adapter_path is not None:
            try:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, adapter_path).to(device)
            except Exception as e:
                raise BackendError(f"cannot load LoRA adapters from {adapter_path}: {type(e).__name__}: {e}") from None
        self.num_beams = int(num_beams)
        self.torch = torch
        self.model.eval()
        self.model_path = model_path
        self.device = device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.max_input_tokens = None if max_input_tokens is None else int(max_input_tokens)
        self.dtype = dtype
        self.trust_remote_code = bool(trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.user_token_id = getattr(self.model.generation_config, "user_token_id", None)
        if prompt_format == "auto":
            prompt_format = "user_token" if self.user_token_id is not None else "template"
        if prompt_format == "user_token" and self.user_token_id is None:
            raise BackendError(
                f"llm_prompt_format user_token: the generation config of {model_path} has no user_token_id "
                "(only models such as Baichuan2 define one); use template or raw"
            )
        if prompt_format == "template" and not has_template:
            prompt_format = "raw"
        self.prompt_format = prompt_format
        self.use_chat = prompt_format == "template"

    def identity(self):
        gc = self.model.generation_config
        ident = {"backend": "hf", "model_path": os.path.abspath(self.model_path),
                 "max_new_tokens": self.max_new_tokens,
                 "do_sample": bool(gc.do_sample) if self.decoding == "model" else False,
                 "chat_template": self.use_chat}
        # settings added later appear only when they differ from what this backend always did,
        # so that earlier results keep their identity
        if self.decoding == "model":
            conf = {k: v for k, v in gc.to_diff_dict().items() if k != "transformers_version"}
            ident.update(decoding="model", generation_config=conf, seed=self.seed)
        if self.prompt_format == "user_token":
            ident.update(prompt_format="user_token", user_token_id=int(self.user_token_id))
        if self.max_input_tokens is not None:
            ident["max_input_tokens"] = self.max_input_tokens
        if self.dtype is not None:
            ident["dtype"] = self.dtype
        if self.decoding == "beam":
            ident.update(decoding="beam", num_beams=self.num_beams)
        if self.adapter_path is not None:
            from recbole_cdsr.cache import sha256_path

            ident["adapters_sha256"] = sha256_path(self.adapter_path)
        return ident

    def _cut(self, text):
        """``text`` cut to its first ``max_input_tokens`` tokens (unchanged when shorter)."""
        if self.max_input_tokens is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_input_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_input_tokens])

    def _format(self, prompt):
        system, user = split_prompt(prompt)
        user = self._cut(user)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template without a system role: one user message
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": flat_prompt({"system": system, "user": user})}],
                tokenize=False, add_generation_prompt=True,
            )

    def encode(self, prompts):
        """Left-padded ``input_ids`` and ``attention_mask`` of ``prompts`` as the model sees them."""
        torch = self.torch
        if self.use_chat:
            enc = self.tokenizer([self._format(p) for p in prompts], return_tensors="pt", padding=True)
        else:
            cut = {"truncation": True, "max_length": self.max_input_tokens} if self.max_input_tokens else {}
            enc = self.tokenizer([flat_prompt(p) for p in prompts], return_tensors="pt", padding=True, **cut)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if self.prompt_format == "user_token":
            ids = torch.cat([ids, torch.full((len(ids), 1), int(self.user_token_id), dtype=ids.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], dim=1)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _generate_kwargs(self):
        kw = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
              "remove_invalid_values": True}
        if self.decoding == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif self.decoding == "beam":
            kw.update(do_sample=False, num_beams=self.num_beams)
        return kw  # decoding "model": everything else from model.generation_config

    def _batch_seed(self, chunk):
        """Seed of one batch: from ``seed`` and the batch's prompts, not from its position."""
        h = hashlib.sha256(json.dumps([self.seed, chunk], sort_keys=True, default=str).encode())
        return int.from_bytes(h.digest()[:8], "big") % (2**63)

    def generate(self, prompts):
        out = []
        torch = self.torch
        dev = torch.device(self.device)
        rng_devices = [dev.index or 0] if dev.type == "cuda" else []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            try:
                enc = self.encode(chunk)
                with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                    torch.manual_seed(self._batch_seed(chunk))
                    gen = self.model.generate(**enc, **self._generate_kwargs())
                new = gen[:, enc["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                out.extend(Completion(t) for t in texts)
            except Exception as e:  # a failing batch is recorded, not fatal
                out.extend(Completion(None, f"{type(e).__name__}: {e}") for _ in chunk)
        return out
