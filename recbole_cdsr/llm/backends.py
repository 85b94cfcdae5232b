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
    with left padding; the tokenizer's chat template when it has one; greedy by default.
"""

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class BackendError(ValueError):
    """A backend that cannot be set up (bad path, bad URL, missing key...)."""


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

    def identity(self):
        return {"backend": "openai", "base_url": self.base_url, "model": self.model, "chat": self.chat,
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _request(self, prompt):
        path = "/chat/completions" if self.chat else "/completions"
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.chat:
            system, user = split_prompt(prompt)
            body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
        else:
            body["prompt"] = flat_prompt(prompt)
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


class HFBackend:
    def __init__(self, model_path, device="cpu", batch_size=8, max_new_tokens=500, do_sample=False,
                 temperature=1.0, seed=0):
        if not os.path.isdir(model_path):
            raise BackendError(
                f"llm_model_path {model_path!r} is not a folder with a transformers model "
                "(this project loads models from local paths only)"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device)
        except Exception as e:
            raise BackendError(f"cannot load a causal LM from {model_path}: {type(e).__name__}: {e}") from None
        self.torch = torch
        self.model.eval()
        self.model_path = model_path
        self.device = device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.use_chat = bool(getattr(self.tokenizer, "chat_template", None))

    def identity(self):
        return {"backend": "hf", "model_path": os.path.abspath(self.model_path),
                "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "chat_template": self.use_chat}

    def _format(self, prompt):
        if self.use_chat:
            system, user = split_prompt(prompt)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # a template without a system role: one user message
                return self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": flat_prompt(prompt)}], tokenize=False, add_generation_prompt=True
                )
        return flat_prompt(prompt)

    def generate(self, prompts):
        out = []
        torch = self.torch
        for i in range(0, len(prompts), self.batch_size):
            chunk = [self._format(p) for p in prompts[i : i + self.batch_size]]
            try:
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True).to(self.device)
                torch.manual_seed(self.seed + i)
                with torch.no_grad():
                    gen = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=self.do_sample,
                        temperature=self.temperature if self.do_sample else None,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new = gen[:, enc["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                out.extend(Completion(t) for t in texts)
            except Exception as e:  # a failing batch is recorded, not fatal
                out.extend(Completion(None, f"{type(e).__name__}: {e}") for _ in chunk)
        return out
