"""Seconds per training step and epoch of LLMCDSR vs its backbone-only ablation.

    python benchmarks/llmcdsr_speed.py --data_path dataset [--steps 30] [--pretrain_epochs 200] [--meta_interval 1] [--lower_bound] [--backbone public|recbole] [--pretrain_seed 2020]

Both run in the same process on the same data with the paper's defaults (batch 128, aug
batch 32, meta batch 128, meta_interval 1, k = 10). Stages 1-2 are prepared (or reused)
first and are not timed. Prints seconds per step, seconds per epoch (steps x batches per
epoch), and the ratio LLMCDSR / backbone-only. The public code's figures on a 2-core CPU,
for comparison: 0.82 s/step (327 s/epoch) with the meta step, 0.19 s/step (76 s/epoch)
without.
"""

import argparse
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (0: a whole epoch)")
    ap.add_argument("--pretrain_epochs", type=int, default=200)
    ap.add_argument("--meta_interval", type=int, default=1, help="a meta step every N batches (paper: 1)")
    ap.add_argument("--backbone", default="public", choices=["public", "recbole"], help="LLMCDSR's backbone")
    ap.add_argument("--pretrain_seed", type=int, default=None,
                    help="stage 2's seed (2020 reuses the pre-training of benchmarks/llmcdsr-head-to-head.yaml)")
    ap.add_argument("--use_gpu", action="store_true")
    ap.add_argument("--lower_bound", action="store_true",
                    help="also time the passes any exact meta step must make, as plain forward+backward passes")
    args = ap.parse_args()

    import torch
    from recbole.utils import init_seed

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
    from recbole_cdsr.registry import get_trainer
    from recbole_cdsr.stages.llmcdsr import prepare as prepare_llmcdsr
    from recbole_cdsr.utils import tune_cpu_allocator

    base = {"data_path": args.data_path, "use_gpu": args.use_gpu, "show_progress": False, "state": "WARNING",
            "pretrain_epochs": args.pretrain_epochs, "checkpoint_dir": "saved/bench", "backbone": args.backbone,
            "pretrain_seed": args.pretrain_seed}
    cfg = CDSRConfig("LLMCDSR", args.dataset, config_dict=base)
    if cfg["device"].type == "cpu":
        tune_cpu_allocator()
    updates, _ = prepare_llmcdsr(cfg)
    rows = []
    for mode in ("backbone_only", "full"):
        c = CDSRConfig("LLMCDSR", args.dataset,
                       config_dict=dict(base, llmcdsr_mode=mode, meta_interval=args.meta_interval, **updates))
        init_seed(c["seed"], True)
        ds = create_cdsr_dataset(c, c.model_class)
        train, _, _ = cdsr_data_preparation(c, ds)
        model = c.model_class(c, train.dataset).to(c["device"])
        trainer = get_trainer("LLMCDSR")(c, model)
        n_batches = len(train)
        steps = args.steps or n_batches
        trainer.steps_per_epoch = 2  # warm-up (loaders, allocator)
        trainer._train_epoch(train, 0)
        trainer.steps_per_epoch = steps
        t = time.perf_counter()
        trainer._train_epoch(train, 1)
        secs = time.perf_counter() - t
        rows.append((mode, secs / steps, secs / steps * n_batches, n_batches, trainer.meta_steps))
    print(f"device: {cfg['device']}, torch threads: {torch.get_num_threads()}, "
          f"batch {cfg['train_batch_size']}, aug batch {cfg['aug_batch_size']}, meta batch {cfg['meta_batch_size']}, "
          f"meta_interval {args.meta_interval}")
    for mode, per_step, per_epoch, n, meta in rows:
        print(f"  {mode:<14} {per_step:6.3f} s/step  {per_epoch:8.1f} s/epoch ({n} batches; meta steps {meta})")
    ratio = rows[1][2] / rows[0][2]
    print(f"  ratio LLMCDSR / backbone-only per epoch: {ratio:.2f}")
    print(f"  vs the public code on a 2-core CPU (0.82 s/step with meta): {0.82 / rows[1][1]:.2f}x faster per step")
    if args.lower_bound:
        lower_bound(trainer, train, args.steps or 100)
    return 0


def lower_bound(trainer, train, steps):
    """The work an exact meta step cannot avoid, at the paper's defaults: a forward and a
    backward over the meta batch (the meta loss and its gradient), and two passes over the
    augmented batch (the inner step's gradient, the main step), each timed here as a plain
    forward+backward, i.e. without the graph of the inner step, the second-order pass or the
    inner update. Against a backbone step measured in the same loop this bounds the ratio
    from below."""
    import time

    model, dev = trainer.model, trainer.device
    it = iter(train)
    t_step = t_meta = t_aug = 0.0
    for i in range(steps + 2):
        batch = next(it).to(dev)
        aug, meta = next(trainer._aug_iter).to(dev), next(trainer._meta_iter).to(dev)
        t0 = time.perf_counter()
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()
        t1 = time.perf_counter()
        model.calculate_loss(meta).backward()
        t2 = time.perf_counter()
        model.joint_mean(model.aug_loss(aug, with_grad=False)).backward()
        t3 = time.perf_counter()
        if i >= 2:  # warm-up
            t_step, t_meta, t_aug = t_step + t1 - t0, t_meta + t2 - t1, t_aug + t3 - t2
    t_step, t_meta, t_aug = t_step / steps, t_meta / steps, t_aug / steps
    bound = (t_step + t_meta + 2 * t_aug) / t_step
    print(f"lower bound over {steps} steps: backbone step {t_step:.3f} s, meta-batch pass {t_meta:.3f} s, "
          f"augmented-batch pass {t_aug:.3f} s")
    print(f"  no exact meta step at these settings can make the ratio lower than {bound:.2f}")


if __name__ == "__main__":
    sys.exit(main())
