"""RevMLP: the reversible MLP of Buffelli et al. (NeurIPS 2024), with its paper presets.

``X^(0) = X`` (flattened, ``d`` even), ``X^(ℓ) = B_ℓ(X^(ℓ−1))`` for ``ℓ = 1..L`` with
:class:`~gnrev_plugin.nn.coupling.AdditiveCoupling` blocks, and logits ``F = X^(L) U`` where
``U ∈ R^{d×C}`` is a fixed random matrix with orthonormal columns (the Q of a QR factorisation of
a Gaussian matrix; a buffer). With ``num_classes=None`` there is no readout and ``F = X^(L)``.

The reference code (github.com/mtkresearch/exact_GN_revNN) makes block 1 linear (``σ = identity``);
``linear_first_block=True`` reproduces that. A linear block's GN systems have rank ≤ ``d/2 + 1``, so
for batches larger than that the block cannot reproduce an arbitrary target on its own (see
``docs/exact_gn.md``); :class:`~gnrev_plugin.optim.ExactGN` then lets the full-rank blocks carry it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..compat.backpack import opt_out_of_extend
from .activations import Activation, get_activation
from .coupling import AdditiveCoupling, BlockActivations
from .discovery import find_module_owning

__all__ = ["RevMLP", "PRESETS", "revmlp_from_preset", "find_revmlp_owning"]


class RevMLP(nn.Module):
    """A stack of ``num_blocks`` additive coupling blocks with an optional orthonormal readout.

    Args:
        in_features: ``d``, the flattened input width (even; MNIST 784, CIFAR-10 3072).
        hidden: ``M``, the width of every half-layer's random projection (paper: 8000).
        num_blocks: ``L`` (paper: 2 for MNIST, 6 for CIFAR-10).
        num_classes: ``C`` for the fixed readout ``U ∈ R^{d×C}``; ``None`` for no readout.
        activation: ``σ`` of the nonlinear blocks (default ``"relu"``).
        linear_first_block: make block 1 linear, as the reference code does.
        init_std: std of the trained weights ``W`` at initialisation (paper: 1e-3); biases are 0.
        proj_gain: the projections ``C`` have entries ``N(0, proj_gain²/M)``.
        seed: seed for a private generator (``None``: the global RNG).
        dtype: parameter/buffer dtype (default: torch's default dtype). ``.double()`` also works.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_blocks: int,
        num_classes: int | None = None,
        activation: str | Activation = "relu",
        linear_first_block: bool = True,
        init_std: float = 1e-3,
        proj_gain: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 2 or in_features % 2:
            raise ValueError(f"in_features must be even and ≥ 2, got {in_features}")
        if hidden < 1 or num_blocks < 1:
            raise ValueError(f"hidden and num_blocks must be ≥ 1, got {hidden}, {num_blocks}")
        if num_classes is not None and not 1 <= num_classes <= in_features:
            raise ValueError(f"num_classes must be in [1, in_features={in_features}], "
                             f"got {num_classes}")
        activation = get_activation(activation)  # validate even if only block 1 (linear) exists
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.hidden, self.num_blocks = in_features, hidden, num_blocks
        self.num_classes = num_classes
        self.linear_first_block = linear_first_block
        self.config = dict(in_features=in_features, hidden=hidden, num_blocks=num_blocks,
                           num_classes=num_classes, activation=activation.name,
                           linear_first_block=linear_first_block, init_std=init_std,
                           proj_gain=proj_gain, seed=seed)
        self.blocks = nn.ModuleList(
            AdditiveCoupling(in_features, hidden,
                             "identity" if (i == 0 and linear_first_block) else activation,
                             init_std=init_std, proj_gain=proj_gain, generator=gen, dtype=dtype)
            for i in range(num_blocks)
        )
        for block in self.blocks:  # the readout is no module: BackPACK sees the RevMLP as one leaf
            opt_out_of_extend(block)
        if num_classes is None:
            self.register_buffer("readout", None)
        else:
            q, _ = torch.linalg.qr(torch.randn(in_features, num_classes, generator=gen,
                                               dtype=torch.float64))
            self.register_buffer("readout", q.to(dtype))
        #: When True, ``forward`` keeps the per-block :class:`BlockActivations` of its last call in
        #: ``last_activations`` (used by the drop-in ExactGN step; the tensors are the ones autograd
        #: saves anyway).
        self.record_activations = False
        self.last_activations: list[BlockActivations] | None = None

    # ------------------------------------------------------------------ forward / inverse
    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as rows ``(n, d)``: ``(n, d)`` as is, ``(n, *image)`` flattened.

        Args:
            x: a batch tensor of at least two dimensions whose trailing ones hold ``d`` values.

        Returns:
            ``x.reshape(n, -1)``, checked against the model's ``in_features`` (a clear error
            for a non-tensor, an empty or integer batch, or a width mismatch).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RevMLP expects a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"RevMLP expects a batch (n, {self.in_features}) or (n, *image), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("RevMLP got an empty batch (0 samples)")
        if not x.is_floating_point():
            raise ValueError(f"RevMLP expects floating-point inputs, got {x.dtype} (convert with "
                             ".float() or .to(model's dtype))")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"RevMLP was built for in_features={self.in_features}, but the input "
                             f"has {x.shape[1]} features per sample")
        return x

    def features_with_activations(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[BlockActivations]]:
        """``X^(L)`` and every block's :class:`BlockActivations`.

        Args:
            x: Input batch, ``(n, d)`` or ``(n, *image)``.

        Returns:
            ``(X^(L), [acts_1, ..., acts_L])``.
        """
        z = self.flatten_input(x)
        acts = []
        for block in self.blocks:
            z, a = block.forward_with_activations(z)
            acts.append(a)
        return z, acts

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``X^(L)``, the output of the last block (before the readout).

        Args:
            x: Input batch, ``(n, d)`` or ``(n, *image)``.

        Returns:
            :math:`X^{(L)}`, ``(n, d)``.
        """
        z = self.flatten_input(x)
        for block in self.blocks:
            z = block(z)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits :math:`F = X^{(L)} U`.

        Args:
            x: Input batch, ``(n, d)`` or ``(n, *image)``.

        Returns:
            :math:`F`, ``(n, C)``.

        Raises:
            TypeError: If ``x`` is not a tensor.
            ValueError: For an empty, non-floating or wrongly shaped batch.
        """
        if self.record_activations:
            z, acts = self.features_with_activations(x)
            self.last_activations = acts
        else:
            z = self.features(x)
        return z if self.readout is None else z @ self.readout

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`features`: ``inverse(features(X)) == X`` (flattened).

        The readout ``U`` maps ``d → C < d`` and is not invertible, so ``z`` must be ``X^(L)``.

        Args:
            z: :math:`X^{(L)}`, ``(n, d)``.

        Returns:
            :math:`X`, ``(n, d)``.

        Raises:
            ValueError: If ``z`` is not ``(n, d)``.
        """
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(f"inverse expects X^(L) of shape (n, {self.in_features}); got "
                             f"{tuple(z.shape)} (logits cannot be inverted through the readout)")
        for block in reversed(self.blocks):
            z = block.inverse(z)
        return z

    def extra_repr(self) -> str:
        """Module repr.

        Returns:
            :math:`d`, :math:`M`, :math:`L`, :math:`C` and ``linear_first_block``.
        """
        return (f"d={self.in_features}, M={self.hidden}, L={self.num_blocks}, "
                f"C={self.num_classes}, linear_first_block={self.linear_first_block}")


#: Paper and test presets. ``mnist_paper``/``cifar10_paper`` follow the released configs
#: (``M = 8000``, 2 / 6 blocks, linear first block, ``init_std = 1e-3``, 10 classes).
PRESETS: dict[str, dict] = {
    "mnist_paper": dict(in_features=784, hidden=8000, num_blocks=2, num_classes=10),
    "cifar10_paper": dict(in_features=3072, hidden=8000, num_blocks=6, num_classes=10),
    "mnist_small": dict(in_features=784, hidden=2000, num_blocks=2, num_classes=10),
    "small": dict(in_features=64, hidden=256, num_blocks=3, num_classes=10),
    "tiny": dict(in_features=6, hidden=12, num_blocks=3, num_classes=3,
                 linear_first_block=False, init_std=0.3),
}


def revmlp_from_preset(name: str, **overrides) -> RevMLP:
    """Instantiate ``RevMLP(**PRESETS[name] | overrides)``.

    Args:
        name: A key of :data:`PRESETS`.
        **overrides: Constructor arguments that replace the preset's.

    Returns:
        The model.

    Raises:
        ValueError: For an unknown preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown RevMLP preset {name!r}; known: {sorted(PRESETS)}")
    return RevMLP(**{**PRESETS[name], **overrides})


