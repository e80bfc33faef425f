"""``gnrev benchopt``: write the shipped benchopt benchmark, or a solver file for ``-s PATH``.

* ``gnrev benchopt init DIR [--force]``: copy the benchmark (objective, datasets mnist / mnist1d /
  simulated) to ``DIR`` and write one solver per registered optimizer, named by its registry
  name; then ``benchopt run DIR -s gnrev.exact_gn -n 2 -r 1 --no-plot``.
* ``gnrev benchopt solver-path NAME``: write and print a solver file for registry optimizer
  ``NAME``, for benchopt's file selector:
  ``benchopt run BENCH -s "$(gnrev benchopt solver-path gnrev.exact_gn)[lr=0.5]"``.
"""

from __future__ import annotations

import argparse

NAME = "benchopt"
HELP = "benchopt integration: write the benchmark folder, or print a solver file path"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchopt_command", required=True, metavar="ACTION")
    p_init = sub.add_parser("init", help="write the benchopt benchmark folder to DIR")
    p_init.add_argument("dir", metavar="DIR", help="destination folder (created)")
    p_init.add_argument("--force", action="store_true",
                        help="overwrite the files of an existing benchmark in DIR")
    p_path = sub.add_parser("solver-path",
                            help="print a solver file path for `benchopt run BENCH -s PATH`")
    p_path.add_argument("name", metavar="NAME",
                        help="registered optimizer (see `gnrev list`; gnrev. optional)")


def run(args: argparse.Namespace) -> int:
    from gnrev_plugin.hosts.benchopt import init_benchmark, solver_path
    from gnrev_plugin.registry import UnknownNameError, get_registry

    if args.benchopt_command == "init":
        try:
            dest = init_benchmark(args.dir, overwrite=args.force)
        except FileExistsError as err:
            raise ValueError(str(err)) from err
        names = get_registry().names("optimizer")
        print(f"wrote the gnrev benchopt benchmark to {dest} with solvers {', '.join(names)}")
        print(f"run it with:  benchopt run {dest} -s {names[0]} -n 2 -r 1 --no-plot")
        return 0
    try:
        print(solver_path(args.name))
    except UnknownNameError as err:
        raise ValueError(str(err)) from err
    return 0
