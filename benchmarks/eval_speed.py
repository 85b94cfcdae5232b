"""Speed of the CDSR protocol vs RecBole's built-in sampled evaluation, and SASRec epochs.

    python benchmarks/eval_speed.py --data_path dataset [--instances 100] [--train-steps 30]

1. Sampled evaluation (999 negatives per instance) of the same SASRec weights on the same
   Food-Kitchen test instances, through
   - ours: one ``full_sort_predict`` per history, then a gather of the 1 + 999 candidate scores;
   - RecBole's ``uni999`` path: ``NegSampleEvalDataLoader`` + ``Trainer.evaluate``, which
     calls ``predict`` on every (history, candidate) pair.
   RecBole's path takes minutes per hundred instances on a 2-core CPU, so both paths are
   timed on the first ``--instances`` test instances (``--instances 0``: all 937) and the
   ratio of seconds per instance is printed. Ours is also timed on the whole test set.
2. Seconds per training epoch of RecBole's SASRec (prefix view, padded batches, its
   ``calculate_loss``: CE, batch 2048) on Food-Kitchen: ``--train-steps N`` times N steps and scales by the number
   of batches in the epoch; ``--train-steps 0`` times a whole epoch.
"""

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--use_gpu", action="store_true")
    args = ap.parse_args()

    from recbole.data.dataloader import NegSampleEvalDataLoader
    from recbole.sampler import RepeatableSampler
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import CDSREvalDataLoader, cdsr_data_preparation, create_cdsr_dataset
    from recbole_cdsr.trainer.trainer import CDSRTrainer
    from recbole_cdsr.model.layers import fast_layers
    from recbole_cdsr.utils import disable_anomaly_detection, tune_cpu_allocator

    common = {
        "data_path": args.data_path,
        "show_progress": False,
        "state": "WARNING",
        "use_gpu": args.use_gpu,
        "eval_protocol": ["sampled"],
        "checkpoint_dir": "saved/bench",
        # RecBole's own training path and padded batches (benchmarks/train_speed.py times
        # the faster defaults against it)
        "train_view": "prefix",
        "dynamic_padding": "off",
        "fused_loss": False,
    }
    cfg = CDSRConfig("SASRec", args.dataset, config_dict=common)
    if cfg["device"].type == "cpu":
        tune_cpu_allocator()
    init_seed(cfg["seed"], True)
    ds = create_cdsr_dataset(cfg, cfg.model_class)
    train, valid, test = cdsr_data_preparation(cfg, ds)
    model = cfg.model_class(cfg, train.dataset).to(cfg["device"])
    if cfg["fast_layers"]:
        fast_layers(model)  # as run_recbole_cdsr does
    disable_anomaly_detection()
    model.eval()
    n_all = len(test.dataset)
    n = args.instances or n_all

    # -- ours: whole test set, then the subset ------------------------------------------
    ours = CDSRTrainer(cfg, model)
    t = time.perf_counter()
    res_all = ours.evaluate(test, load_best_model=False)
    ours_all = time.perf_counter() - t
    sub = test.dataset.copy(test.dataset.inter_feat[torch.arange(n)])
    sub_loader = CDSREvalDataLoader(cfg, sub, "test", test.candidates[:n], cfg["eval_batch_size"])
    t = time.perf_counter()
    ours.evaluate(sub_loader, load_best_model=False)
    ours_sub = time.perf_counter() - t

    # -- RecBole's uni999 path on the same instances ------------------------------------
    rb_cfg = CDSRConfig(
        "SASRec",
        args.dataset,
        config_dict=dict(
            common,
            eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni999"},
            metrics=["Hit", "NDCG"],
            topk=[10],
            valid_metric="hit@10",
        ),
    )
    sampler = RepeatableSampler(["train", "valid", "test"], ds, "uniform").set_phase("test")
    rb_loader = NegSampleEvalDataLoader(rb_cfg, sub, sampler, shuffle=False)
    rb_trainer = Trainer(rb_cfg, model)
    disable_anomaly_detection()
    t = time.perf_counter()
    rb_res = rb_trainer.evaluate(rb_loader, load_best_model=False)
    rb_sub = time.perf_counter() - t

    ratio = (rb_sub / n) / (ours_sub / n)
    print(f"device: {cfg['device']}, torch threads: {torch.get_num_threads()}")
    print(f"sampled evaluation, {n} test instances x (1 + 999) candidates, same SASRec weights")
    print(f"  RecBole uni999 (predict per pair): {rb_sub:9.2f} s  ({rb_sub / n * 1000:8.2f} ms/instance)  hit@10={rb_res['hit@10']:.4f}")
    print(f"  recbole-cdsr (score once, gather): {ours_sub:9.2f} s  ({ours_sub / n * 1000:8.2f} ms/instance)")
    print(f"  ratio (RecBole / ours, per instance): {ratio:.1f}x")
    print(f"  recbole-cdsr on all {n_all} test instances: {ours_all:.2f} s (sampled, both domains; "
          f"A/hit@10={res_all['A/hit@10']:.4f}, B/hit@10={res_all['B/hit@10']:.4f})")
    print("  note: RecBole's uni999 draws its 999 negatives from both domains, with replacement, "
          "anew at every evaluation; timing compares the same amount of scoring work.")

    # -- training epoch -------------------------------------------------------------------
    model.train()
    trainer = CDSRTrainer(cfg, model)
    n_batches = len(train)
    steps = args.train_steps if args.train_steps > 0 else n_batches
    trainer.steps_per_epoch = steps
    t = time.perf_counter()
    trainer._train_epoch(train, 0)
    secs = time.perf_counter() - t
    per_step = secs / steps
    print(f"SASRec training (prefix view, {len(train.dataset)} rows, batch {cfg['train_batch_size']}, "
          f"{n_batches} batches/epoch, loss {cfg['loss_type']})")
    if steps < n_batches:
        print(f"  {steps} steps: {secs:.1f} s -> {per_step:.2f} s/step -> {per_step * n_batches:.0f} s/epoch (extrapolated)")
    else:
        print(f"  full epoch: {secs:.1f} s ({per_step:.2f} s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
