"""Gauss-Newton optimizers: :class:`ExactGN` for reversible nets, :class:`DenseGN` for any module."""

from .errors import GNError, LossCaptureError, NonFiniteError, RankDeficiencyError
from .exact_gn import ExactGN, exact_gn_direction

__all__ = ["ExactGN", "exact_gn_direction", "GNError", "LossCaptureError", "NonFiniteError",
           "RankDeficiencyError"]

try:  # DenseGN lands in its own module
    from .dense_gn import DenseGN  # noqa: F401

    __all__.append("DenseGN")
except ModuleNotFoundError as err:  # pragma: no cover
    if err.name != f"{__name__}.dense_gn":
        raise
