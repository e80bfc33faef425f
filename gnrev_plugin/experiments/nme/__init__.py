"""``gnrev reproduce nme`` (Dauphin, Agarwala & Mobahi, NeurIPS 2024): :mod:`.run` trains the
registry-built MLPs and logs the ``H = G + NME`` split, :mod:`.report` rebuilds figures and
``report.md`` from the logs."""

from .report import build_nme_report
from .run import curvature_row, nme_spec, run_nme

__all__ = ["run_nme", "build_nme_report", "nme_spec", "curvature_row"]
