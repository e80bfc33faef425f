"""ExactGN's checks before any work: the participating blocks, and the inputs and targets of a
batch (clear ``TypeError``/``ValueError``/:class:`~gnrev_plugin.optim.errors.NonFiniteError`)."""

from __future__ import annotations

import torch

from ..nn.revmlp import RevMLP
from .common import check_all_finite
from .errors import NonFiniteError

__all__ = ["participating_blocks", "check_inputs", "check_targets", "check_values"]


def participating_blocks(model: RevMLP, params: list[torch.Tensor]) -> list[int]:
    """The indices of the blocks all four of whose parameters are in ``params``.

    Args:
        model: the RevMLP.
        params: the optimizer's parameters.

    Returns:
        The sorted block indices.

    Raises:
        ValueError: a foreign parameter, a partly given block, no block, or a frozen tensor.
    """
    given = {id(p) for p in params}
    owned = {id(p) for p in model.parameters()}
    if not given <= owned:
        raise ValueError("some parameters passed to ExactGN do not belong to the RevMLP")
    blocks = []
    for i, block in enumerate(model.blocks):
        ids = [id(p) for p in block.parameters()]
        hit = sum(j in given for j in ids)
        if hit == len(ids):
            blocks.append(i)
        elif hit:
            raise ValueError(f"block {i}: pass all of W_f, b_f, W_g, b_g or none of them "
                             "(the exact step solves for whole half-layers)")
    if not blocks:
        raise ValueError("ExactGN got no trainable block parameters")
    for i in blocks:
        if not all(p.requires_grad for p in model.blocks[i].parameters()):
            raise ValueError(f"block {i} has parameters with requires_grad=False")
    return blocks


def check_inputs(m: RevMLP, x) -> torch.Tensor:
    """The flattened batch, or a ``TypeError``/``ValueError`` naming what is wrong with it.

    Args:
        m: the RevMLP (its input size and dtype).
        x: the inputs.

    Returns:
        ``x`` as ``n×d``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ExactGN.step_on_batch expects the inputs as a tensor, got "
                        f"{type(x).__name__}")
    dtype = m.blocks[0].f.weight.dtype
    if x.dim() < 2:
        raise ValueError(f"inputs must be a batch of shape (n, {m.in_features}) or "
                         f"(n, *image); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: the inputs have 0 samples; a Gauss-Newton step needs "
                         "at least one")
    if not x.is_floating_point() or x.is_complex():
        raise ValueError(f"inputs must be real floating point like the model ({dtype}), got "
                         f"{x.dtype}; convert them, e.g. x.to({dtype})")
    if x.dtype != dtype:
        raise ValueError(f"inputs are {x.dtype} but the model's parameters are {dtype}; "
                         f"convert one of them (x.to({dtype}) or model.to({x.dtype}))")
    if x[0].numel() != m.in_features:
        raise ValueError(f"the model was built for in_features={m.in_features}, but each "
                         f"input has {x[0].numel()} features (shape {tuple(x.shape)})")
    return x.reshape(x.shape[0], -1)


def check_targets(loss: str, y, out_shape: tuple[int, int]) -> torch.Tensor | None:
    """Shapes and dtypes of the targets (``ValueError``/``TypeError``).

    Args:
        loss: ``"mse"`` or ``"cross_entropy"``.
        y: the targets.
        out_shape: the output's ``(n, C)``.

    Returns:
        The integer class indices (whose range :func:`check_values` checks), else ``None``.
    """
    n, c = out_shape
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != n:
        raise ValueError(f"{n} inputs but targets of shape {tuple(y.shape)}")
    if loss == "mse":
        if tuple(y.shape) != (n, c) or not y.is_floating_point():
            raise ValueError(f"MSE targets must be floating point of the output's shape "
                             f"({n}, {c}), got {tuple(y.shape)} {y.dtype}")
        return None
    if y.is_floating_point():
        if tuple(y.shape) != (n, c):
            raise ValueError(f"cross-entropy probability targets must have shape ({n}, {c}), "
                             f"got {tuple(y.shape)}")
        return None
    if y.dim() != 1 or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"cross-entropy targets must be integer class indices of shape ({n},) "
                         f"or probabilities of shape ({n}, {c}); got {tuple(y.shape)} {y.dtype}")
    return y


def check_values(x: torch.Tensor, named: dict[str, torch.Tensor],
                 labels: torch.Tensor | None, c: int) -> None:
    """One host synchronisation for all value checks before any work: ``NonFiniteError``
    for non-finite ``x`` or ``named`` tensors, or when the squared row norms of ``x`` overflow
    its dtype (the Grams ``S Sᵀ`` would too: finite but huge inputs, e.g. 1e30 in float32);
    ``ValueError`` for class indices outside ``[0, c)``.

    Args:
        x: the flattened inputs.
        named: other tensors that must be finite, by name.
        labels: class indices, or ``None``.
        c: the number of outputs.
    """
    sq = x.square().sum(1)           # non-finite iff x is, or its squares overflow
    flags = [torch.isfinite(t).all() for t in (*named.values(), sq)]
    if labels is not None:
        flags += [labels.min() >= 0, labels.max() < c]
    if all(torch.stack(flags).tolist()):
        return
    check_all_finite(named)
    check_all_finite({"inputs": x})
    if not bool(torch.isfinite(sq).all()):
        big = float(x.abs().max())
        raise NonFiniteError(
            f"inputs too large for {x.dtype}: their squared norms overflow (max |x| = "
            f"{big:.1e}), so the Gauss-Newton Grams would not be finite. Rescale the inputs; "
            "the parameters were not changed")
    lo, hi = int(labels.min()), int(labels.max())
    raise ValueError(f"class indices must lie in [0, {c}) for a model with {c} outputs, "
                     f"got range [{lo}, {hi}]")
