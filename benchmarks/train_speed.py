"""Training and evaluation speed of RecBole's models: RecBole's padded prefix path vs ours.

    python benchmarks/train_speed.py --data_path dataset --models SASRec,BERT4Rec --steps 10

For each model, in this one process, with the same batch size (the model's default,
RecBole's 2048 unless ``--batch_size``), threads and device:

``recbole``
    RecBole as it comes: the prefix view, every history padded to MAX_ITEM_LIST_LENGTH,
    ``calculate_loss``, RecBole's own layers (``fast_layers: False``).
``prefix``
    ours on the prefix view: the run's defaults (length-grouped batches trimmed to their
    longest history when the model is exact under trimming, the fused loss, ``fast_layers``).
``sequence``
    ours on the whole-sequence view (SASRec, GRU4Rec): batches of up to ``batch_size``
    targets, every target of a sequence in one pass.

Seconds per Food-Kitchen training epoch are extrapolated from ``--steps`` timed steps after
``--warmup`` untimed ones, the paths taking their timed steps in turn (so a machine that
changes speed during the run affects them alike) (default 5: with the tuned allocator, a full-logits step is slow
until the heap has grown, ~4 steps here) (collate, forward, backward, optimiser step; the batches of our
paths are a random sample of the epoch's, as the epoch shuffles them). Evaluation seconds
rank the validation and test splits under both protocols (the fastest of three passes),
padded and (where exact) trimmed; the "eval floor" is the same with the encoder replaced by
random states (scoring every history against all items and ranking: what no padding change
can remove). The "loss head" is the time of the loss alone over the epoch's targets: random
sequence states [batch, hidden] scored against every item with cross-entropy and
backpropagated (RecBole's matmul + ``CrossEntropyLoss``, and the fused one), the floor for
any padding change; ``our/floor`` divides our epoch by RecBole's head.

Prints a table, then ``ratio MODEL VIEW X.XX`` (RecBole's seconds per epoch / ours) per model
and view and ``ratio MODEL eval X.XX``.

The plugin's cross-domain models (C2DSR, URLLM, LeCDSR) have no RecBole path; for them the
two paths are ``old`` (``fast_layers: False`` and ``fused_loss: False``: the path before
their cheaper steps, the same random streams as then) and ``fast`` (the defaults), timed in
turn in this one process on the same batches' distribution, and the line is
``ratio MODEL fast X.XX`` (old seconds per step / fast). Their rows also give the time per
step of the prediction heads alone (``head``: the fused cross-entropy calls of the fast
path, their three matrix products per row over every item of the domain: the floor that no
exact change of the rest removes).
"""

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(model, args, **over):
    from recbole_cdsr.config import CDSRConfig
    from recbole_cdsr.trainer.whole_sequence import training_loss
    from recbole_cdsr.quick_start import build_data_and_model
    from recbole_cdsr.trainer.trainer import CDSRTrainer

    cfg = {
        "data_path": args.data_path, "show_progress": False, "state": "WARNING",
        "use_gpu": args.use_gpu, "checkpoint_dir": "saved/bench", "pretrain_epochs": 1,
    }
    if args.batch_size:
        cfg["train_batch_size"] = args.batch_size
    cfg.update(getattr(args, "overrides", {}))
    cfg.update(over)
    config = CDSRConfig(model, args.dataset, config_dict=cfg)
    from recbole_cdsr.quick_start import stages_lock
    from recbole_cdsr.registry import get_stages

    prepare = get_stages(model)
    if prepare is not None and model != "LLMCDSR":  # LeCDSR's cached text tables (built once per dataset)
        with stages_lock(config):
            updates, _ = prepare(config)
        for k, v in updates.items():
            config[k] = v
    ds, train, valid, test, net = build_data_and_model(config)
    if model == "S3Rec":  # fine-tuning steps, as S3Rec's run trains after pre-training
        from recbole_cdsr.trainer.s3rec import S3RecCDSRTrainer

        trainer = S3RecCDSRTrainer(config, net)
        trainer._switch_to_finetune()
    else:
        trainer = CDSRTrainer(config, net)
    loss_fn, loss_path = training_loss(net, ds.train_view, fused=config["fused_loss"] is not False)
    return config, ds, train, valid, test, net, trainer, loss_fn, loss_path


