"""URLLM's dual-graph model: attribute words, the attribute graph, the alignment terms."""

import math
import os

import numpy as np
import pytest
import torch

from conftest import setup_model
from recbole_cdsr.model.urllm import attribute_graph, attribute_words, normalise_text

SMALL = dict(hidden_size=16, urllm_attr_size=6, eval_neg_num=50, train_batch_size=64)


def _setup(tmp, data, **kw):
    return setup_model("URLLM", tmp, data, **dict(SMALL, **kw))


def test_attribute_words_by_the_public_rule():
    assert normalise_text("The Green_Tea, 20-pack") == "green tea 20 pack"
    assert normalise_text("A \u2018Cast\u2019-Iron pan; an iron`s") == "cast iron pan iron s"
    texts = ["", "The Green_Tea, 20-pack", "green tea bags, lid", "Cast-Iron pan", "iron PAN lid", "A tea pot"]
    doms = [-1, 0, 0, 1, 1, 1]
    vocab, words = attribute_words(texts, doms)
    # green, tea: 2 A items; iron, pan: 2 B items; lid: 1 A + 1 B item (dropped); tea stays on
    # the B item too (it qualified through A); 20, pack, bags, cast, pot: one item each
    assert vocab == ["green", "iron", "pan", "tea"]
    assert words == [[], ["green", "tea"], ["green", "tea"], ["iron", "pan"], ["iron", "pan"], ["tea"]]
    adj = attribute_graph(words, vocab).to_dense()
    n = len(texts)
    green, iron, pan, tea = (n + i for i in range(4))
    assert adj.shape == (n + 4, n + 4)
    assert adj[1, green] == adj[1, tea] == 0.5 and adj[5, tea] == 1.0 and adj[0].sum() == 0
    assert torch.allclose(adj[tea, [1, 2, 5]], torch.full((3,), 1 / 3)) and adj[tea, :n].sum() == pytest.approx(1.0)
    assert adj[:n, :n].sum() == 0 and adj[n:, n:].sum() == 0  # only item <-> word edges


def test_tokens_losses_and_scores(tmp_path, slice_data):
    cfg, ds, (train, _, test), model = _setup(str(tmp_path), slice_data)
    assert model.n_words > 50 and model.encoders[0].position_embedding.weight.shape[1] == 32  # 2d
    batch = next(iter(train))
    terms = model.losses(batch)
    assert len(terms) == 8 and all(torch.isfinite(t) for t in terms)
    for i, part in ((6, model.lin_align_view[0].weight), (7, model.lin_align_view[1].weight),
                    (0, model.lin_x.weight), (4, model.disc[0].weight)):
        model.zero_grad()
        terms[i].backward(retain_graph=True)
        assert part.grad is not None and part.grad.abs().sum() > 0, i
        assert model.item_emb_att.weight.grad.abs().sum() > 0, i  # the attribute table feeds every term
    model.eval()
    with torch.no_grad():  # no dropout; the corruption noise is drawn from the same seed twice
        torch.manual_seed(1)
        t = model.losses(batch)
        want = 0.5 * (0.7 * sum(t[:4]) + 0.3 * sum(t[4:6])) + 0.5 * (t[6] + t[7])
        torch.manual_seed(1)
        assert torch.allclose(model.calculate_loss(batch), want)
        scores = model.full_sort_predict(test.dataset.inter_feat[:4])
    assert scores.shape == (4, model.n_items) and torch.isfinite(scores[:, model.items_a]).all()



