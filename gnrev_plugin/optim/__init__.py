"""Gauss-Newton optimizers: :class:`ExactGN` for reversible nets, :class:`DenseGN` for any module."""

from .dense_gn import DenseGN
from .errors import GNError, LossCaptureError, NonFiniteError, RankDeficiencyError
from .exact_gn import ExactGN, exact_gn_direction

__all__ = ["ExactGN", "DenseGN", "exact_gn_direction", "GNError", "LossCaptureError",
           "NonFiniteError", "RankDeficiencyError"]
