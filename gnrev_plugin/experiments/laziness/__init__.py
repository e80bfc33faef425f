"""``gnrev reproduce laziness`` (is exact GN lazy? Buffelli et al., NeurIPS 2024, Fig. 4):
:mod:`.run` trains the one-factor-at-a-time sweep through the registry, :mod:`.report` rebuilds
``laziness.csv``, the figures and ``report.md`` (a map of where each laziness claim holds) from
its logs."""

from .report import build_laziness_report
from .run import INITS, init_std, laziness_configs, laziness_run_specs, run_laziness

__all__ = ["run_laziness", "build_laziness_report", "laziness_configs", "laziness_run_specs",
           "init_std", "INITS"]
