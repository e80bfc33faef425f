"""Gauss-Newton optimizers: :class:`ExactGN` for reversible nets, :class:`DenseGN` for any module;
sharpness regularisers (:mod:`~gnrev_plugin.optim.regularizers`): :class:`SAM`, :class:`PSAM`,
:class:`WeightNoise`, :class:`HessianTracePenalty`, :class:`GNTracePenalty`."""

from .dense_gn import DenseGN
from .errors import GNError, LossCaptureError, NonFiniteError, RankDeficiencyError
from .exact_gn import ExactGN, exact_gn_direction
from .regularizers import PSAM, SAM, GNTracePenalty, HessianTracePenalty, WeightNoise

__all__ = ["ExactGN", "DenseGN", "exact_gn_direction", "GNError", "LossCaptureError",
           "NonFiniteError", "RankDeficiencyError",
           "SAM", "PSAM", "WeightNoise", "HessianTracePenalty", "GNTracePenalty"]