def test_packed_encoders_train_the_same_model(tmp_path, slice_data):
    """The encoders' per-slot layers on the kept slots alone (pack_below) with the dropout
    draws of every slot (kept_draws False): on a real batch in training mode (dropout and
    corruption noise on, same seed) loss and gradients are those of the run over every slot.
    The fast path packs at any width and draws its masks on the kept slots alone; the old
    path packs from width 512 only."""
    _, _, (train, _, _), model = _setup(str(tmp_path), slice_data)
    assert all(e.pack_below == 0.8 and e.kept_draws for e in model.encoders)  # fast: packed, kept draws
    batch = next(iter(train))
    model.train()

    def run(pack_below, kept_draws=False):
        for e in model.encoders:
            e.pack_below, e.kept_draws = pack_below, kept_draws
        model.zero_grad()
        torch.manual_seed(3)
        loss = model.calculate_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (padded, g_padded), (packed, g_packed) = run(0.0), run(1.0)
    assert torch.allclose(packed, padded, rtol=1e-5) and len(g_packed) == len(g_padded)
    for a, b in zip(g_packed, g_padded):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    kept, _ = run(1.0, kept_draws=True)  # other masks: another loss, of the same size
    assert not torch.allclose(kept, packed, rtol=1e-5) and abs(kept.item() / packed.item() - 1) < 0.2
    torch.manual_seed(4)
    for e in model.encoders:
        e.kept_draws = False
    assert not torch.allclose(model.calculate_loss(batch).detach(), packed, rtol=1e-5)  # dropout is on
    old = _setup(str(tmp_path / "old"), slice_data, fast_layers=False)[3]
    assert all(e.pack_below == 0.0 and not e.kept_draws for e in old.encoders)  # 32 wide: never packed
    wide = _setup(str(tmp_path / "wide"), slice_data, hidden_size=256, fast_layers=False)[3]
    assert all(e.pack_below == 0.8 for e in wide.encoders)  # 512-wide tokens: packed


def test_corrupted_tokens_get_noise_only_there(tmp_path, slice_data):
    _, _, (train, _, _), model = _setup(str(tmp_path), slice_data)
    model.eval()
    seq = next(iter(train))["item_id_list"][:, :5]
    with torch.no_grad():
        tables = model.tables()
        clean = model.tokens(0, seq, tables)
        noisy = model.tokens(0, seq, tables, corrupted=True)
    assert torch.equal(model.tokens(0, seq, tables), clean) and not torch.equal(noisy, clean)
    z = (noisy - clean)[clean != 0] * torch.sign(clean[clean != 0])  # sign(e) N(0, 1) 0.05, sign undone
    assert abs(z.mean().item()) < 0.005 and 0.045 < z.std().item() < 0.055
    assert torch.equal(noisy[clean == 0], clean[clean == 0])


@pytest.mark.slow
def test_one_command_on_real_food_kitchen_slice(tmp_path, slice_data):
    import json

    import run_recbole_cdsr

    args = ["--model=URLLM", "--dataset=fk-slice", f"--data_path={slice_data}", f"--checkpoint_dir={tmp_path / 's'}",
            f"--results_dir={tmp_path / 'r'}", "--epochs=2", "--hidden_size=16", "--urllm_attr_size=6",
            "--eval_neg_num=50", "--show_progress=False", "--state=WARNING"]
    assert run_recbole_cdsr.main(args) == 0
    res = json.loads(open(os.path.join(tmp_path / "r", os.listdir(tmp_path / "r")[0])).read())
    assert res["model"] == "URLLM" and res["timing"]["epochs_trained"] == 2 and len(res["valid_history"]) == 2
    assert np.isfinite(res["test"]["full"]["B/mrr@10"])
    # no LLM configured: the dual-graph model alone, and the results file says so
    assert res["after_training"] == {"llm": None, "note": "no LLM configured: the dual-graph model alone"}


# -- the LLM stage ------------------------------------------------------------------------
WORDS = {"A": "food", "B": "kitchen"}


