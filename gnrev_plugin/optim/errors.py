"""Exceptions raised by the Gauss-Newton optimizers. Parameters are never changed when one is raised."""

__all__ = ["GNError", "RankDeficiencyError", "NonFiniteError", "LossCaptureError"]


class GNError(RuntimeError):
    """Base class: the requested Gauss-Newton step could not be taken as specified."""


class RankDeficiencyError(GNError):
    r"""The step's linear systems are rank-deficient, so :math:`J \Delta\theta = \text{target}` cannot hold
    exactly."""


class NonFiniteError(GNError, FloatingPointError):
    """The loss, the Newton target or the computed update is not finite."""


class LossCaptureError(GNError):
    """The drop-in path could not identify the loss applied to the model output."""
