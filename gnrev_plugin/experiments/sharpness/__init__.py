"""``gnrev reproduce sharpness`` (Dauphin, Agarwala & Mobahi, NeurIPS 2024): :mod:`.run` trains the
registry-built MLPs with SGD, SAM, PSAM, weight noise and the Hessian- and GN-trace penalties
(:mod:`gnrev_plugin.optim.regularizers`) over ρ / σ² sweeps and logs accuracy and the
``H = G + NME`` traces; :mod:`.report` rebuilds figures and ``report.md`` from the logs."""

from .report import build_sharpness_report
from .run import run_sharpness, sharpness_configs, sharpness_spec

__all__ = ["run_sharpness", "build_sharpness_report", "sharpness_spec", "sharpness_configs"]
