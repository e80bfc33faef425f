"""``gnrev list``: every discovered model, optimizer, metric and dataset, with its distribution."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
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


#: The columns that wrap to fit the terminal, with their share of the room left by the others.
_WRAPPED = {"description": 0.4, "contract": 0.25, "tags": 0.15, "target": 0.2}


#: Left out, in this order, while the terminal is too narrow for the table even wrapped (the
#: distributions are listed below the table anyway).
_DROPPED_FIRST = ("distribution", "target", "tags")


def fit_table(rows: list[list[str]], headers: list[str], tablefmt: str, width: int) -> str:
    """The table, its long text columns wrapped so that no line is wider than ``width``.

    Args:
        rows: the cells.
        headers: the column names.
        tablefmt: the tabulate format.
        width: the terminal's width (:func:`shutil.get_terminal_size`).

    Returns:
        The table text (on a narrow terminal without the columns of :data:`_DROPPED_FIRST`,
        in that order, as long as it is still too narrow); a line is cut at ``width`` (ending
        in ``…``) only if wrapping cannot make it fit.
    """
    text = tabulate(rows, headers=headers, tablefmt=tablefmt)
    if max(map(len, text.splitlines()), default=0) <= width:
        return text
    natural = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    fixed = sum(n for h, n in zip(headers, natural, strict=True) if h not in _WRAPPED)
    wrapped = [h for h in headers if h in _WRAPPED]
    for drop in _DROPPED_FIRST:     # too narrow even wrapped: leave out the least useful column
        if fixed + 10 * len(wrapped) + 2 * len(headers) <= width or drop not in headers:
            continue
        i = headers.index(drop)
        headers = headers[:i] + headers[i + 1:]
        rows = [r[:i] + r[i + 1:] for r in rows]
        fixed -= 0 if drop in _WRAPPED else natural[i]
        wrapped = [h for h in headers if h in _WRAPPED]
        natural = natural[:i] + natural[i + 1:]
    room = max(0, width - fixed - 2 * len(headers))
    share = sum(_WRAPPED[h] for h in wrapped) or 1.0
    limits = [max(8, int(room * _WRAPPED[h] / share)) if h in _WRAPPED else None for h in headers]
    text = tabulate(rows, headers=headers, tablefmt=tablefmt, maxcolwidths=limits)
    return "\n".join(line if len(line) <= width else line[:width - 1] + "…"
                     for line in text.splitlines())


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
    width = None
    if sys.stdout.isatty() or "COLUMNS" in os.environ:   # a terminal: fit its width
        width = shutil.get_terminal_size().columns
        print(fit_table(rows, headers, args.tablefmt, width))
    else:                                                 # a pipe or file: whole lines
        print(tabulate(rows, headers=headers, tablefmt=args.tablefmt))

    def say(text: str, indent: str = "") -> None:
        print("\n".join(textwrap.wrap(text, width, initial_indent=indent,
                                       subsequent_indent=indent + "  ")) if width else indent + text)
    plugins = ", ".join(f"{s.plugin} ({s.distribution} {s.version})" for s in reg.sources)
    print()
    say(f"{len(rows)} entries from {len(reg.sources)} plugin(s): {plugins or 'none'}")
    if reg.problems:
        print(f"\n{len(reg.problems)} plugin(s) reported and skipped:")
        for p in reg.problems:
            say(str(p), "  ")
    return 1 if args.strict and (reg.problems or failed) else 0
