"""Run a model on a cross-domain dataset under the CDSR protocol (like RecBole's run_recbole.py).

    python run_recbole_cdsr.py --model=SASRec --dataset=food-kitchen
    python run_recbole_cdsr.py --model=GRU4Rec --dataset=food-kitchen --config_files=my.yaml --epochs=20

Any other ``--key=value`` overrides a config key (highest priority, as in RecBole).
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
    args, rest = parser.parse_known_args(argv)
    for a in rest:
        if not a.startswith("--") or "=" not in a:
            parser.error(f"unrecognised argument {a!r}: config keys are given as --key=value")
    cmd = dict(a[2:].split("=", 1) for a in rest)
    if args.raw_path:
        cmd["raw_path"] = args.raw_path
    files = args.config_files.strip().split(" ") if args.config_files else None

    from recbole_cdsr.quick_start import format_results_table, run_recbole_cdsr

    try:
        out = run_recbole_cdsr(model=args.model, dataset=args.dataset, config_file_list=files, cmd_args=cmd)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nTest results of {out['results']['model']} on {out['results']['dataset']} "
          f"(selection: {out['results']['selection']['model_selection']}):")
    print(format_results_table(out["results"]))
    if out["results_file"]:
        print(f"results file: {out['results_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
