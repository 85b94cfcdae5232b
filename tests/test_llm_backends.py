import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recbole_cdsr.llm.backends import BackendError, Completion, HFBackend, OpenAIBackend
from recbole_cdsr.llm.generation import GenerationJob, parse_names, parse_names_public
from recbole_cdsr.stages.llmcdsr_inputs import PROMPT_VERSION, build_prompt, extract_prompt, make_requests


def Job(out_dir, name, backend, **kw):
    """A generation job with LLMCDSR's stage-1 prompt version and extraction prompt."""
    return GenerationJob(out_dir, name, backend, PROMPT_VERSION, extract_prompt=extract_prompt, **kw)

GOOD = "Here are some picks:\n1. Cast Iron Skillet\n2. Chef Knife\n3. Cutting Board\n"


class _Handler(BaseHTTPRequestHandler):
    calls = {}
    bodies = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        key = prompt.split("\n")[-1] if "\n" in prompt else prompt
        with self.lock:
            n = self.calls[key] = self.calls.get(key, 0) + 1
            self.bodies.append(body)
        if "stall" in prompt:
            time.sleep(1.5)
        if "always500" in prompt or ("flaky" in prompt and n == 1):
            self.send_response(500)
            self.end_headers()
            return
        if "garbage" in prompt:
            payload = b"<html>not json"
        elif "badrequest" in prompt:
            self.send_response(400)
            self.end_headers()
            return
        else:
            text = GOOD
            if "Extract the names" in prompt:
                text = "1. Cast Iron Skillet\n2. Chef Knife\n3. Cutting Board"
            msg = {"message": {"role": "assistant", "content": text}} if "messages" in body else {"text": text}
            payload = json.dumps({"choices": [msg]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(payload)
        except BrokenPipeError:
            pass


@pytest.fixture()
def server():
    _Handler.calls = {}
    _Handler.bodies = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _Handler.calls
    srv.shutdown()
    srv.server_close()


def _backend(url, **kw):
    opts = dict(timeout=0.5, max_retries=2, backoff=0.01, concurrency=3)
    opts.update(kw)
    return OpenAIBackend(url, "test-model", **opts)


def test_openai_good_flaky_500_garbage_stall(server):
    url, calls = server
    b = _backend(url)
    out = b.generate(["u good", "u flaky", "u always500", "u garbage", "u stall", "u badrequest"])
    assert [c.ok for c in out] == [True, True, False, False, False, False]
    assert out[0].text == GOOD and parse_names(out[0].text) == ["Cast Iron Skillet", "Chef Knife", "Cutting Board"]
    assert out[1].attempts == 2  # one 500, then success
    assert out[2].attempts == 3 and "HTTP 500" in out[2].error  # 1 + 2 retries
    assert "unparseable" in out[3].error
    assert out[4].attempts == 3 and "timed out" in out[4].error.lower()
    assert out[5].attempts == 1 and "HTTP 400" in out[5].error  # a client error is not retried
    assert calls["u always500"] == 3 and calls["u badrequest"] == 1


def test_openai_completions_endpoint_and_bad_config(server):
    url, _ = server
    assert _backend(url, chat=False).generate(["u good"])[0].text == GOOD
    with pytest.raises(BackendError, match="http"):
        OpenAIBackend("localhost:8000", "m")


def test_generation_job_records_failures_and_resumes(tmp_path, server, caplog, monkeypatch):
    import logging

    import recbole_cdsr.llm.generation as generation

    monkeypatch.setattr(generation, "PROGRESS_SECONDS", 0)  # without a bar: a progress line per batch
    caplog.set_level(logging.INFO, logger="recbole_cdsr.llm.generation")
    url, calls = server
    reqs = [{"user": f"A_{i}", "domain": "A", "prompt": f"p{i}\nu {'always500' if i == 3 else 'good'} {i}"} for i in range(6)]
    job = Job(str(tmp_path), "toy", _backend(url), parser="llm", settings={"seed": 1}, batch_size=2,
                        show_progress=False)
    recs = job.run(reqs)
    assert set(recs) == {f"A_{i}" for i in range(6)}  # nobody lost
    assert recs["A_3"]["status"] == "failed" and recs["A_3"]["error"]
    assert recs["A_0"]["names"] == ["Cast Iron Skillet", "Chef Knife", "Cutting Board"]
    assert recs["A_0"]["pseudo_items"] is True
    man = json.loads(open(job.manifest).read())
    assert man["users_failed"] == 1 and man["complete"] is False
    assert man["identity"]["backend"]["model"] == "test-model" and man["identity"]["parser"] == "llm"
    said = [r.getMessage().split(" (")[0] for r in caplog.records if "users (" in r.getMessage()]
    assert said == ["LLM generation: 2 of 6 users", "LLM generation: 4 of 6 users", "LLM generation: 6 of 6 users"]
    caplog.clear()
    before = dict(calls)
    job.run(reqs)  # rerun: only the failed user is asked again
    asked = {k: calls[k] - before.get(k, 0) for k in calls if calls[k] != before.get(k, 0)}
    assert list(asked) == ["u always500 3"]
    said = [r.getMessage() for r in caplog.records if "users (" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("LLM generation: 6 of 6 users (1 this run in ")


class _Crashy:
    """A backend that dies after ``limit`` prompts, like a process killed half way."""

    def __init__(self, limit):
        self.limit, self.seen = limit, []

    def identity(self):
        return {"backend": "fake"}

    def generate(self, prompts):
        if len(self.seen) + len(prompts) > self.limit:
            raise KeyboardInterrupt("killed")
        self.seen += prompts
        return [Completion("1. a thing\n2. b thing\n3. c thing") for _ in prompts]


def test_resume_after_kill_every_user_done_exactly_once(tmp_path):
    reqs = [{"user": f"B_{i}", "domain": "B", "prompt": f"prompt {i}"} for i in range(10)]
    first = _Crashy(limit=6)
    job = Job(str(tmp_path), "toy", first, parser="regex", batch_size=3, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        job.run(reqs)
    with open(job.jsonl, "a") as f:
        f.write('{"user": "B_9", "sta')  # a torn last line from the crash
    second = _Crashy(limit=100)
    recs = Job(str(tmp_path), "toy", second, parser="regex", batch_size=3, show_progress=False).run(reqs)
    assert len(first.seen) == 6 and len(second.seen) == 4
    assert sorted(first.seen + second.seen) == sorted(r["prompt"] for r in reqs)  # each exactly once
    assert all(r["status"] == "ok" for r in recs.values()) and len(recs) == 10


def test_prompt_is_the_public_format_byte_for_byte():
    import numpy as np

    prefix = "Below is an instruction.\n\n\n### Instruction:\nRecommend books.\n\n"  # as read: blank line kept
    p = build_prompt(prefix, [(["Heat", "It's a Wonderful Life"], ["Dune"]), (["Alien"], ["Emma", 'The "Best" Cook'])],
                     np.array(["M", "Up"]).astype(str))  # titles as numpy strings, as read from the .item file
    want = ("Below is an instruction.\n\n\n### Instruction:\nRecommend books.\n\n"
            "### Example 1\nInput:['Heat', \"It's a Wonderful Life\"]\nOutput:\n- Dune\n\n"
            "### Example 2\nInput:['Alien']\nOutput:\n- Emma\n- The \"Best\" Cook\n\n"
            "\n### Input:\n['M', 'Up']")
    assert p == want
    over = {"A": [([f"a{i}"], [f"b{i}"]) for i in range(20)]}
    r1 = make_requests([("A_1", "A", ["x"]), ("A_2", "A", ["y"])], over, {"A": "P"}, 3, seed=5)
    r2 = make_requests([("A_2", "A", ["y"])], over, {"A": "P"}, 3, seed=5)
    assert r1[1]["prompt"] == r2[0]["prompt"]  # a user's prompt does not depend on the others
    assert r1[0]["prompt"].count("### Example") == 3


def test_extraction_prompt_and_name_patterns():
    # the public code writes the answer to a file and joins its readlines() with "\n": line breaks double
    ans = "Sure! Here they are:\r\n1. Green Tea\n2. Honey\n"
    assert extract_prompt(ans) == ('"Sure! Here they are:\n\n1. Green Tea\n\n2. Honey\n"\n\n'
                                   "Extract the names of the items directly, and list them with numbers starting "
                                   "with 1. If there are no items, Don't output anything.")
    assert extract_prompt("1. a\n2. b").startswith('"1. a\n\n2. b"\n\nExtract')
    text = 'Top picks:\n1. "Green Tea"\n2) Honey\n- Oat Biscuits\n2. honey\n3. M\n4. Dark Roast Coffee'
    assert parse_names(text) == ["Green Tea", "Honey", "Oat Biscuits", "M", "Dark Roast Coffee"]
    # public: "N. " then the rest up to a newline, anywhere; no last line without newline; exact-string dedup
    assert parse_names_public(text) == ['"Green Tea"', "honey", "M"]
    assert parse_names_public("Vol 2. Ends here\n1. A\n1. A\n") == ["Ends here", "A"]
    assert parse_names_public("1. only one line") == [] and parse_names("1. only one line") == ["only one line"]


def test_openai_decoding_model_sends_no_temperature(server):
    url, _ = server
    greedy, model = _backend(url, seed=7), _backend(url, seed=7, decoding="model")
    assert greedy.generate(["u good"])[0].ok and model.generate(["u good"])[0].ok
    sent = _Handler.bodies
    assert sent[0]["temperature"] == 0.0 and sent[0]["seed"] == 7 and sent[0]["max_tokens"] == 500
    assert "temperature" not in sent[1] and sent[1]["seed"] == 7 and sent[1]["max_tokens"] == 500
    assert greedy.identity() == {"backend": "openai", "base_url": url, "model": "test-model", "chat": True,
                                 "max_tokens": 500, "temperature": 0.0}  # unchanged: earlier caches stay valid
    assert model.identity()["decoding"] == "model" and model.identity()["temperature"] is None
    with pytest.raises(BackendError, match="llm_decoding"):
        _backend(url, decoding="beam")


def test_llm_parser_sends_the_public_extraction_prompt(tmp_path, server):
    url, _ = server
    job = Job(str(tmp_path), "toy", _backend(url), parser="auto", show_progress=False)
    assert job.parser == "llm" and job.identity["parser"] == "llm"
    recs = job.run([{"user": "A_1", "domain": "A", "prompt": "u good"}])
    assert [b["messages"][0]["content"] for b in _Handler.bodies] == ["u good", extract_prompt(GOOD)]
    assert recs["A_1"]["extracted"] == "1. Cast Iron Skillet\n2. Chef Knife\n3. Cutting Board"
    assert recs["A_1"]["names"] == ["Cast Iron Skillet", "Chef Knife", "Cutting Board"]
    # the same with the public regex: its last line has no newline, so two names, too few
    job = Job(str(tmp_path), "toy", _backend(url), parser="llm", name_pattern="public", show_progress=False)
    recs = job.run([{"user": "A_1", "domain": "A", "prompt": "u good"}])
    assert recs["A_1"]["names"] == ["Cast Iron Skillet", "Chef Knife"] and recs["A_1"]["pseudo_items"] is False
    n = len(_Handler.bodies)
    job = Job(str(tmp_path), "toy", _backend(url), parser="regex", show_progress=False)
    recs = job.run([{"user": "A_2", "domain": "A", "prompt": "u good"}])
    assert len(_Handler.bodies) == n + 1  # one call: no extraction
    assert recs["A_2"]["names"] == ["Cast Iron Skillet", "Chef Knife", "Cutting Board"]


ANSWERS = {
    "tea coffee": "1. Cast Iron Skillet\n2. Chef Knife\n3. Cutting Board\n",
    "knife pan pot": "1. Green Tea\n2. Dark Roast Coffee\n3. Honey\n4. Oat Biscuits\n",
}


def _prompt(titles):
    return build_prompt("Recommend kitchen or food items.", [(["tea"], ["kettle"])], titles.split())


def _tiny_causal_lm(path, train_steps=0):
    """A 1-layer GPT-2 and a word-level tokenizer (newlines are tokens) built here, no hub.
    With ``train_steps`` it is fitted to answer the two prompts of ``ANSWERS``."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^ \n]+"), behavior="removed", invert=True)
    pairs = [(_prompt(k), "\n" + v) for k, v in ANSWERS.items()]  # the prompt ends with the list literal
    corpus = [GOOD, "Input: Output: ### Example Response 1 2 3 . - tea coffee knife pan"]
    corpus += [p + a for p, a in pairs]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(path)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        seqs = [torch.tensor(fast(p + a)["input_ids"] + [fast.eos_token_id]) for p, a in pairs]
        model.train()
        for _ in range(train_steps):
            for ids in seqs:
                opt.zero_grad()
                model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.backward()
                opt.step()
    model.save_pretrained(path)
    return path


def _generation_config(path, **kw):
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, **kw).save_pretrained(path)


PROMPTS = ["Input: tea coffee", "Input: knife", "Input: pan pan pan pan"]


def test_hf_backend_generates_with_a_local_tiny_model(tmp_path):
    path = _tiny_causal_lm(str(tmp_path / "tiny-lm"))
    b = HFBackend(path, batch_size=2, max_new_tokens=12)
    out = b.generate(PROMPTS)
    assert len(out) == 3 and all(c.ok and isinstance(c.text, str) for c in out)
    assert out == HFBackend(path, batch_size=2, max_new_tokens=12).generate(PROMPTS)  # greedy: reproducible
    job = Job(str(tmp_path), "toy", b, settings={"seed": 0}, show_progress=False)
    assert job.parser == "llm"  # auto, with an LLM: the public two-call parsing
    recs = job.run([{"user": "A_1", "domain": "A", "prompt": "Input: tea"}])
    assert recs["A_1"]["status"] == "ok" and isinstance(recs["A_1"]["raw"], str)
    assert isinstance(recs["A_1"]["extracted"], str)
    with pytest.raises(BackendError, match="not a folder"):
        HFBackend(str(tmp_path / "missing"))


def test_hf_decoding_model_follows_the_models_generation_config(tmp_path):
    import torch

    path = _tiny_causal_lm(str(tmp_path / "tiny-lm"))
    plain = HFBackend(path, batch_size=2, max_new_tokens=12).generate(PROMPTS)
    _generation_config(path, do_sample=True, temperature=1.0, top_k=0)  # a model whose own config samples
    greedy = HFBackend(path, batch_size=2, max_new_tokens=12, decoding="greedy")
    model = HFBackend(path, batch_size=2, max_new_tokens=12, decoding="model", seed=3)
    assert greedy.generate(PROMPTS) == plain  # greedy whatever the model's config says
    state = torch.get_rng_state()
    sampled = model.generate(PROMPTS)
    assert torch.equal(torch.get_rng_state(), state)  # seeded on a forked generator: the run's RNG untouched
    assert [c.text for c in sampled] != [c.text for c in plain]
    assert model.generate(PROMPTS) == sampled  # seeded
    # a batch's seed comes from its prompts, not from its position in the call
    assert model.generate(PROMPTS[2:]) == sampled[2:] and model.generate(PROMPTS[:2]) == sampled[:2]
    other = HFBackend(path, batch_size=2, max_new_tokens=12, decoding="model", seed=4).generate(PROMPTS)
    assert [c.text for c in other] != [c.text for c in sampled]
    assert model.identity()["generation_config"]["do_sample"] is True and model.identity()["do_sample"] is True
    assert greedy.identity() == {"backend": "hf", "model_path": path, "max_new_tokens": 12, "do_sample": False,
                                 "chat_template": False}  # unchanged: earlier caches stay valid


def test_hf_prompt_formats_and_input_truncation(tmp_path):
    import torch
    from transformers import AutoTokenizer

    path = _tiny_causal_lm(str(tmp_path / "tiny-lm"))
    tok = AutoTokenizer.from_pretrained(path)
    ids = lambda t: tok(t)["input_ids"]  # noqa: E731
    pad = tok.pad_token_id
    prompts = ["Input: tea coffee knife", "Input: pan"]
    raw = HFBackend(path, prompt_format="raw")
    assert raw.encode(prompts)["input_ids"][1].tolist() == [pad, pad] + ids("Input: pan")
    assert HFBackend(path, prompt_format="auto").prompt_format == "raw"  # no user token, no chat template
    with pytest.raises(BackendError, match="no user_token_id"):
        HFBackend(path, prompt_format="user_token")
    # Baichuan2-like: the generation config names a user-role token; the public code appends it
    _generation_config(path, user_token_id=7)
    b = HFBackend(path, prompt_format="auto", max_input_tokens=3, batch_size=2, max_new_tokens=4)
    assert b.prompt_format == "user_token" and b.identity()["user_token_id"] == 7
    enc = b.encode(prompts)
    assert enc["input_ids"].tolist() == [ids("Input: tea coffee knife")[:3] + [7], [pad] + ids("Input: pan") + [7]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert all(c.ok for c in b.generate(prompts))
    # a chat template: the (cut) prompt is one user turn
    path2 = _tiny_causal_lm(str(tmp_path / "tiny-chat"))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    tok.save_pretrained(path2)
    t = HFBackend(path2, prompt_format="auto", max_input_tokens=2)
    assert t.prompt_format == "template" and t.identity()["chat_template"] is True
    assert t._format(prompts[0]) == "<user> Input: tea\n<assistant>\n"
    want = "<system> Be brief.\n<user> Input: pan\n<assistant>\n"
    assert t._format({"system": "Be brief.", "user": "Input: pan"}) == want
    assert HFBackend(path2, dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(BackendError, match="llm_prompt_format"):
        HFBackend(path2, prompt_format="chat")


def test_stage1_backend_takes_the_public_defaults_from_the_yaml(tmp_path, server):
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.stages.backend import make_backend

    from conftest import base_config

    url, _ = server
    path = _tiny_causal_lm(str(tmp_path / "tiny-lm"))
    cfg = CDSRConfig("LLMCDSR", "food-kitchen", config_dict=base_config(str(tmp_path), generator="hf",
                                                                        llm_model_path=path))
    assert cfg["llm_parser"] == "auto" and cfg["name_pattern"] == "lines" and cfg["pseudo_max_names"] is None
    hf = make_backend(cfg, cfg["generator"])
    got = (hf.decoding, hf.max_input_tokens, hf.dtype, hf.max_new_tokens, hf.seed)
    assert got == ("model", 1999, "bfloat16", 500, 2024)
    assert hf.prompt_format == "raw" and not hf.trust_remote_code
    cfg = CDSRConfig("LLMCDSR", "food-kitchen", config_dict=base_config(
        str(tmp_path), generator="openai", llm_base_url=url, llm_model="m", llm_decoding="greedy"))
    oa = make_backend(cfg, cfg["generator"])
    body = oa.request_body("x")
    assert oa.decoding == "greedy" and body["temperature"] == 0.0 and body["seed"] == 2024


def test_hf_pipeline_generates_parses_and_embeds(tmp_path):
    """Stage 1 end to end with a local causal LM: prompts -> batched generation (left
    padding, prompts of different lengths) -> regex parser -> MiniLM embeddings -> the
    pseudo-item file the dataset loads."""
    import numpy as np
    import torch

    from recbole_cdsr.llm.encoders import TextEncoder
    from recbole_cdsr.llm.pseudo_items import load_pseudo_items, write_pseudo_items

    path = _tiny_causal_lm(str(tmp_path / "tiny-lm"), train_steps=200)
    backend = HFBackend(path, batch_size=2, max_new_tokens=24)
    reqs = [{"user": "A_1", "domain": "A", "prompt": _prompt("tea coffee")},
            {"user": "B_1", "domain": "B", "prompt": _prompt("knife pan pot")}]
    job = Job(str(tmp_path), "toy", backend, parser="regex", settings={"seed": 0}, show_progress=False)
    recs = job.run(reqs)
    assert recs["A_1"]["names"] == ["Cast Iron Skillet", "Chef Knife", "Cutting Board"]
    assert recs["B_1"]["names"] == ["Green Tea", "Dark Roast Coffee", "Honey", "Oat Biscuits"]
    assert job.identity["backend"]["backend"] == "hf"
    enc = TextEncoder()
    npz = write_pseudo_items(str(tmp_path), "toy", recs, enc, {"jsonl": job.jsonl})
    loaded = load_pseudo_items(npz, {"A_1": 1, "B_1": 2}, n_users=3, max_per_user=20)
    assert loaded["count"].tolist() == [0, 3, 4]
    rows = loaded["index"][2, :4]
    want = enc.encode(["Green Tea", "Dark Roast Coffee", "Honey", "Oat Biscuits"])
    np.testing.assert_allclose(loaded["emb"][rows].numpy(), want, atol=1e-5)
    # no cap (pseudo_max_names: ~, the public code keeps every name): K = the largest count
    every = load_pseudo_items(npz, {"A_1": 1, "B_1": 2}, n_users=3, max_per_user=None)
    assert every["index"].shape == (3, 4) and every["count"].tolist() == [0, 3, 4]
    assert torch.equal(every["index"], loaded["index"][:, :4])
    two = load_pseudo_items(npz, {"A_1": 1, "B_1": 2}, n_users=3, max_per_user=2)  # the cap as an option
    assert two["index"].shape == (3, 2) and two["count"].tolist() == [0, 2, 2]
    assert torch.equal(two["index"], loaded["index"][:, :2])
    assert load_pseudo_items(npz, {"X_1": 1}, n_users=2)["index"].shape == (2, 1)  # nobody: one empty column


@pytest.mark.slow
def test_retrieval_stand_in_on_real_slice(tmp_path, fk_data):
    from recbole_cdsr.llm.encoders import TextEncoder
    from recbole_cdsr.llm.retrieval import RetrievalBackend
    from recbole_cdsr.stages.llmcdsr_inputs import stage1_requests

    d = f"{fk_data}/food-kitchen"
    reqs, overlapped = stage1_requests(d, "food-kitchen", shot=3, seed=0)
    assert len(reqs) == 5472 + 38191 and len(overlapped["A"]) == 7501
    first = reqs[0]
    assert first["user"] == "A_1" and first["domain"] == "A"
    assert first["prompt"].startswith(open(f"{d}/candidate_generate_A_icl.txt").read() + "### Example 1\nInput:[")
    assert first["prompt"].count("### Example") == 3
    assert first["prompt"].endswith("\n\n\n### Input:\n" + str([str(t) for t in first["titles"]]))
    sub = {"A": overlapped["A"][:200], "B": overlapped["B"][:200]}
    backend = RetrievalBackend(TextEncoder(), sub, neighbours=2)
    job = Job(str(tmp_path), "fk", backend, settings={"seed": 0}, show_progress=False)
    assert job.parser == "given"  # auto, with the stand-in: its names as they are
    recs = job.run(reqs[:5] + reqs[-5:])
    b_titles = {t for _, tgt in sub["A"] for t in tgt}
    assert all(r["status"] == "ok" for r in recs.values())
    given = backend.generate_requests(reqs[:5] + reqs[-5:])
    assert [recs[r["user"]]["names"] for r in reqs[:5] + reqs[-5:]] == [c.names for c in given]
    assert set(recs["A_1"]["names"]) <= b_titles and len(recs["A_1"]["names"]) > 0
    assert job.identity["backend"]["backend"] == "retrieval"
    with pytest.raises(Exception, match="needs an LLM backend"):
        Job(str(tmp_path), "fk", backend, parser="llm")
