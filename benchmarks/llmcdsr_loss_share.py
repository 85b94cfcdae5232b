"""What share of LLMCDSR's training loss the augmented sequences carry, and how often the
old insertion rule put a recalled item after a sequence's last item.

    python benchmarks/llmcdsr_loss_share.py --data_path dataset [--batches 200] [--pretrain_seed 2020]

Draws training batches as the trainer does (128 original sequences and 32 augmented
single-domain users per step) and counts the target positions of each part: under one mean
over all positions (the public code, and ours) the augmented part weighs n_aug / (n_orig +
n_aug); the former sum of two means gave it 1/2. The old rule drew each insertion gap
uniformly among n + 1 (after the last item included): its expected share of "after the last
item" insertions is the mean of 1 / (n + 1) over the augmented users.
"""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--pretrain_seed", type=int, default=2020)
    args = ap.parse_args()

    import torch
    from recbole.utils import init_seed

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
    from recbole_cdsr.stages.llmcdsr import prepare as prepare_llmcdsr
    from recbole_cdsr.trainer.llmcdsr import LLMCDSRTrainer

    base = {"data_path": args.data_path, "pretrain_seed": args.pretrain_seed, "show_progress": False,
            "state": "WARNING", "use_gpu": False}
    cfg = CDSRConfig("LLMCDSR", args.dataset, config_dict=base)
    updates, _ = prepare_llmcdsr(cfg)  # stages 1 and 2, built or reused from the cache
    cfg = CDSRConfig("LLMCDSR", args.dataset, config_dict=dict(base, **updates))
    init_seed(cfg["seed"], True)
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    train, _, _ = cdsr_data_preparation(cfg, ds)
    model = cfg.model_class(cfg, train.dataset)
    trainer = LLMCDSRTrainer(cfg, model)
    trainer._make_loaders(train)
    n_orig = n_aug = 0
    after_last = []
    with torch.no_grad():
        for i, batch in enumerate(train):
            if i >= args.batches:
                break
            aug = next(trainer._aug_iter)
            n_orig += int((model.whole_sequence(batch)[:, 1:] > 0).sum())
            _, targets, ok, _, _ = model.augmented(aug, with_grad=False)
            n_aug += int(ok.sum())
            n = (model.whole_sequence(aug) > 0).sum(1).float()
            after_last += (1.0 / (n + 1)).tolist()
    print(f"{min(args.batches, len(train))} batches: target positions original {n_orig}, augmented {n_aug}")
    print(f"share of the augmented positions (one mean, the public code's weighting): {n_aug / (n_orig + n_aug):.3f}")
    print("share under the former sum of two means: 0.500")
    print(f"expected share of insertions after the last item under the former rule: "
          f"{sum(after_last) / len(after_last):.3f}")


if __name__ == "__main__":
    main()
