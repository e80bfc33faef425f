"""``gnrev train``: train a RevMLP on real MNIST (or another dataset) with exact GN, Adam or SGD."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "train"
HELP = "train a RevMLP with exact Gauss-Newton (or Adam/SGD) and log per-epoch metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gnrev_plugin.data import DATASETS
    from gnrev_plugin.experiments.optimizers import OPTIMIZERS

    p.add_argument("--model", default="revmlp", choices=["revmlp"], help="the network (RevMLP)")
    p.add_argument("--optimizer", default="exact_gn", choices=OPTIMIZERS)
    p.add_argument("--data", default="mnist", choices=DATASETS)
    p.add_argument("--data-dir", default=None,
                   help="directory of MNIST-format IDX files (default: $GNREV_DATA_DIR or "
                        "../shared/data/mnist)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use the first N training images (default: all; 8000 of the 10k split)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024, help="M, the inverted-bottleneck width "
                   "(exact GN needs batch ≤ M+1; the paper uses 8000)")
    p.add_argument("--blocks", type=int, default=2, help="L, number of reversible blocks")
    p.add_argument("--linear-first-block", action="store_true",
                   help="make block 1 linear as in the reference code (its GN systems are then "
                        "rank-deficient for batches > d/2+1, so GN is not exact there)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate; for exact_gn the function-space step α (J Δθ = −α ε). "
                        "Default: the reference mini-batch value (GN α = L·0.1, Adam 1e-4, "
                        "SGD 0.1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="run directory (default: runs/train-<optimizer>-"
                   "<data>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ImportError as err:  # an optional dataset package (mnist1d) is missing
        print(f"gnrev train: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from gnrev_plugin import data as gdata
    from gnrev_plugin.experiments.optimizers import reference_lr
    from gnrev_plugin.experiments.rundir import RunDir
    from gnrev_plugin.experiments.training import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise ValueError("gnrev train runs on the CPU in this version (--device cpu); the GPU "
                         "path is not implemented")
    kw = {}
    if args.train_size is not None and args.data in ("mnist", "fashion-mnist"):
        kw["train_size"] = args.train_size
    ds = gdata.pad_to_even(gdata.load_dataset(args.data, data_dir=args.data_dir, **kw))
    lr = args.lr if args.lr is not None else reference_lr(args.optimizer, "mini_batch",
                                                          args.blocks)
    cfg = dict(optimizer=args.optimizer, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
               hidden=args.hidden, blocks=args.blocks, seed=args.seed,
               linear_first_block=args.linear_first_block, data=args.data,
               data_info=ds.info, rank_policy="warn")
    out = Path(args.out) if args.out else Path("runs") / (
        f"train-{args.optimizer}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    exact = ("" if args.optimizer != "exact_gn" else
             f"; GN exact needs batch {args.batch_size} ≤ M+1 = {args.hidden + 1}")
    print(f"gnrev train: RevMLP(d={ds.in_features}, M={args.hidden}, L={args.blocks}, "
          f"C={ds.num_classes}{', linear first block' if args.linear_first_block else ''}) "
          f"with {args.optimizer} lr={lr:g}{exact}")
    print(f"  data: {ds.describe()}; batch {args.batch_size}, {args.epochs} epochs, "
          f"seed {args.seed}; logs -> {out}/log.jsonl")

    def show(row: dict) -> None:
        extra = ""
        if row.get("batch_loss_change_pct") is not None:
            extra = f"  batch loss change {row['batch_loss_change_pct']:+.1f}%"
        if row.get("exact_frac") is not None:
            extra += f"  exact steps {100 * row['exact_frac']:.0f}%"
        print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc "
              f"{100 * row['train_acc']:5.2f}%  test loss {row['test_loss']:.4f} acc "
              f"{100 * row['test_acc']:5.2f}%{extra}  ({row['time_s']:.1f}s)", flush=True)

    train_run(cfg, ds, RunDir(out), resume=args.resume, progress=not args.no_progress,
              on_epoch=show, desc=f"{args.optimizer}")
    print(f"done: {out}")
    return 0