class TimedPath:
    """One training path (model, optimiser, loader, loss) that takes timed steps."""

    def __init__(self, name, built):
        self.name = name
        self.config, self.ds, self.train, self.valid, self.test, self.net, self.trainer, self.loss_fn, self.loss_path = built
        self.device = self.config["device"]
        self.n_batches = len(self.train)
        self.dynamic = bool(getattr(self.train, "dynamic_padding", False))
        self._it = iter(self.train)
        self.times, self.targets = [], []

    def step(self, timed):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.net.train()
        sync()
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.train)
            batch = next(self._it)
        batch = batch.to(self.device)
        if "MASK_INDEX" in batch.interaction:  # BERT4Rec: the masked slots that count
            self.targets.append(int((batch["MASK_INDEX"] > 0).sum()))
        self.trainer.optimizer.zero_grad()
        loss = self.loss_fn(batch)
        loss.backward()
        self.trainer.optimizer.step()
        sync()
        if timed:
            self.times.append(time.perf_counter() - t0)

    def seconds_per_step(self):
        return float(np.mean(self.times))

    def masked_targets_per_epoch(self):
        return float(np.mean(self.targets)) * self.n_batches if self.targets else None


def time_interleaved(paths, steps, warmup):
    """Warm every path up, then take timed steps in turn (path 1, path 2, ..., path 1, ...),
    so that a machine that speeds up or slows down during the measurement affects every
    path alike."""
    for p in paths:
        for _ in range(warmup):
            p.step(timed=False)
    for _ in range(steps):
        for p in paths:
            p.step(timed=True)


def time_eval(config, ds, named_models, loaders_of, rounds=3):
    """``{name: seconds}``: the fastest of ``rounds`` passes of the protocol over the
    validation and test splits, the models taking turns."""
    from recbole_cdsr.evaluation.protocol import ProtocolEvaluator

    ev = ProtocolEvaluator(config, ds.domain_mask())
    best = {}
    for _ in range(rounds):
        for name, net in named_models:
            t0 = time.perf_counter()
            for ld in loaders_of[name]:
                ev.rank(net, ld)
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, dt), dt)
    return best


