"""``gnrev reproduce exact-gn`` (Buffelli et al., NeurIPS 2024): :mod:`.run` trains the sweep
through the registry, :mod:`.report` rebuilds figures and ``report.md`` from its logs."""

from .report import build_exact_gn_report
from .run import REFERENCE_LR, SETTINGS, exact_gn_run_specs, reference_lr, run_exact_gn

__all__ = ["run_exact_gn", "build_exact_gn_report", "exact_gn_run_specs", "reference_lr",
           "REFERENCE_LR", "SETTINGS"]
