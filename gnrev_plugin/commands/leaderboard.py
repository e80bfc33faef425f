"""``gnrev leaderboard``: tables of best test accuracy / loss and time to a target loss from
benchopt results, DeepOBS result folders and gnrev run logs; merge GN rows into an existing
leaderboard.

Examples::

    gnrev leaderboard bench/outputs/tiny.parquet --md board.md --csv board.csv
    gnrev leaderboard results/ runs/ --target-loss 0.5
    gnrev leaderboard results/ --merge LEADERBOARD.md --out LEADERBOARD.md \\
        --map "Test acc.=best_test_acc"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gnrev_plugin.hosts.leaderboard import (
    METRICS,
    format_csv,
    format_markdown,
    is_gn_optimizer,
    load_results,
    merge_into_table,
    summarize,
)

NAME = "leaderboard"
HELP = "leaderboard tables from benchopt / DeepOBS / gnrev results; merge GN rows into a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="benchopt .parquet/.csv files; folders of DeepOBS JSON results "
                             "or gnrev run directories (searched recursively)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="train-loss target for time/epochs/steps to target (default: the "
                             "best loss every run reaches)")
    parser.add_argument("--problem", default=None,
                        help="keep only problems whose name contains this text")
    parser.add_argument("--md", metavar="FILE", help="write the table as Markdown")
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    parser.add_argument("--merge", metavar="TABLE",
                        help="existing leaderboard (.csv or Markdown) to add rows to; its "
                             "columns and rows are kept as they are")
    parser.add_argument("--out", metavar="FILE",
                        help="where to write the merged table (default: print it)")
    parser.add_argument("--rows", choices=("gn", "all"), default="gn",
                        help="which optimizers to merge (default: Gauss-Newton rows only)")
    parser.add_argument("--map", action="append", default=[], metavar="COLUMN=METRIC",
                        help=f"put METRIC under COLUMN when merging; metrics: {', '.join(METRICS)}")
    parser.add_argument("--percent", action=argparse.BooleanOptionalAction, default=None,
                        help="write accuracies in percent when merging (default: auto)")


def _parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        col, sep, metric = item.rpartition("=")
        if not sep or not col:
            raise ValueError(f"--map expects COLUMN=METRIC, got {item!r}")
        out[col.strip()] = metric.strip()
    return out


def run(args: argparse.Namespace) -> int:
    curves = load_results(args.sources)
    if args.problem:
        curves = [c for c in curves if args.problem in c.problem]
        if not curves:
            raise ValueError(f"no results for a problem containing {args.problem!r}")
    rows = summarize(curves, target_loss=args.target_loss)
    print(format_markdown(rows))
    if args.md:
        Path(args.md).write_text(format_markdown(rows) + "\n")
        print(f"wrote {args.md}")
    if args.csv:
        Path(args.csv).write_text(format_csv(rows))
        print(f"wrote {args.csv}")
    if args.merge:
        chosen = rows if args.rows == "all" else [r for r in rows if is_gn_optimizer(r["optimizer"])]
        if not chosen:
            raise ValueError("no Gauss-Newton rows to merge (use --rows all to merge every row)")
        merged = merge_into_table(args.merge, chosen, _parse_map(args.map), args.percent)
        if args.out:
            Path(args.out).write_text(merged)
            print(f"merged {len(chosen)} row(s) into {args.out}")
        else:
            print(merged, end="")
    return 0
