r"""Ablating the activation NME: each elementwise activation replaced by its tangent at ``θ``.

.. math::

    \tilde φ(h) = φ(h_0) + φ'(h_0)(h - h_0), \qquad \tilde φ'' = 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import jvp

from ...nn.dauphin_activations import BetaGELU, NMEAblatedActivation, SyntheticNMEReLU
from ..capture import suspended

__all__ = ["ActivationLinearisation", "ELEMENTWISE_ACTIVATIONS", "Record"]

#: Module types treated as elementwise activations by ``ablate_nme=True``.
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, BetaGELU, NMEAblatedActivation, SyntheticNMEReLU,
)

Record = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ActivationLinearisation:
    r"""Replace each elementwise activation by its tangent at reference pre-activations.

    :meth:`record` runs the model once on ``x`` (no autograd) and stores, for every activation
    call in order, ``(h₀, φ(h₀), φ'(h₀))`` (``φ'`` by ``torch.func.jvp`` of the module's
    ``forward`` with a tangent of ones, exact for elementwise ``φ``). Inside :meth:`installed`,
    after :meth:`use` ``(records)``, the activations return ``φ(h₀) + φ'(h₀)(h − h₀)`` instead
    of ``φ(h)``; the records may also be per-example slices (inside ``vmap`` over the batch).

    Raises:
        ValueError: the model has no :data:`ELEMENTWISE_ACTIVATIONS` module, or one is in-place.

    Args:
        model: The model.
        types: Module classes treated as elementwise activations :math:`\varphi`.
    """

    def __init__(self, model: nn.Module,
                 types: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, types)]
        if not self.modules:
            raise ValueError(
                "ablate_nme=True needs the model's activations as nn.Module instances (e.g. "
                "gnrev.mlp's nn.GELU / BetaGELU); found none in "
                f"{type(model).__name__}. Functional activations inside forward() cannot be "
                "linearised")
        inplace = [type(m).__name__ for m in self.modules if getattr(m, "inplace", False)]
        if inplace:
            raise ValueError(f"ablate_nme=True cannot linearise in-place activations {inplace}")
        self.model = model
        self._records: list[Record] | None = None
        self._next = 0

    def record(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Record]]:
        r"""One forward pass on ``x`` without autograd: ``(output, records)``.

        Args:
            x: Input batch.

        Returns:
            ``(output, records)`` with one :math:`(h_0, \varphi(h_0), \varphi'(h_0))` per activation call.
        """
        records: list[Record] = []

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            h0 = args[0].detach()
            value, slope = jvp(module.forward, (h0,), (torch.ones_like(h0),))
            records.append((h0, value.detach(), slope.detach()))

        handles = [m.register_forward_hook(hook) for m in self.modules]
        try:
            with torch.no_grad(), suspended():
                out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return out, records

    @contextmanager
    def installed(self) -> Iterator[ActivationLinearisation]:
        """Within this context the activations use the records set by :meth:`use` (and behave
        normally while none are set).

        Yields:
            This object.
        """
        handles = [m.register_forward_hook(self._replay) for m in self.modules]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._records = None

    def use(self, records: list[Record] | None) -> None:
        """Set the records the next forward pass replays (``None``: plain activations).

        Args:
            records: Records from :meth:`record` (or slices of them), or ``None``.
        """
        self._records, self._next = records, 0

    def _replay(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self._records is None:
            return None
        if self._next >= len(self._records):
            raise RuntimeError("the forward pass called more activations than were recorded")
        h0, value, slope = self._records[self._next]
        self._next += 1
        h = args[0]
        if h0.dim() > h.dim() or tuple(h.shape[h.dim() - h0.dim():]) != tuple(h0.shape):
            raise RuntimeError(f"activation input of shape {tuple(h.shape)} does not match the "
                               f"recorded pre-activation {tuple(h0.shape)}")
        return value + slope * (h - h0)

