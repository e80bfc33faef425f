"""``gnrev train``: train any registered model with any registered optimizer on any registered
dataset, logging per-epoch loss, accuracy and run metrics.

Every name is resolved through the plugin registry (``gnrev list``); built-ins may be named
without their ``gnrev.`` prefix. The run is a :class:`~gnrev_plugin.build.RunSpec`, written
resolved (with every default filled in) to ``OUT/config.json``.

``--nproc N`` trains on ``N`` local processes launched through torch.distributed's launcher (gloo
on CPU, NCCL on CUDA): the global batch ``--batch-size`` is split into ``N`` equal contiguous
shards, and the Gauss-Newton step is taken on their union, so the logged losses are those of the
one-process run (:mod:`gnrev_plugin.engine.launch`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gnrev_plugin.defaults import RUN_DEFAULTS
from gnrev_plugin.optim.targets import LOSSES

NAME = "train"
HELP = ("train a registered model with a registered optimizer (exact GN by default) and log "
        "per-epoch metrics")


def _names(kind: str) -> str:
    from gnrev_plugin.registry import get_registry

    return ", ".join(get_registry().names(kind))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RUN_DEFAULTS
    p.add_argument("--model", default=d["model"], metavar="NAME",
                   help=f"registered model (default {d['model']}; see `gnrev list`)")
    p.add_argument("--model-opt", action="append", default=[], metavar="K=V",
                   help="model option, e.g. hidden=2000 or hidden=[64,64] (JSON values); "
                        "repeatable")
    p.add_argument("--optimizer", default=d["optimizer"], metavar="NAME",
                   help=f"registered optimizer (default {d['optimizer']})")
    p.add_argument("--opt", action="append", default=[], metavar="K=V",
                   help="optimizer option, e.g. lr=0.5 or rank_policy=raise; repeatable")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="registered run metric logged every epoch on the probe batch; "
                        "repeatable")
    p.add_argument("--loss", default=d["loss"], choices=LOSSES)
    p.add_argument("--data", default=d["dataset"].removeprefix("gnrev."), metavar="NAME",
                   help="registered dataset (default mnist: the real split in "
                        "../shared/data/mnist, no download)")
    p.add_argument("--data-opt", action="append", default=[], metavar="K=V",
                   help="dataset loader option; repeatable")
    p.add_argument("--data-dir", default=None,
                   help="shorthand for --data-opt data_dir=DIR (MNIST-format IDX directory; "
                        "default $GNREV_DATA_DIR or ../shared/data/mnist)")
    p.add_argument("--train-size", type=int, default=None,
                   help="shorthand for --data-opt train_size=N (the first N training images)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--probe-size", type=int, default=d["probe_size"],
                   help="training samples the run metrics are computed on")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=d["device"], help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--out", default=None, help="run directory (default: runs/train-<optimizer>-"
                   "<data>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (per process; with --nproc N default: cores / N)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N local processes (torch.distributed; gloo on CPU, nccl on "
                        "CUDA), each taking a contiguous 1/N of every batch; the Gauss-Newton "
                        "step is that of the whole batch (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")


def run(args: argparse.Namespace) -> int:
    from gnrev_plugin.registry import PluginError

    try:
        if getattr(args, "nproc", 1) != 1:
            return _launch(args)
        return _run(args)
    except (PluginError, KeyError) as err:  # unknown names, a plugin that cannot load
        print(f"gnrev train: error: {err}", file=sys.stderr)
        return 2


def _default_out(args: argparse.Namespace, spec) -> Path:
    from gnrev_plugin.build import short_name

    return Path(args.out) if args.out else Path("runs") / (
        f"train-{short_name(spec.optimizer)}-{short_name(spec.dataset)}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}")


def _launch(args: argparse.Namespace) -> int:
    """Start ``--nproc`` processes that each run :func:`_run` (rank 0 prints and writes)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from gnrev_plugin.engine.launch import backend_for, check_batching, launch
    from gnrev_plugin.registry import get_registry

    try:
        check_batching(args.batch_size, args.batch_size, args.nproc)
    except ValueError as err:
        print(f"gnrev train: error: {err}", file=sys.stderr)
        return 2
    spec = spec_from_args(args).resolve(get_registry())
    args = argparse.Namespace(**vars(args))
    args.out = str(_default_out(args, spec))      # one run directory for every rank
    try:
        codes = launch(_rank_main, args.nproc, args, backend=backend_for(spec.device))
    except ChildFailedError as err:
        print(f"gnrev train: error: a training process failed ({err.name}); its traceback "
              "is above", file=sys.stderr)
        return 1
    return max(codes.values())


