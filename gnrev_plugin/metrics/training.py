r"""Training diagnostics: weight change relative to initialisation and per-batch loss change.

* Weight cosine similarity ``cos(vec W₀, vec W_t) = ⟨W₀, W_t⟩_F / (‖W₀‖_F ‖W_t‖_F)`` and norm
  ratio ``‖W_t‖_F / ‖W₀‖_F`` per parameter tensor and for all parameters concatenated. (The
  reference script reports ``‖W₀‖_F/‖W_T‖_F`` under the name "relative difference"; use
  ``inverse=True`` for that orientation.)
* Percentage loss change on one batch ``B`` caused by one optimisation step
  (Buffelli et al. 2024, Fig. 3):

      Δ% = 100 · (ℓ_B(θ⁺) − ℓ_B(θ)) / ℓ_B(θ)

  where ``θ⁺`` is the result of the step. The step is a callable, so this works with any
  optimizer (the metrics never import :mod:`gnrev_plugin.optim`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["snapshot_parameters", "weight_cosine_similarity", "weight_norm_ratio",
           "percentage_loss_change", "LossChangeTracker"]


def snapshot_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    r"""Detached copies of ``model.named_parameters()`` (e.g. at initialisation).

    Args:
        model: Any module.

    Returns:
        Name :math:`\to` detached clone.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _as_dict(params) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return {n: p.detach() for n, p in params.named_parameters()}
    if isinstance(params, Mapping):
        return {n: p.detach() for n, p in params.items()}
    return {str(i): p.detach() for i, p in enumerate(params)}


def _pairs(a, b):
    da, db = _as_dict(a), _as_dict(b)
    if da.keys() != db.keys():
        raise ValueError("the two parameter sets have different names")
    for k in da:
        if da[k].shape != db[k].shape:
            raise ValueError(f"parameter {k}: shapes {tuple(da[k].shape)} vs {tuple(db[k].shape)}")
    return da, db


def weight_cosine_similarity(init, current) -> dict[str, float]:
    r""":math:`\cos(\operatorname{vec} W_0, \operatorname{vec} W_t)` per tensor and ``"__all__"`` for the
    concatenation.

    ``init``/``current``: modules, name→tensor mappings, or equal-length tensor sequences.
    A zero tensor (e.g. a zero-initialised bias) gives ``nan``.

    Args:
        init: Weights :math:`W_0`.
        current: Weights :math:`W_t`.

    Returns:
        Name :math:`\to` :math:`\cos(\operatorname{vec} W_0, \operatorname{vec} W_t)`, plus ``"__all__"``.

    Raises:
        ValueError: If names or shapes differ.
    """
    da, db = _pairs(init, current)
    out = {}
    for k in da:
        a, b = da[k].double().reshape(-1), db[k].double().reshape(-1)
        den = a.norm() * b.norm()
        out[k] = (a @ b / den).item() if den > 0 else math.nan
    a = torch.cat([da[k].double().reshape(-1) for k in da])
    b = torch.cat([db[k].double().reshape(-1) for k in da])
    den = a.norm() * b.norm()
    out["__all__"] = (a @ b / den).item() if den > 0 else math.nan
    return out


def weight_norm_ratio(init, current, inverse: bool = False) -> dict[str, float]:
    r""":math:`\lVert W_t \rVert_F / \lVert W_0 \rVert_F` per tensor and for the concatenation (or its
    inverse).

    Args:
        init: Weights :math:`W_0`.
        current: Weights :math:`W_t`.
        inverse: Return :math:`\lVert W_0 \rVert_F / \lVert W_t \rVert_F` instead.

    Returns:
        Name :math:`\to` ratio, plus ``"__all__"``.

    Raises:
        ValueError: If names or shapes differ.
    """
    da, db = _pairs(init, current)
    out = {}
    for k in list(da) + ["__all__"]:
        if k == "__all__":
            a = torch.cat([da[j].double().reshape(-1) for j in da]).norm()
            b = torch.cat([db[j].double().reshape(-1) for j in da]).norm()
        else:
            a, b = da[k].double().norm(), db[k].double().norm()
        num, den = (a, b) if inverse else (b, a)
        out[k] = (num / den).item() if den > 0 else math.nan
    return out


@torch.no_grad()
def _eval_loss(model: nn.Module, loss_fn: Callable, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(loss_fn(model(X), y))


def percentage_loss_change(model: nn.Module, loss_fn: Callable, X: torch.Tensor,
                           y: torch.Tensor, step: Callable[[], object]) -> dict[str, float]:
    """Evaluate ``ℓ_B`` on ``(X, y)``, call ``step()`` once, re-evaluate on the same batch.

    ``step`` performs one update however the caller likes, e.g. ``lambda: opt.step_on_batch(X, y)``
    or a closure doing ``zero_grad(); loss.backward(); opt.step()``. Losses are evaluated with
    ``torch.no_grad()`` in the model's current mode.

    Returns:
        ``{"loss_before", "loss_after", "percent_change"}`` with
        ``percent_change = 100 (ℓ_B(θ⁺) − ℓ_B(θ)) / ℓ_B(θ)`` (``nan`` when ``ℓ_B(θ) = 0``).
    """
    before = _eval_loss(model, loss_fn, X, y)
    step()
    after = _eval_loss(model, loss_fn, X, y)
    pct = 100.0 * (after - before) / before if before != 0 else math.nan
    return {"loss_before": before, "loss_after": after, "percent_change": pct}


@dataclass
class LossChangeTracker:
    """Running mean of the per-batch percentage loss change over an epoch (as logged in the
    reference code: "Percentage loss change per batch").

    Attributes:
        values: The recorded percentage changes, in order.
    """

    values: list[float] = field(default_factory=list)

    def update(self, model: nn.Module, loss_fn: Callable, X: torch.Tensor, y: torch.Tensor,
               step: Callable[[], object]) -> dict[str, float]:
        """Take one step and record its percentage loss change on ``(X, y)``.

        Args:
            model: The model.
            loss_fn: ``loss_fn(model(X), y)``.
            X: Batch inputs.
            y: Batch targets.
            step: Callable that performs the optimizer step.

        Returns:
            The record of :func:`percentage_loss_change`.
        """
        rec = percentage_loss_change(model, loss_fn, X, y, step)
        self.values.append(rec["percent_change"])
        return rec

    def extend(self, values: Iterable[float]) -> None:
        """Append already computed percentage changes.

        Args:
            values: Percentage changes.
        """
        self.values.extend(values)

    def mean(self) -> float:
        """Mean of the recorded changes.

        Returns:
            The mean over the non-``nan`` values (``nan`` if none).
        """
        vals = [v for v in self.values if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def reset(self) -> list[float]:
        """Start a new epoch.

        Returns:
            The values recorded so far.
        """
        vals, self.values = self.values, []
        return vals
