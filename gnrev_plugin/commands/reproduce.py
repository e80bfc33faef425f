"""``gnrev reproduce``: reproduce the seed papers' findings (exact GN, GN conditioning, NME)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

NAME = "reproduce"
HELP = ("reproduce the papers' findings: exact-gn (Buffelli et al.), conditioning (Zhao et al.), "
        "nme and sharpness (Dauphin et al.), laziness (is exact GN lazy?); leaderboard (GN against "
        "the field, AlgoPerf scoring); writes JSONL logs, figures and report.md")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gnrev_plugin.experiments.presets import EXPERIMENT_NAMES, PRESET_NAMES

    p.add_argument("experiment", choices=EXPERIMENT_NAMES)
    p.add_argument("--preset", default="quick", choices=PRESET_NAMES,
                   help="quick (≤ 3 min on 2 CPU cores), paper (the papers' sizes), smoke (CI)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/<experiment>-<preset>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --out (its runs are replaced); without it "
                        "(or --resume) a non-empty --out is refused")
    p.add_argument("--data", default="mnist", choices=["mnist", "mnist1d"],
                   help="dataset (exact-gn and conditioning; nme uses it for its inputs too)")
    p.add_argument("--data-dir", default=None,
                   help="directory of MNIST-format IDX files (train-*/t10k-* pairs, or only the "
                        "t10k-* pair, which is then split); default $GNREV_DATA_DIR or "
                        "../shared/data/mnist")
    p.add_argument("--device", default="cpu",
                   help="torch device of every run's spec (cpu, cuda, cuda:1, ...); a device "
                        "this machine lacks fails each run with a clear error")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) (seeds are always fixed); "
                        "the same numbers need the same --threads, versions and hardware "
                        "(gnrev_plugin.engine.provenance)")


def run(args: argparse.Namespace) -> int:
    import torch

    from gnrev_plugin.build import resolve_device
    from gnrev_plugin.experiments.catalog import EXPERIMENTS

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "deterministic", False):
        from gnrev_plugin.engine.provenance import enable_determinism
        enable_determinism()
    out = Path(args.out) if args.out else Path("runs") / (
        f"{args.experiment}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and not (out / "config.json").exists():
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no config.json)")
    if not (args.resume or args.overwrite) and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the runs in it, "
                              "--overwrite to replace them, or a new --out directory")
    t0 = time.perf_counter()
    progress = not args.no_progress

    experiment = EXPERIMENTS[args.experiment]
    try:
        device = str(resolve_device(args.device))  # a missing GPU is refused before any run
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r} is not a torch device: {err}") from None
    print(f"gnrev reproduce {args.experiment} ({experiment.paper}): preset {args.preset}, data "
          f"{args.data}, device {device} -> {out}", flush=True)
    statuses = experiment.run(out, preset_name=args.preset, data=args.data,
                              data_dir=args.data_dir, resume=args.resume, progress=progress,
                              device=device)
    failed = [s for s in statuses if s["status"] != "ok"]
    print(f"wrote {out / 'report.md'} and {out / 'figures'}/ in "
          f"{time.perf_counter() - t0:.0f}s ({len(statuses) - len(failed)} runs ok, "
          f"{len(failed)} failed)")
    for s in failed:
        print(f"  failed: {s['run']}: {s['error']}")
    return 1 if failed else 0
