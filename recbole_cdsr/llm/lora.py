"""LoRA fine-tuning of a local causal LM with ``peft``, cached as an artefact folder.

``finetune_lora`` trains low-rank adapters on training texts (the whole text is the target,
prompt included, as URLLM's public fine-tuning runs with ``train_on_inputs``), with AdamW,
a linear warm-up then linear decay, and writes the adapters (``peft``'s
``save_pretrained``) into a folder that is renamed into place when complete, with a
manifest naming the base model's fingerprint, the texts and every setting. A run with the
same inputs reuses the folder.
"""

import hashlib
import json
import logging
import math
import time

from recbole_cdsr.cache import Artefact

logger = logging.getLogger(__name__)

LORA_FORMAT_VERSION = 1


def lora_settings(config):
    """The LoRA settings of a run's config (``urllm_lora_*`` keys)."""
    return {
        "r": config["urllm_lora_r"], "alpha": config["urllm_lora_alpha"], "dropout": config["urllm_lora_dropout"],
        "target_modules": list(config["urllm_lora_target_modules"]), "learning_rate": config["urllm_lora_lr"],
        "epochs": config["urllm_lora_epochs"], "batch_size": config["urllm_lora_batch_size"],
        "warmup_steps": config["urllm_lora_warmup_steps"], "cutoff_len": config["urllm_lora_cutoff_len"],
        "seed": config["seed"],
    }


def _batches(n, size, rng):
    order = rng.permutation(n)
    return [order[i : i + size] for i in range(0, n, size)]


def finetune_lora(base_path, texts, out_dir, name, settings, device="cpu"):
    """Adapters for the causal LM at ``base_path`` trained on ``texts`` (each followed by the
    tokenizer's end-of-sequence token, cut to ``cutoff_len`` tokens). Returns ``(folder,
    record)``; the folder ``<out_dir>/<name>.lora-<tag>`` is reused when its manifest matches."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recbole_cdsr.llm.encoders import _model_fingerprint

    ident = {"format_version": LORA_FORMAT_VERSION, "base_model": _model_fingerprint(base_path),
             "texts_sha256": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(), "settings": settings}
    art = Artefact(out_dir, f"{name}.lora", ident, suffix="")
    m = art.cached("LoRA adapters")
    if m is not None:
        return art.path, m
    s = settings
    tok = AutoTokenizer.from_pretrained(base_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(int(s["seed"]))
    model = AutoModelForCausalLM.from_pretrained(base_path).to(device)
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules=s["target_modules"], bias="none", task_type="CAUSAL_LM"))
    ids = [tok(t, add_special_tokens=False)["input_ids"][: s["cutoff_len"] - 1] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["learning_rate"])
    steps = s["epochs"] * math.ceil(len(ids) / s["batch_size"])
    warm = s["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (steps - k) / max(1, steps - warm)))
    rng = np.random.default_rng(int(s["seed"]))
    losses, t0 = [], time.time()
    model.train()
    for epoch in range(s["epochs"]):
        total = 0.0
        for rows in _batches(len(ids), s["batch_size"], rng):
            width = max(len(ids[r]) for r in rows)
            inp = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                inp[i, : len(ids[r])] = torch.tensor(ids[r])
                mask[i, : len(ids[r])] = 1
            labels = inp.masked_fill(mask == 0, -100)
            loss = model(input_ids=inp.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(rows)
        losses.append(total / len(ids))
        left = (time.time() - t0) / (epoch + 1) * (s["epochs"] - epoch - 1)
        logger.info(f"LoRA fine-tuning: epoch {epoch + 1}/{s['epochs']}: loss {losses[-1]:.4f} "
                    f"({len(ids)} texts; about {left / 60:.1f} min left)")
    m = art.write_folder(lambda folder: model.save_pretrained(folder), epoch_losses=losses, texts=len(ids),
                         seconds=time.time() - t0)
    return art.path, m
