"""``gnrev list``: every discovered model, optimizer, metric and dataset, with its distribution."""

from __future__ import annotations

import argparse
import warnings

from tabulate import tabulate

from ..registry import ENTRY_POINT_GROUP, KINDS, PluginError, PluginWarning, discover

NAME = "list"
HELP = (f"list the models, optimizers, metrics and datasets of every installed plugin "
        f"(entry-point group {ENTRY_POINT_GROUP!r})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=list(KINDS), help="only this kind of entry")
    parser.add_argument("--check", action="store_true",
                        help="import every entry's target and report whether it loads")
    parser.add_argument("--tablefmt", default="simple", help="tabulate table format")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 if a plugin was skipped or an entry fails --check")


def _contract(e) -> str:
    """What a runner needs to know: a metric's protocol, an optimizer's needs, the defaults."""
    parts = []
    if e.kind == "metric":
        parts.append(f"{e.protocol} metric")
    if e.needs:
        parts.append("needs " + "+".join(e.needs))
    if e.defaults:
        parts.append(" ".join(f"{k}={v}" for k, v in e.defaults.items()))
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # the problems are printed below the table instead
        warnings.simplefilter("ignore", PluginWarning)
        reg = discover()
    headers = ["kind", "name", "description", "contract", "tags", "target", "distribution"]
    if args.check:
        headers.append("status")
    rows, failed = [], 0
    for e in reg.list(args.kind):
        row = [e.kind, e.name, e.description, _contract(e), ",".join(e.tags), e.target,
               f"{e.distribution} {e.version}".strip()]
        if args.check:
            try:
                e.resolve()
                row.append("ok")
            except PluginError as err:
                failed += 1
                row.append(f"unavailable: {err.__cause__!r}"[:80])
        rows.append(row)
    print(tabulate(rows, headers=headers, tablefmt=args.tablefmt))
    plugins = ", ".join(f"{s.plugin} ({s.distribution} {s.version})" for s in reg.sources)
    print(f"\n{len(rows)} entries from {len(reg.sources)} plugin(s): {plugins or 'none'}")
    if reg.problems:
        print(f"\n{len(reg.problems)} plugin(s) reported and skipped:")
        for p in reg.problems:
            print(f"  {p}")
    return 1 if args.strict and (reg.problems or failed) else 0
