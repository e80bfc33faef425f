"""``gnrev algoperf export DIR [--optimizer NAME] [--opt K=V ...]``: write an AlgoPerf submission
folder for a registered optimizer.

The folder holds ``submission.py`` (the five PyTorch submission functions of
:mod:`gnrev_plugin.hosts.algoperf`, bound to the optimizer's registry name and the fixed options),
``submission_info.yml`` and, for the external-tuning ruleset, ``tuning_search_space.json``. The
default optimizer is ``gnrev.dense_gn`` (AlgoPerf's workloads are not RevMLPs; ``gnrev.exact_gn``
when the model is one); any registered name works, e.g. a plugin's ``toy.sign_sgd``. Run it with
AlgoPerf's runner::

    python submission_runner.py --framework=pytorch --workload=mnist \\
        --submission_path=DIR/submission.py --tuning_search_space=DIR/tuning_search_space.json \\
        --experiment_dir=/tmp/exp --experiment_name=gnrev
"""

from __future__ import annotations

import argparse

from gnrev_plugin.build import parse_options
from gnrev_plugin.hosts.algoperf import DEFAULT_OPTIMIZER, export_submission
from gnrev_plugin.registry import PluginError

NAME = "algoperf"
HELP = "AlgoPerf integration: export a submission folder (submission.py, info, search space)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="algoperf_command", required=True, metavar="ACTION")
    p = sub.add_parser("export", help="write the submission folder to DIR")
    p.add_argument("dir", metavar="DIR", help="destination folder (created)")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, metavar="NAME",
                   help="registered optimizer (gnrev list; the gnrev. prefix is optional; "
                        f"default {DEFAULT_OPTIMIZER})")
    p.add_argument("--opt", action="append", default=[], metavar="K=V",
                   help="fixed optimizer option (repeatable; values read as JSON); AlgoPerf "
                        "tunes learning_rate, passed as lr")
    p.add_argument("--name", default=None,
                   help="submission name (default gnrev_<optimizer>)")
    p.add_argument("--authors", default="gnrev-plugin developers")
    p.add_argument("--affiliations", default="")
    p.add_argument("--ruleset", choices=("external", "self"), default="external",
                   help="AlgoPerf tuning ruleset (self-tuning writes no search space)")
    p.add_argument("--force", action="store_true", help="overwrite an existing submission")


def run(args: argparse.Namespace) -> int:
    try:
        paths = export_submission(args.dir, name=args.name, optimizer=args.optimizer,
                                  optimizer_kwargs=parse_options(args.opt),
                                  authors=args.authors, affiliations=args.affiliations,
                                  ruleset=args.ruleset, overwrite=args.force)
    except (FileExistsError, PluginError) as err:  # PluginError: an unknown or broken name
        raise ValueError(str(err)) from err
    for path in paths:
        print(f"wrote {path}")
    return 0
