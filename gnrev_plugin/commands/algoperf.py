"""``gnrev algoperf export DIR``: write an AlgoPerf submission folder for exact Gauss-Newton.

The folder holds ``submission.py`` (the five PyTorch submission functions, imported from
:mod:`gnrev_plugin.hosts.algoperf`), ``submission_info.yml`` and, for the external-tuning
ruleset, ``tuning_search_space.json``. Run it with AlgoPerf's runner::

    python submission_runner.py --framework=pytorch --workload=mnist \\
        --submission_path=DIR/submission.py --tuning_search_space=DIR/tuning_search_space.json \\
        --experiment_dir=/tmp/exp --experiment_name=gnrev
"""

from __future__ import annotations

import argparse

from gnrev_plugin.hosts.algoperf import export_submission

NAME = "algoperf"
HELP = "AlgoPerf integration: export a submission folder (submission.py, info, search space)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="algoperf_command", required=True, metavar="ACTION")
    p = sub.add_parser("export", help="write the submission folder to DIR")
    p.add_argument("dir", metavar="DIR", help="destination folder (created)")
    p.add_argument("--name", default="gnrev_exact_gn", help="submission name")
    p.add_argument("--authors", default="gnrev-plugin developers")
    p.add_argument("--affiliations", default="")
    p.add_argument("--ruleset", choices=("external", "self"), default="external",
                   help="AlgoPerf tuning ruleset (self-tuning writes no search space)")
    p.add_argument("--force", action="store_true", help="overwrite an existing submission")


def run(args: argparse.Namespace) -> int:
    try:
        paths = export_submission(args.dir, name=args.name, authors=args.authors,
                                  affiliations=args.affiliations, ruleset=args.ruleset,
                                  overwrite=args.force)
    except FileExistsError as err:
        raise ValueError(str(err)) from err
    for path in paths:
        print(f"wrote {path}")
    return 0
