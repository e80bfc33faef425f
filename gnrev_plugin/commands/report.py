"""``gnrev report RUN_DIR``: rebuild a reproduction's figures and ``report.md`` from its logs."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "rebuild figures and report.md of a `gnrev reproduce` directory from its JSONL logs alone"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the --out directory of a `gnrev reproduce` run")


def run(args: argparse.Namespace) -> int:
    from gnrev_plugin.experiments.catalog import build_report

    path = build_report(args.run_dir)
    print(f"wrote {path} and {path.parent / 'figures'}/")
    return 0
