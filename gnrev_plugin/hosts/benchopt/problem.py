"""The torch side of the shipped benchmark: models, losses and evaluation (no benchopt import).

The benchmark is supervised classification of flattened inputs ``X ∈ R^{n×d}`` into ``C``
classes with the cross-entropy loss on the logits ``F = f_θ(X)``:

    ℓ(θ) = (1/n) Σ_i −log softmax(F_i)_{y_i},      accuracy = (1/n) Σ_i 1[argmax_c F_ic = y_i].

Two model families share one factory, :func:`build_model`:

* ``"revmlp"``: the reversible MLP of Buffelli et al. (:class:`gnrev_plugin.nn.RevMLP`,
  ``F = X^(L) U``), the model on which :class:`gnrev_plugin.optim.ExactGN` is exact;
* ``"mlp"``: the runners' usual ReLU MLP ``d → M → ... → M → C`` (``num_blocks`` hidden layers),
  on which exact GN runs through the model-agnostic :class:`gnrev_plugin.optim.DenseGN`.

The per-batch loss change of an update on batch ``B`` (Buffelli et al., Fig. 3) is

    Δ_B = 100 · (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)      (percent; negative = the step helped),

re-evaluated on the same batch right after the step and averaged over an epoch's batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from gnrev_plugin.nn import RevMLP

__all__ = [
    "MODEL_KINDS", "build_model", "model_factory", "as_tensor", "evaluate_classifier",
    "percent_loss_change",
]

#: Model families of :func:`build_model`.
MODEL_KINDS = ("revmlp", "mlp")


def build_model(
    kind: str,
    in_features: int,
    num_classes: int,
    hidden: int = 256,
    num_blocks: int = 2,
    seed: int = 0,
    linear_first_block: bool = True,
    init_std: float = 1e-3,
) -> nn.Module:
    """Build a classifier ``R^d → R^C``.

    Args:
        kind: ``"revmlp"`` (:class:`~gnrev_plugin.nn.RevMLP` with ``hidden = M`` and
            ``num_blocks = L`` coupling blocks, ``d`` must be even) or ``"mlp"`` (ReLU MLP with
            ``num_blocks`` hidden layers of width ``hidden``, PyTorch's default init).
        in_features, num_classes: ``d`` and ``C``.
        seed: the parameters are a deterministic function of ``seed`` (same initial model for
            every solver of a benchmark run).
        linear_first_block, init_std: RevMLP only (the reference code's defaults).
    """
    if kind == "revmlp":
        if in_features % 2:
            raise ValueError(f"a RevMLP needs an even input width, got d={in_features}; pad the "
                             "data (gnrev_plugin.data.pad_to_even) or use model='mlp'")
        return RevMLP(in_features=in_features, hidden=hidden, num_blocks=num_blocks,
                      num_classes=num_classes, linear_first_block=linear_first_block,
                      init_std=init_std, seed=int(seed))
    if kind == "mlp":
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed))
        try:
            widths = [in_features] + [hidden] * num_blocks
            layers: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(widths[-1], num_classes))
            return nn.Sequential(*layers)
        finally:
            torch.random.set_rng_state(gen_state)
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def model_factory(kind: str, in_features: int, num_classes: int, **kwargs) -> Callable[[], nn.Module]:
    """A picklable zero-argument callable returning a fresh :func:`build_model` model."""
    return partial(build_model, kind, in_features, num_classes, **kwargs)


def as_tensor(a, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch tensor view of a numpy array or tensor (floats to ``dtype`` if given)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else torch.as_tensor(a)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
) -> tuple[float, float]:
    """Mean cross-entropy ``ℓ`` and accuracy of ``model`` on ``(x, y)``, in chunks of ``batch_size``.

    Returns ``(loss, accuracy)`` as Python floats; ``(nan, nan)`` for an empty set.
    """
    n = len(y)
    if n == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    try:
        total, correct = 0.0, 0
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = model(xb)
            total += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return total / n, correct / n


def percent_loss_change(loss_before: float, loss_after: float) -> float:
    """``100 · (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)``; ``nan`` if ``ℓ_B(θ_t) = 0``."""
    if loss_before == 0:
        return math.nan
    return 100.0 * (loss_after - loss_before) / loss_before
