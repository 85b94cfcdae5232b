"""Training speed of the public SASRec port's encoder with its per-slot layers run on the
kept slots alone ("packed") against every slot of the batch ("padded").

    python benchmarks/packed_encoder.py --data_path dataset --models URLLM,C2DSR --steps 4 --threads 2

C2DSR and URLLM's dual-graph model run three encoders per batch (mixed sequence, domain-A
view, domain-B view) and two more on corrupted sequences; a view blanks the other domain's
slots like padding, and every row is cut to the batch's longest history only. The blanked
slots enter the blocks only as keys b_k and values b_v and leave them as zeros, so
:class:`~recbole_cdsr.model.layers.PublicSASRecEncoder` can run its projections, layer
norms and feed-forward on the kept slots alone (the attention and the dropout draws stay
on the whole batch: the same function and random stream).

For each model, in this one process, three paths take training steps in turn after
``--warmup`` untimed ones (same seed, same batches): ``padded`` (``pack_below`` 0: never
packed), ``packed`` (1: always) and ``default`` (the encoder's own rule). Prints seconds per
step and per epoch, the share of kept slots, then ``ratio MODEL PATH X.XX`` (padded / path).
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_speed import TimedPath, build, time_interleaved  # noqa: E402


def set_pack(net, value):
    from recbole_cdsr.model.layers import PublicSASRecEncoder

    encoders = [m for m in net.modules() if isinstance(m, PublicSASRecEncoder)]
    if not encoders:
        raise SystemExit(f"{type(net).__name__} has no PublicSASRecEncoder")
    for m in encoders:
        if value is not None:
            m.pack_below = value
    return encoders


def kept_share(path, n_batches=5):
    """Share of the slots each encoder keeps over the first batches: (mixed, A view, B view)."""
    net, tot = path.net, torch.zeros(4)
    for i, batch in enumerate(path.train):
        if i == n_batches:
            break
        hist, n = batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]
        seq = hist[:, : int(n.max())]
        dom = net.item_domain[seq]
        tot += torch.tensor([float(seq.numel()), float((seq > 0).sum()), float((dom == 0).sum()),
                             float((dom == 1).sum())])
    return (tot[1:] / tot[0]).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--models", default="URLLM,C2DSR")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--use_gpu", action="store_true")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, steps {args.steps} after {args.warmup} warm-up", flush=True)
    ratios = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        paths = []
        for name, value in (("padded", 0.0), ("packed", 1.0), ("default", None)):
            p = TimedPath(name, build(model, args))
            enc = set_pack(p.net, value)
            paths.append(p)
        width = enc[0].last_layernorm.normalized_shape[0]
        share = kept_share(paths[0])
        print(f"{model}: token width {width}, default pack_below {enc[0].pack_below}, kept slots: mixed "
              f"{share[0]:.2f}, A view {share[1]:.2f}, B view {share[2]:.2f}", flush=True)
        time_interleaved(paths, args.steps, args.warmup)
        base = paths[0].seconds_per_step()
        for p in paths:
            print(f"{model:<8} {p.name:<8} {p.seconds_per_step():8.3f} s/step {p.seconds_per_step() * p.n_batches:9.1f} "
                  f"s/epoch ({p.n_batches} batches)", flush=True)
            if p.name != "padded":
                ratios.append(f"ratio {model} {p.name} {base / p.seconds_per_step():.2f}")
    for r in ratios:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
