"""``gnrev benchopt``: write the shipped benchopt benchmark, or print a solver file for ``-s PATH``.

* ``gnrev benchopt init DIR [--force]``: copy the benchmark (objective, datasets mnist / mnist1d /
  simulated, solvers ExactGN / DenseGN / Adam / SGD) to ``DIR``; then
  ``benchopt run DIR -n 2 -r 1 --no-plot``.
* ``gnrev benchopt solver-path NAME``: print the absolute path of a solver file, for benchopt's file
  selector: ``benchopt run BENCH -s "$(gnrev benchopt solver-path ExactGN)[lr=0.5]"``.
"""

from __future__ import annotations

import argparse

from gnrev_plugin.hosts.benchopt import SOLVER_FILES, init_benchmark, solver_path

NAME = "benchopt"
HELP = "benchopt integration: write the GN benchmark folder, or print a solver file path"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchopt_command", required=True, metavar="ACTION")
    p_init = sub.add_parser("init", help="write the benchopt benchmark folder to DIR")
    p_init.add_argument("dir", metavar="DIR", help="destination folder (created)")
    p_init.add_argument("--force", action="store_true",
                        help="overwrite the files of an existing benchmark in DIR")
    p_path = sub.add_parser("solver-path",
                            help="print a solver file path for `benchopt run BENCH -s PATH`")
    p_path.add_argument("name", metavar="NAME",
                        help=f"solver name: {', '.join(SOLVER_FILES)}")


def run(args: argparse.Namespace) -> int:
    if args.benchopt_command == "init":
        try:
            dest = init_benchmark(args.dir, overwrite=args.force)
        except FileExistsError as err:
            raise ValueError(str(err)) from err
        print(f"wrote the gnrev benchopt benchmark to {dest}")
        print(f"run it with:  benchopt run {dest} -n 2 -r 1 --no-plot")
        return 0
    print(solver_path(args.name))
    return 0
