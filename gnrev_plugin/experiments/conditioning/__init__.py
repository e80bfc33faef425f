"""``gnrev reproduce conditioning`` (Zhao, Singh & Lucchi, NeurIPS 2024): :mod:`.run` computes the
spectra and trains the registry-built two-layer nets, :mod:`.report` rebuilds figures and
``report.md`` from the logs."""

from .report import build_conditioning_report
from .run import kaiming_linear_weights, run_conditioning, training_spec

__all__ = ["run_conditioning", "build_conditioning_report", "kaiming_linear_weights",
           "training_spec"]
