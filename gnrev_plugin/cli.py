"""The ``gnrev`` command line. Each subcommand lives in ``gnrev_plugin/commands/<name>.py``.

A command module defines ``NAME`` (the subcommand), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. The CLI sits on top of everything else: nothing
in the package imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

#: OpenMP's idle threads sleep instead of spinning (unless the user set ``OMP_WAIT_POLICY``). Set
#: here, before anything imports torch, because the OpenMP runtime reads it once when it loads.
#: Spinning threads make torch's many small parallel regions collapse when the cores are shared:
#: measured on 2 cores beside one busy process, the README's ``gnrev train`` took 101 s spinning
#: and 17 s sleeping (one laziness-sweep run: 43 s and 7.4 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Command modules, in the order ``gnrev --help`` lists them.
COMMAND_MODULES = (
    "train",
    "reproduce",
    "report",
    "list",
    "benchopt",
    "algoperf",
    "leaderboard",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gnrev",
        description="Exact Gauss-Newton in reversible networks: training, reproduction of the "
        "seed papers, plugin discovery and benchmark-runner adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"gnrev_plugin.commands.{name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"gnrev {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged run (the engine's check, NonFiniteError)
        print(f"gnrev {args.command}: error: the run diverged: {err}; the log and the last "
              "finite checkpoint are kept; try a smaller --opt lr (or damping for GN)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