def test_prompt_of_a_hand_made_pair_of_users():
    from recbole_cdsr.stages.urllm import alpaca, build_prompt

    similar = [("A", "green tea"), ("B", "tea pot"), ("A", "honey")]
    own = [("B", "kettle"), ("A", "rooibos")]
    p = build_prompt(similar, own, "B", WORDS)
    assert p["instruction"] == ("Given a list of food or kitchen the user has bought before, please recommend a new "
                                "food or kitchen that the user likes to the user.")
    assert p["input"] == ("There is another similar user who has played food or kitchen before: food:green tea | "
                          "kitchen:tea pot | food:honey |The user has played the following food or kitchen before: "
                          "kitchen:kettle | food:rooibos |Please recommend a new kitchen\n")
    assert alpaca(p, "teapot") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n" + p["instruction"]
        + "\n\n### Input:\n" + p["input"] + "\n\n### Response:\nteapot")
    # the neighbour's items stop at 512 words (own part split on single spaces, neighbour part on
    # blanks), checked before each item: the last one added may pass the limit
    own = [("A", "w")] * 150
    own_words = len(("The user has played the following food or kitchen before:" + " food:w |" * 150).split(" "))
    assert own_words == 10 + 2 * 150  # the header's 10 words, then "food:w" and "|" per item
    p = build_prompt([("B", "x y")] * 300, own, "A", WORDS)
    sim = p["input"].split("The user has played")[0]
    header = len("There is another similar user who has played food or kitchen before:".split())
    assert sim.count("kitchen:x y |") == math.ceil((512 - own_words - header) / 3) == 64
    assert own_words + len(sim.rsplit(" kitchen:x y |", 1)[0].split()) < 512 <= own_words + len(sim.split())
    assert build_prompt([("B", "x y")] * 300, [("A", "w")] * 260, "A", WORDS)["input"].count("kitchen:x") == 0


def test_refinement_exact_near_and_garbage(minilm):
    import numpy as np

    from recbole_cdsr.stages.urllm import refine, title_index

    titles = ["Cast Iron Skillet, 12 inch", "Stainless Steel Chef Knife", "Bamboo Cutting Board"]
    vec = minilm.encode(titles)
    vec = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    index = title_index(titles)
    assert refine("kitchen: cast iron skillet 12 inch</s>", index, vec, minilm, WORDS.values()) == (0, "exact")
    assert refine("a steel chefs knife", index, vec, minilm, WORDS.values()) == (1, "nearest")
    assert refine("bamboo board for cutting\nmore text", index, vec, minilm) == (2, "nearest")
    for garbage in ("", "  \n ", "</s>", "!!! ??", None):
        assert refine(garbage, index, vec, minilm) == (None, "fallback")


def _tiny_lm(path, texts):
    """A 1-layer GPT-2 with a word-level tokenizer over ``texts`` (built here, no hub)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^ \n]+"), behavior="removed", invert=True)
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    # initializer_range 0.5: a random output table wide enough for the adapters to make peaked predictions
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                               initializer_range=0.5, bos_token_id=2, eos_token_id=2,
                               pad_token_id=1)).save_pretrained(path)
    return path


def _lm_loss(model, tok, texts):
    losses = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id]])
            losses.append(model(ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_lora_fine_tuning_lowers_the_loss_and_the_adapters_reload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recbole_cdsr.llm.lora import finetune_lora
    from recbole_cdsr.stages.urllm import alpaca, build_prompt

    texts = [alpaca(build_prompt([("A", "green tea")], [("B", "kettle")], "A", WORDS), "honey"),
             alpaca(build_prompt([("B", "tea pot")], [("A", "rooibos")], "B", WORDS), "cast iron skillet")]
    base = _tiny_lm(str(tmp_path / "lm"), texts)
    tok = AutoTokenizer.from_pretrained(base)
    before = _lm_loss(AutoModelForCausalLM.from_pretrained(base), tok, texts)
    settings = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"],
                "learning_rate": 0.05, "epochs": 40, "batch_size": 2, "warmup_steps": 0, "cutoff_len": 256, "seed": 0}
    folder, man = finetune_lora(base, texts, str(tmp_path), "toy", settings)
    assert man["epoch_losses"][-1] < man["epoch_losses"][0]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    after = _lm_loss(tuned, tok, texts)
    assert after < 0.8 * before
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    assert _lm_loss(again, tok, texts) == after  # reloaded adapters: the same model
    stamp = os.path.getmtime(os.path.join(folder, "adapter_model.safetensors"))
    assert finetune_lora(base, texts, str(tmp_path), "toy", settings)[0] == folder  # the same inputs: reused
    assert os.path.getmtime(os.path.join(folder, "adapter_model.safetensors")) == stamp


def test_generation_rerun_after_a_crash_answers_every_user_once(tmp_path):
    import json

    from recbole_cdsr.llm.backends import Completion
    from recbole_cdsr.llm.generation import GenerationJob
    from recbole_cdsr.stages.urllm import PROMPT_VERSION

    class Crashing:
        """Answers with the prompt's last word; raises (a killed process) at batch ``crash_at``."""

        is_llm = True

        def __init__(self, crash_at=None):
            self.batches, self.crash_at = 0, crash_at

        def identity(self):
            return {"backend": "toy"}

        def generate(self, prompts):
            self.batches += 1
            if self.batches == self.crash_at:
                raise KeyboardInterrupt
            return [Completion(p.split()[-1]) for p in prompts]

    reqs = [{"user": f"T_{i}", "domain": "A", "prompt": f"Please recommend item{i}"} for i in range(10)]

    def job(backend):
        return GenerationJob(str(tmp_path), "toy", backend, PROMPT_VERSION, parser="text", kind="urllm",
                             batch_size=3, show_progress=False)

    with pytest.raises(KeyboardInterrupt):
        job(Crashing(crash_at=3)).run(reqs)  # batches 1 and 2 (6 users) were written
    second = Crashing()
    out = job(second).run(reqs)
    assert second.batches == 2  # the 4 users left, in batches of 3
    lines = [json.loads(ln) for ln in open(job(second).jsonl)]
    assert sorted(r["user"] for r in lines) == sorted(r["user"] for r in reqs)  # every user exactly once
    assert {u: r["raw"] for u, r in out.items()} == {f"T_{i}": f"item{i}" for i in range(10)}