class _ScoreOnly(torch.nn.Module):
    """A stand-in model whose ``full_sort_predict`` is only the scoring: random sequence
    states against every item embedding (what any history costs after the encoder)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight.detach()
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def full_sort_predict(self, interaction):
        n = len(interaction)
        h = torch.randn(n, self.weight.size(1), generator=self.gen).to(self.weight.device)
        return h @ self.weight.t()


def loss_head(n_targets, batch, hidden, n_items, steps, device, fused):
    from recbole_cdsr.model.fused_ce import linear_cross_entropy

    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n_items, hidden, generator=g) * 0.02).to(device).requires_grad_()
    h = torch.randn(batch, hidden, generator=g).to(device).requires_grad_()
    t = torch.randint(1, n_items, (batch,), generator=g).to(device)
    times = []
    warm = 4  # the tuned allocator grows its heap over the first few full-logits steps
    for k in range(steps + warm):
        w.grad = h.grad = None
        t0 = time.perf_counter()
        if fused:
            loss = linear_cross_entropy(h, w, t)
        else:
            loss = torch.nn.functional.cross_entropy(h @ w.t(), t)
        loss.backward()
        if k >= warm:
            times.append(time.perf_counter() - t0)
    return float(np.mean(times)) * n_targets / batch


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would carry the parent's
    peak over from before the exec)."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return float(ln.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def head_seconds_per_batch(batch, hidden, n_items, fused, args):
    """The loss head's mean seconds per batch, measured in a fresh process (the big
    allocations of a full-logits head time very differently in a process that has already
    trained models)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--_head", f"{batch},{hidden},{n_items},{int(fused)}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.use_gpu:
        cmd += ["--use_gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    sec, rss = out[-1].split()
    return float(sec), float(rss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_path", default="dataset")
    ap.add_argument("--dataset", default="food-kitchen")
    ap.add_argument("--models", default="SASRec,GRU4Rec,BERT4Rec,NARM,STAMP,SRGNN",
                    help="comma-separated model names (RecBole's, or C2DSR, URLLM, LeCDSR: old path vs fast), "
                         "or 'all' (every RecBole model the protocol runs)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=None, help="train_batch_size (default: the model's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--use_gpu", action="store_true")
    ap.add_argument("--no_eval", action="store_true")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for every model measured (YAML value), e.g. lecdsr_use_profiles=False; repeatable")
    ap.add_argument("--_head", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._head:
        if args.threads:
            torch.set_num_threads(args.threads)
        from recbole_cdsr.utils import tune_cpu_allocator

        device = torch.device("cuda" if args.use_gpu else "cpu")
        if not args.use_gpu:
            tune_cpu_allocator()
        b, h, n, f = (int(x) for x in args._head.split(","))
        sec = loss_head(b, b, h, n, 8, device, fused=bool(f))
        print(sec, peak_rss_mb())
        return 0
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    import yaml

    args.overrides = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--config {item!r}: expected KEY=VALUE")
        try:
            args.overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            ap.error(f"--config {item!r}: the value is not YAML ({e})")
    if args.threads:
        torch.set_num_threads(args.threads)
    from recbole_cdsr.utils import tune_cpu_allocator

    if not args.use_gpu:
        tune_cpu_allocator()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if models == ["all"]:
        from recbole_cdsr.registry import UNSUPPORTED_RECBOLE_MODELS, recbole_sequential_models

        models = [m for m in recbole_sequential_models() if m not in UNSUPPORTED_RECBOLE_MODELS]
    print(f"threads {torch.get_num_threads()}, steps {args.steps} after {args.warmup} warm-up", flush=True)
    rows, ratios, heads, mem, failed = [], [], {}, [], []
    for model in models:
        try:
            r, q, m = measure_model(model, args, heads)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            import traceback

            traceback.print_exc()
            print(f"{model} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(model)
            continue
        print_table(r)
        rows += r
        ratios += q
        mem += m
    print()
    print_table(rows)
    print()
    for r in mem:
        print(r)
    for r in ratios:
        print(r)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


def print_table(rows):
    print(f"{'model':<10} {'path':<12} {'s/step':>7} {'steps':>6} {'s/epoch':>8} {'speed-up':>8} {'/floor':>7}  loss, trimmed")
    for model, view, s, nb, epoch, up, fl, path, dyn in rows:
        print(
            f"{model:<10} {view:<12} {'' if s is None else f'{s:.3f}':>7} {'' if nb is None else nb:>6} "
            f"{epoch:>8.2f} {'' if up is None else f'{up:.2f}x':>8} {'' if fl is None else f'{fl:.2f}':>7}  "
            f"{path}{'' if dyn is None else (', trimmed' if dyn else ', padded')}",
            flush=True,
        )


PLUGIN_MODELS = ("C2DSR", "URLLM", "LeCDSR")
#: where the fused heads of a plugin model are called from (timed as the ``head`` row)
HEAD_MODULES = {"C2DSR": "recbole_cdsr.model.c2dsr", "URLLM": "recbole_cdsr.model.c2dsr"}


def measure_plugin_model(model, args):
    """The old and the fast path of one of :data:`PLUGIN_MODELS`: table rows and the ratio."""
    import importlib

    paths = [TimedPath("old", build(model, args, fast_layers=False, fused_loss=False)),
             TimedPath("fast", build(model, args))]
    fast = paths[1]
    mod = importlib.import_module(HEAD_MODULES[model]) if model in HEAD_MODULES else None
    head = {"seconds": 0.0, "on": False}
    inner = getattr(mod, "linear_cross_entropy", None)
    if inner is not None:
        def timed_head(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            if head["on"]:
                head["seconds"] += time.perf_counter() - t0
            return out

        mod.linear_cross_entropy = timed_head
    step = fast.step

    def counted(timed):
        head["on"] = timed
        step(timed)
        head["on"] = False

    fast.step = counted
    try:
        time_interleaved(paths, args.steps, args.warmup)
    finally:
        if inner is not None:
            mod.linear_cross_entropy = inner
    rows = []
    old = paths[0].seconds_per_step()
    for p in paths:
        s = p.seconds_per_step()
        print(f"{model} {p.name}: {s:.3f} s/step x {p.n_batches} = {s * p.n_batches:.1f} s/epoch", flush=True)
        rows.append((model, p.name, s, p.n_batches, s * p.n_batches, old / s, None, p.loss_path, None))
    if inner is not None:
        h = head["seconds"] / max(len(fast.times), 1)
        rows.append((model, "head", h, fast.n_batches, h * fast.n_batches, None, None,
                     f"fused heads alone: {h / fast.seconds_per_step():.0%} of a fast step", None))
    return rows, [f"ratio {model} fast {old / fast.seconds_per_step():.2f}"], []


def measure_model(model, args, heads):
    """Rows of the table, ``ratio`` lines and ``memory`` lines of one model."""
    from recbole_cdsr.trainer.whole_sequence import SEQUENCE_MODELS

    if model in PLUGIN_MODELS:
        return measure_plugin_model(model, args)

    rows, ratios, mem = [], [], []
    paths = [TimedPath("recbole", build(model, args, dynamic_padding="off", fused_loss=False,
                                        fast_layers=False, train_view="prefix")),
             TimedPath("prefix", build(model, args, train_view="prefix"))]
    if model in SEQUENCE_MODELS:
        paths.append(TimedPath("sequence", build(model, args, train_view="sequence")))
    time_interleaved(paths, args.steps, args.warmup)
    for p in paths:
        s = p.seconds_per_step()
        print(f"{model} {p.name}: {s:.3f} s/step x {p.n_batches} = {s * p.n_batches:.1f} s/epoch "
              f"({p.loss_path}, dynamic padding {p.dynamic})", flush=True)
    rb, ours = paths[0], paths[1]
    config, ds = rb.config, rb.ds
    n_targets = ours.masked_targets_per_epoch() or len(rb.train._dataset)  # BERT4Rec: masked slots
    bs = config["train_batch_size"]
    n_items = ds.item_num
    emb = getattr(rb.net, "item_embedding", None)
    hidden = int(emb.embedding_dim) if isinstance(emb, torch.nn.Embedding) else 64
    has_ce = str(config["loss_type"]).upper() == "CE"
    ev = {}
    if not args.no_eval:
        named = [("padded", rb.net), ("ours", ours.net)]
        loaders = {"padded": (rb.valid, rb.test), "ours": (ours.valid, ours.test)}
        if isinstance(emb, torch.nn.Embedding):
            # the first item_num rows: BERT4Rec and S3Rec keep a mask token after them
            named.append(("floor", _ScoreOnly(ours.net.item_embedding.weight[:n_items])))
            loaders["floor"] = loaders["ours"]
        ev = time_eval(config, ds, named, loaders)
    floor = floor_fused = None
    if has_ce:
        key = (bs, hidden, n_items)
        if key not in heads:
            heads[key] = tuple(head_seconds_per_batch(bs, hidden, n_items, f, args) for f in (False, True))
        (floor, rss), (floor_fused, rss_fused) = ((x * n_targets / bs, m) for x, m in heads[key])
        mem.append(f"memory {model} loss head peak RSS {rss:.0f} MB, fused {rss_fused:.0f} MB "
                   f"(a fresh process, batch {bs}, {n_items} items)")
    base = rb.seconds_per_step() * rb.n_batches
    for p in paths:
        s = p.seconds_per_step()
        epoch = s * p.n_batches
        rows.append((model, p.name, s, p.n_batches, epoch, base / epoch, None if floor is None else epoch / floor,
                     p.loss_path, p.dynamic))
        if p.name != "recbole":
            ratios.append(f"ratio {model} {p.name} {base / epoch:.2f}")
    if floor is not None:
        rows.append((model, "loss head", None, None, floor, None, 1.0, f"matmul + CE, {int(n_targets)} targets", None))
        rows.append((model, "fused head", None, None, floor_fused, None, floor_fused / floor, "fused CE", None))
    if ev:
        rows.append((model, "eval padded", None, None, ev["padded"], None, None, "valid + test", False))
        rows.append((model, "eval ours", None, None, ev["ours"], ev["padded"] / ev["ours"], None, "valid + test",
                     ours.dynamic))
        ratios.append(f"ratio {model} eval {ev['padded'] / ev['ours']:.2f}")
        if "floor" in ev:
            rows.append((model, "eval floor", None, None, ev["floor"], None, None,
                         "scoring + ranking only (random states)", None))
    return rows, ratios, mem


if __name__ == "__main__":
    sys.exit(main())