def revmlp_preset_factory(*, in_features: int, num_classes: int, preset: str,
                          **overrides) -> RevMLP:
    """The registry's ``gnrev.revmlp_preset`` model factory: ``PRESETS[preset]`` (width ``M``,
    depth ``L``, activation, init) on the dataset's ``in_features`` and ``num_classes``.

    Args:
        in_features: :math:`d`.
        num_classes: :math:`C`.
        preset: A key of :data:`PRESETS`.
        **overrides: Constructor arguments that replace the preset's.

    Returns:
        The model.
    """
    return revmlp_from_preset(preset, **{**overrides, "in_features": in_features,
                                         "num_classes": num_classes})


def find_revmlp_owning(params: Iterable[torch.Tensor]) -> RevMLP:
    """The live :class:`RevMLP` that owns every tensor in ``params``
    (:func:`gnrev_plugin.nn.discovery.find_module_owning` restricted to RevMLPs).

    This is how :class:`~gnrev_plugin.optim.ExactGN` works with runners that hand an optimizer
    only ``model.parameters()``.

    Args:
        params: Tensors that must all belong to one RevMLP.

    Returns:
        The owning RevMLP.

    Raises:
        ValueError: if no live RevMLP owns all of them (or more than one does).
    """
    try:
        return find_module_owning(params, RevMLP, what="RevMLP")
    except ValueError as err:
        raise ValueError(f"{err}; ExactGN needs the parameters of one gnrev_plugin.nn.RevMLP "
                         "(pass model=... to be explicit)") from None
