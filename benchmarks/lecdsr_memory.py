"""Memory of LeCDSR training on CPU: the text adapter on padded vs unpadded unique rows.

    python benchmarks/lecdsr_memory.py --data_path dataset [--steps 30] [--threads 1] [--buckets 1,1024]

LeCDSR runs its item text adapter once per distinct item of a batch. The number of distinct
items changes with every batch, and on CPU oneDNN caches one primitive (with its buffers)
per input shape it has run, up to 1024 of them: with a new shape at every step the process
grew by ~150 MB per step on Food-Kitchen and was OOM-killed at 22 GB in the benchmark.
The model pads the distinct rows to a multiple of ``row_bucket`` (1024) rows, so only a
few shapes ever occur.

This script trains LeCDSR on Food-Kitchen for ``--steps`` steps twice, each in a fresh
process (freed memory is not always given back to the OS, so one process per setting),
with ``row_bucket`` 1 (no padding: the old behaviour) and 1024 (the default), and prints
the resident set size (RSS) after the first step and at the end, the growth per step over
the second half of the steps, and seconds per step. The frozen text tables are random
matrices of the real shapes (384-d, the MiniLM width): building the real ones takes over an
hour, and memory depends on the shapes only.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)


def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args):
    import torch
    from recbole.utils import init_seed

    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.data.utils import cdsr_data_preparation, create_cdsr_dataset
    from recbole_cdsr.utils import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    cfg = CDSRConfig("LeCDSR", args.dataset, config_dict={
        "data_path": args.data_path, "show_progress": False, "state": "WARNING", "use_gpu": False,
        "eval_protocol": ["sampled"], "checkpoint_dir": "saved/bench",
    })
    if cfg["cpu_allocator_tuning"]:
        tune_cpu_allocator()  # as run_recbole_cdsr does
    init_seed(cfg["seed"], True)
    train_data = cdsr_data_preparation(cfg, create_cdsr_dataset(cfg, cfg.model_class))[0]
    ds = train_data._dataset
    g = torch.Generator().manual_seed(0)
    ds.item_text = torch.randn(ds.item_num, 384, generator=g)
    ds.user_profiles = torch.randn(ds.user_num, 384, generator=g)
    model = cfg.model_class(cfg, ds)
    model.row_bucket = args.child
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"])
    model.train()
    rss, times = [], []
    step = 0
    while step < args.steps:
        for batch in train_data:
            t0 = time.perf_counter()
            opt.zero_grad()
            model.calculate_loss(batch).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            rss.append(rss_gib())
            step += 1
            if step >= args.steps:
                break
    print(json.dumps({"row_bucket": args.child, "rss_gib": rss, "step_seconds": times}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buckets", default="1,1024", help="row_bucket values to run, comma-separated")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args)
    if args.steps < 4:
        sys.exit("--steps must be at least 4")

    try:
        buckets = [int(b) for b in args.buckets.split(",")]
    except ValueError:
        sys.exit(f"--buckets must be positive integers separated by commas, got {args.buckets!r}")
    if not buckets or min(buckets) < 1:
        sys.exit(f"--buckets must be positive integers separated by commas, got {args.buckets!r}")
    rows = {}
    for bucket in buckets:
        cmd = [sys.executable, __file__, "--data_path", args.data_path, "--dataset", args.dataset,
               "--steps", str(args.steps), "--threads", str(args.threads), "--child", str(bucket)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[bucket] = json.loads(out.strip().splitlines()[-1])

    print(f"LeCDSR on {args.dataset}, batch 1024, {args.steps} steps, {args.threads} thread(s), CPU")
    print(f"{'row_bucket':>10} {'RSS step 1 (GiB)':>17} {'RSS end (GiB)':>14} {'MB/step (2nd half)':>19} {'s/step':>7}")
    growth = {}
    for bucket, r in rows.items():
        rss, t = r["rss_gib"], r["step_seconds"]
        h = len(rss) // 2
        growth[bucket] = (rss[-1] - rss[h - 1]) * 1024 / (len(rss) - h)
        sec = sorted(t[1:])[len(t[1:]) // 2]  # median, first step excluded
        print(f"{bucket:>10} {rss[0]:>17.2f} {rss[-1]:>14.2f} {growth[bucket]:>19.1f} {sec:>7.3f}")
    if 1 in growth and 1024 in growth:
        print(f"growth per step, unpadded / padded: {growth[1] / max(growth[1024], 1.0):.1f}x "
              "(padded growth floored at 1 MB/step for the ratio)")


if __name__ == "__main__":
    main()
