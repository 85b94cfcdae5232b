"""Run a model on a cross-domain dataset under the CDSR protocol (like RecBole's run_recbole.py).

    python run_recbole_cdsr.py --model=SASRec --dataset=food-kitchen
    python run_recbole_cdsr.py --model=GRU4Rec --dataset=food-kitchen --config_files=my.yaml --epochs=20
    python run_recbole_cdsr.py --benchmark=benchmarks/food-kitchen.yaml [--executor=ray] [--models=SASRec,GRU4Rec] [--jobs=2]
    python run_recbole_cdsr.py --model=SASRec --dataset=food-kitchen --tune=random --max_evals=8 --epochs=5

Any other ``--key=value`` overrides a config key (highest priority, as in RecBole).
``--benchmark`` runs a benchmark file (models x datasets x seeds, resumable) and writes its
leaderboards; ``--tune`` searches properties/hyper/<Model>.hyper on the validation split.
"""

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default=None, help="model name")
    parser.add_argument("--dataset", "-d", type=str, default=None, help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="config files, space-separated")
    parser.add_argument("--raw_path", type=str, default=None, help="release folder to convert from")
    parser.add_argument("--benchmark", type=str, default=None, help="benchmark file (YAML) to run")
    parser.add_argument("--executor", type=str, default="local", choices=["local", "ray"],
                        help="where benchmark runs execute (ray: pip install -e .[ray])")
    parser.add_argument("--ray_address", type=str, default=None, help="Ray cluster address (default: local Ray)")
    parser.add_argument("--models", type=str, default=None,
                        help="benchmark: run only these model names of the file (comma-separated)")
    parser.add_argument("--report", action="store_true",
                        help="benchmark: write its leaderboards from the recorded results; run nothing")
    parser.add_argument("--jobs", type=int, default=None,
                        help="benchmark, local executor: runs side by side (default: the file's jobs, else 1)")
    parser.add_argument("--tune", type=str, default=None, choices=["exhaustive", "random", "bayes"],
                        help="search the model's properties/hyper/<Model>.hyper space (validation only)")
    parser.add_argument("--max_evals", type=int, default=10, help="trials of --tune")
    args, rest = parser.parse_known_args(argv)
    for a in rest:
        if not a.startswith("--") or "=" not in a:
            parser.error(f"unrecognised argument {a!r}: config keys are given as --key=value")
    cmd = dict(a[2:].split("=", 1) for a in rest)
    if args.raw_path:
        cmd["raw_path"] = args.raw_path
    files = args.config_files.strip().split(" ") if args.config_files else None

    if args.benchmark:
        if args.model or args.dataset or cmd or args.tune:
            parser.error("--benchmark takes its models, datasets and config from the benchmark file")
        from recbole_cdsr.benchmark.runner import run_benchmark

        try:
            only = [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None
            out = run_benchmark(args.benchmark, executor=args.executor, ray_address=args.ray_address, only=only,
                                jobs=args.jobs, report_only=args.report)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if out["failed"] and args.report:
            print(f"{len(out['failed'])} planned runs have no finished result yet (not in the leaderboard): "
                  + ", ".join(out["failed"]), file=sys.stderr)
        elif out["failed"]:
            print(f"{len(out['failed'])} runs failed (recorded in {out['results_file']}): "
                  + ", ".join(out["failed"]), file=sys.stderr)
            return 1
        return 0
    if args.jobs is not None or args.report:
        parser.error("--jobs and --report apply to a --benchmark")
    if args.models is not None:
        parser.error("--models selects models of a --benchmark file (use --model for one run)")
    if args.tune:
        from recbole_cdsr.benchmark.hyper import tune_model

        if not args.model or not args.dataset:
            parser.error("--tune needs --model and --dataset")
        try:
            from recbole_cdsr.config import literal_value

            fixed = {k: literal_value(v) for k, v in cmd.items()}
            rec = tune_model(args.model, args.dataset, fixed, files, algo=args.tune, max_evals=args.max_evals)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"best parameters (validation {rec['best_valid_score']:.4f}): {rec['best_params']}")
        return 0

    from recbole_cdsr.quick_start import format_results_table, run_recbole_cdsr

    try:
        out = run_recbole_cdsr(model=args.model, dataset=args.dataset, config_file_list=files, cmd_args=cmd)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nTest results of {out['results']['model']} on {out['results']['dataset']} "
          f"(selection: {out['results']['selection']['model_selection']}):")
    print(format_results_table(out["results"]))
    doms = out["results"].get("domains") or {}
    if any(k != v for k, v in doms.items()):
        print("domains: " + ", ".join(f"{k} = {v}" for k, v in doms.items()))
    t = out["results"]["timing"]
    why = {"early_stopping": "early stopping on validation", "epoch_cap": "the epoch cap (epochs)",
           "budget": "the training budget", "interrupted": "an interruption (Ctrl-C)"}.get(t["stop_reason"], "-")
    print(f"trained {t['epochs_trained']} epochs in {sum(t['train_epoch_seconds']) / 60:.1f} min; stopped by {why}")
    if out["results_file"]:
        print(f"results file: {out['results_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