@pytest.mark.slow
def test_llm_stage_through_the_one_command_on_a_real_slice(tmp_path, slice_data):
    import json
    import shutil

    import run_recbole_cdsr
    from recbole_cdsr.data.atomic import read_item_titles

    data = tmp_path / "data"
    shutil.copytree(os.path.join(slice_data, "fk-slice"), data / "fk-slice")
    _, _, titles = read_item_titles(str(data / "fk-slice" / "fk-slice.item"))
    lm = _tiny_lm(str(tmp_path / "lm"), list(titles) + ["food kitchen played Please recommend a new | :"])
    args = ["--model=URLLM", "--dataset=fk-slice", f"--data_path={data}", f"--checkpoint_dir={tmp_path / 's'}",
            f"--results_dir={tmp_path / 'r'}", "--epochs=1", "--hidden_size=16", "--urllm_attr_size=6",
            "--eval_neg_num=50", "--show_progress=False", "--state=WARNING", "--urllm_generator=hf",
            f"--llm_model_path={lm}", "--urllm_lora_target_modules=['c_attn']", "--urllm_lora_epochs=1",
            "--urllm_lora_batch_size=32", "--urllm_lora_warmup_steps=0", "--urllm_lora_cutoff_len=256",
            "--llm_max_new_tokens=4", "--llm_num_beams=2", "--llm_batch_size=16"]
    assert run_recbole_cdsr.main(args) == 0
    res = json.loads(open(os.path.join(tmp_path / "r", os.listdir(tmp_path / "r")[0])).read())
    llm = res["after_training"]
    assert llm["llm"] == "hf" and llm["test_users"] == 60 and sum(llm["refined"].values()) == 60
    assert len(llm["lora"]["epoch_losses"]) == 1 and llm["lora"]["texts"] > 50
    files = os.listdir(data / "fk-slice")
    assert any(f.startswith("fk-slice.urllm-") and f.endswith(".jsonl") for f in files)
    assert any(".lora-" in f for f in files)
    # every test user's LLM item is ranked first: under the full protocol HR@1 is exactly the
    # share of users whose LLM item is the target
    assert res["test"]["full"]["overall/hit@1"] == pytest.approx(llm["llm_item_is_target"] / 60)


@pytest.mark.slow
def test_fast_path_equals_the_old_path_on_real_food_kitchen(tmp_path, fk_data):
    """URLLM's dual-graph model on the fast path (row-gathered tables with the attribute
    graph, fused heads, packed views drawing dropout on kept slots alone): the same loss
    terms, gradients and scores as the path before it on real Food-Kitchen rows."""
    from test_c2dsr import compare_fast_and_old_paths

    _, new, _ = compare_fast_and_old_paths(str(tmp_path), fk_data, "URLLM")
    assert new.item_emb_att.weight.grad.abs().sum() > 0
