"""Newton targets ``ε = H⁻¹ g`` in output space, per loss.

For outputs ``F ∈ R^{n×C}``, per-sample gradients ``g_i = ∂ℓ_i/∂F_i`` and loss Hessians
``H_i = ∂²ℓ_i/∂F_i²``, the Gauss-Newton step with a full-row-rank Jacobian is
``Δθ = −α J⁺ ε`` with ``ε_i = H_i⁻¹ g_i``, i.e. the linearised output change is ``J Δθ = −α ε``
(Newton's method in function space). ``ε`` does not depend on the loss's reduction (mean or sum),
because ``g`` and ``H`` scale alike.

* MSE, ``ℓ_i = c‖F_i − Y_i‖²``: ``ε = F − Y``.
* Cross-entropy, ``p_i = softmax(F_i)``, ``g_i = p_i − y_i``, ``H_i = diag(p_i) − p_i p_iᵀ`` (singular,
  null vector ``1``):

  - ``"identity"`` (the reference code's default): ``H`` replaced by ``I``, ``ε = p − y``;
  - ``"pinv"``: the minimum-norm ``ε = H⁺ g = g/p − mean_k(g_k/p_k)`` (for one-hot ``y`` this is the
    reference's ``S[mean(y/e^F) − y/e^F]``); it grows like ``1/p_y`` when the true class is unlikely;
  - ``"damped"``: ``ε = (H + λI)⁻¹ g`` per sample, by Sherman–Morrison with ``D = diag(p) + λI``:
    ``ε = D⁻¹g + D⁻¹p (pᵀD⁻¹g)/(1 − pᵀD⁻¹p)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSS_MODULES", "LOSSES", "CE_TARGETS", "soft_targets", "newton_target", "loss_gradient_direction",
           "mean_loss"]

#: The one list of losses (optimizers, runners, the CLI): each name → the ``nn.Module`` loss it
#: denotes, mean-reduced: cross-entropy on class indices, or ``‖F − Y‖²/(nC)`` on ``(n, C)`` targets.
LOSS_MODULES: dict[str, type[nn.Module]] = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
#: The loss names, ``("cross_entropy", "mse")``.
LOSSES = tuple(LOSS_MODULES)
CE_TARGETS = ("identity", "pinv", "damped")


def soft_targets(y: torch.Tensor, num_classes: int, label_smoothing: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class indices ``(n,)`` or probabilities ``(n, C)`` → probabilities, with label smoothing
    ``y ← (1 − s) y + s/C`` as in :func:`torch.nn.functional.cross_entropy`.

    Args:
        y: Class indices ``(n,)`` or probabilities ``(n, C)``.
        num_classes: :math:`C`.
        label_smoothing: :math:`s`.
        dtype: Result dtype.

    Returns:
        Probabilities :math:`Y`, ``(n, C)``.
    """
    if y.dim() == 1 and not torch.is_floating_point(y):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"class indices must lie in [0, {num_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        probs = F.one_hot(y, num_classes).to(dtype)
    elif y.dim() == 2 and y.shape[1] == num_classes and torch.is_floating_point(y):
        probs = y.to(dtype)
    else:
        raise ValueError("cross-entropy targets must be class indices of shape (n,) (integer) or "
                         f"probabilities of shape (n, {num_classes}); got {tuple(y.shape)} "
                         f"{y.dtype}")
    if label_smoothing:
        probs = (1.0 - label_smoothing) * probs + label_smoothing / num_classes
    return probs


def _check_shapes(loss: str, output: torch.Tensor, target: torch.Tensor) -> None:
    if output.dim() != 2:
        raise ValueError(f"expected outputs of shape (n, C), got {tuple(output.shape)}")
    if loss == "mse" and target.shape != output.shape:
        raise ValueError(f"MSE targets must have the output's shape {tuple(output.shape)}, got "
                         f"{tuple(target.shape)}")
    if target.shape[0] != output.shape[0]:
        raise ValueError(f"{target.shape[0]} targets for {output.shape[0]} outputs")


def newton_target(
    loss: str,
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    ce_target: str = "identity",
    ce_damping: float = 1e-3,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Return :math:`\varepsilon` (shape of ``output``) for ``loss`` in :data:`LOSSES` (module docstring).

    Args:
        loss: ``"cross_entropy"`` or ``"mse"``.
        output: Model output :math:`F`.
        target: Targets.
        ce_target: Cross-entropy Newton target.
        ce_damping: Damping of the cross-entropy Newton step.
        label_smoothing: :math:`s`.

    Returns:
        :math:`\varepsilon`, shaped like ``output`` (the step uses :math:`-\alpha\varepsilon`).
    """
    _check_shapes(loss, output, target)
    if loss == "mse":
        return output - target.to(output.dtype)
    if loss != "cross_entropy":
        raise ValueError(f"unsupported loss {loss!r}; supported: {LOSSES}")
    y = soft_targets(target, output.shape[1], label_smoothing, output.dtype)
    p = torch.softmax(output, dim=1)
    g = p - y
    if ce_target == "identity":
        return g
    if ce_target == "pinv":
        r = g / p
        return r - r.mean(dim=1, keepdim=True)
    if ce_target == "damped":
        if not ce_damping > 0:
            raise ValueError(f"ce_damping must be > 0 for ce_target='damped', got {ce_damping}")
        d = p + ce_damping
        dg, dp = g / d, p / d
        coef = (p * dg).sum(1, keepdim=True) / (1.0 - (p * dp).sum(1, keepdim=True))
        return dg + dp * coef
    raise ValueError(f"unknown ce_target {ce_target!r}; choose from {CE_TARGETS}")


def loss_gradient_direction(loss: str, output: torch.Tensor, target: torch.Tensor,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample direction of ``∂ℓ/∂F`` up to a positive per-sample factor: ``F − Y`` (MSE) or
    ``p − y`` (cross-entropy). Used to check a captured output gradient against the recorded loss.

    Args:
        loss: ``"cross_entropy"`` or ``"mse"``.
        output: Model output :math:`F`.
        target: Targets.
        label_smoothing: :math:`s`.

    Returns:
        :math:`F - Y` or :math:`p - y`, shaped like ``output``.
    """
    if loss == "mse":
        return output - target.to(output.dtype)
    y = soft_targets(target, output.shape[1], label_smoothing, output.dtype)
    return torch.softmax(output, dim=1) - y


def mean_loss(loss: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean-reduced loss (``nn.MSELoss()`` or ``nn.CrossEntropyLoss()``) on a batch.

    Args:
        loss: ``"cross_entropy"`` or ``"mse"``.
        output: Model output :math:`F`.
        target: Targets.

    Returns:
        The 0-dim mean loss.
    """
    if loss == "mse":
        return F.mse_loss(output, target.to(output.dtype))
    return F.cross_entropy(output, target if not torch.is_floating_point(target)
                           else target.to(output.dtype))