def _rank_main(args: argparse.Namespace) -> int:
    """One launched process: threads, its GPU, then the ordinary run."""
    import torch

    if args.threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return run(argparse.Namespace(**{**vars(args), "nproc": 1}))


def spec_from_args(args: argparse.Namespace):
    """The :class:`~gnrev_plugin.build.RunSpec` of the command line (not yet resolved)."""
    from gnrev_plugin.build import RunSpec, parse_options

    data_kwargs = parse_options(args.data_opt)
    if args.data_dir is not None:
        data_kwargs["data_dir"] = args.data_dir
    if args.train_size is not None:
        data_kwargs["train_size"] = args.train_size
    return RunSpec(model=args.model, model_kwargs=parse_options(args.model_opt),
                   optimizer=args.optimizer, optimizer_kwargs=parse_options(args.opt),
                   loss=args.loss, dataset=args.data, dataset_kwargs=data_kwargs,
                   metrics=list(args.metric), seed=args.seed, device=args.device,
                   epochs=args.epochs, batch_size=args.batch_size, probe_size=args.probe_size)


def _run(args: argparse.Namespace) -> int:
    import torch

    from gnrev_plugin.build import load_data, short_name
    from gnrev_plugin.engine import BatchLossChange, EpochEnd, RunDir, WallTime, train_run
    from gnrev_plugin.engine.launch import rank_and_world
    from gnrev_plugin.registry import get_registry

    if args.threads:
        torch.set_num_threads(args.threads)
    reg = get_registry()
    spec = spec_from_args(args).resolve(reg)
    ds = load_data(spec.dataset, spec.dataset_kwargs,
                   input_multiple=reg.entry("model", spec.model).input_multiple, registry=reg)
    out = _default_out(args, spec)
    mk = ", ".join(f"{k}={v}" for k, v in spec.model_kwargs.items())
    ok = ", ".join(f"{k}={v}" for k, v in spec.optimizer_kwargs.items())
    print(f"gnrev train: {spec.model}(d={ds.in_features}, C={ds.num_classes}, {mk}) with "
          f"{spec.optimizer}({ok}), {spec.loss} loss on {spec.device}")
    print(f"  data: {ds.describe()}; batch {spec.batch_size}, {spec.epochs} epochs, seed "
          f"{spec.seed}; logs -> {out}/log.jsonl")

    def show(row: dict) -> None:
        extra = ""
        if row.get("batch_loss_change_pct") is not None:
            extra = f"  batch loss change {row['batch_loss_change_pct']:+.1f}%"
        if row.get("exact_frac") is not None:
            extra += f"  exact steps {100 * row['exact_frac']:.0f}%"
        for name in spec.metrics:
            for key in sorted(k for k in row if k == name or k.startswith(name + ".")):
                value = row[key]
                extra += f"  {key} {value:.4g}" if value is not None else f"  {key} –"
        print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc "
              f"{100 * row['train_acc']:5.2f}%  test loss {row['test_loss']:.4f} acc "
              f"{100 * row['test_acc']:5.2f}%{extra}  ({row['time_s']:.1f}s)", flush=True)

    world = rank_and_world()[1]
    extra = {"data_info": ds.info, **({"nproc": world} if world > 1 else {})}
    train_run(spec, ds, RunDir(out), [BatchLossChange(), WallTime(), EpochEnd(show)],
              resume=args.resume, progress=not args.no_progress, desc=short_name(spec.optimizer),
              registry=reg, extra_config=extra)
    print(f"done: {out}")
    return 0
