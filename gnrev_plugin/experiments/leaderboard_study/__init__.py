"""``gnrev reproduce leaderboard``: Gauss-Newton against the field (exact GN, Hessian-free, KFAC,
Shampoo, SOAP, PSGD, Muon, AdamW, Adam, SGD), tuned alike and scored as AlgoPerf does.

(The package is not called ``leaderboard``: :mod:`gnrev_plugin.experiments.leaderboard` is the
table reader behind ``gnrev leaderboard``, which also merges this study's rows into a table.)
"""

from .presets import LEADERBOARD_PRESETS, get_leaderboard_preset
from .report import build_leaderboard_study_report
from .run import run_leaderboard_study

__all__ = ["LEADERBOARD_PRESETS", "get_leaderboard_preset", "run_leaderboard_study",
           "build_leaderboard_study_report"]
