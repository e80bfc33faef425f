"""Run metrics: the diagnostics that runners log at every epoch, in the registry's protocol.

Each is called as ``fn(model, *, inputs, targets, loss_fn, initial_model, **_)`` on a fixed
probe batch ``(X_p, Y_p)`` (``targets`` in the loss's form, ``loss_fn`` an ``nn.Module`` loss,
``initial_model`` the model at epoch 0) and returns a float or a ``{key: float}`` dict (logged
as ``<registry name>.<key>``). They are registered as ``gnrev.*`` run metrics
(``gnrev train --metric NAME``); see :mod:`gnrev_plugin.registry.hookspecs` for the contract.

* :func:`ntk_similarity_to_init`: ``A(Θ₀, Θ_t) = ⟨Θ₀, Θ_t⟩_F / (‖Θ₀‖_F ‖Θ_t‖_F)`` with the
  empirical logit NTK ``Θ = J Jᵀ`` on ``X_p`` (structured for a RevMLP, ``torch.func`` else);
* :func:`cka_to_init`: linear CKA between the representations at init and now, per RevMLP
  half-layer (``blocks.l.f``, ``blocks.l.g``) or, for other models, per leaf module;
* :func:`weight_cosine_to_init`: ``cos(vec θ₀, vec θ_t)``; :func:`weight_norm_ratio_to_init`:
  ``‖θ_t‖ / ‖θ₀‖`` over all parameters;
* :func:`gn_condition_number_on_batch`: ``κ(G) = λ_max / λ_min^{≠0}`` of the GN matrix of the
  probe batch on its ``nC × nC`` Gram side, with the rank used;
* :func:`nme_trace`: ``tr(NME) = tr(H) − tr(G)`` on the probe batch (exact for ``P ≤ 1500``
  parameters, else Hutch++ with 90 matrix-vector products, seeded without touching the global
  RNG).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.nn.validation import check_tensor

from .conditioning import gn_condition_number
from .hessian import decompose, dense_matrix, estimate_trace
from .ntk import empirical_ntk, ntk_similarity
from .representation import capture_representations, cka_by_layer, revmlp_representations
from .training import weight_cosine_similarity, weight_norm_ratio

__all__ = ["ntk_similarity_to_init", "cka_to_init", "weight_cosine_to_init",
           "weight_norm_ratio_to_init", "gn_condition_number_on_batch", "nme_trace",
           "EXACT_TRACE_MAX_PARAMS"]

#: Up to this many parameters :func:`nme_trace` is exact (dense operators), above it Hutch++.
EXACT_TRACE_MAX_PARAMS = 1500

# Θ₀ and the initial representations are fixed for a run: computed once per initial model.
_INIT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(initial_model: nn.Module, key: str, inputs: torch.Tensor, compute):
    slot = _INIT_CACHE.setdefault(initial_model, {})
    tag = (key, inputs.data_ptr(), tuple(inputs.shape))
    if tag not in slot:
        slot[tag] = compute()
    return slot[tag]


def _check_probe(who: str, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
    """The probe batch is non-empty and finite (a named ``ValueError``, never a silent NaN)."""
    check_tensor(who, "inputs", inputs)
    if targets is not None:
        check_tensor(who, "targets", targets, n=inputs.shape[0])


def _ntk(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return empirical_ntk(model, inputs).detach().double()


def ntk_similarity_to_init(model: nn.Module, *, inputs: torch.Tensor, initial_model: nn.Module,
                           **_) -> float:
    r""":math:`A(\Theta_0, \Theta_t)`, the Frobenius cosine of the probe batch's NTKs at init and now.

    Args:
        model: The model now, :math:`\theta_t`.
        inputs: The probe batch.
        initial_model: The model at init, :math:`\theta_0`.

    Returns:
        :math:`A(\Theta_0, \Theta_t)`.
    """
    _check_probe("ntk_similarity_to_init", inputs)
    K0 = _cached(initial_model, "ntk", inputs, lambda: _ntk(initial_model, inputs))
    return float(ntk_similarity(K0, _ntk(model, inputs)))


@torch.no_grad()
def _representations(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(model, RevMLP):
        reps = revmlp_representations(model, inputs, per="half_layer")
        reps.pop("input", None)
        return reps
    return capture_representations(model, inputs)


def cka_to_init(model: nn.Module, *, inputs: torch.Tensor, initial_model: nn.Module,
                **_) -> dict[str, float]:
    r"""Linear CKA to init per half-layer (RevMLP) or per leaf module (other models).

    Args:
        model: The model now.
        inputs: The probe batch.
        initial_model: The model at init.

    Returns:
        Representation name :math:`\to` linear :math:`\mathrm{CKA}`.
    """
    _check_probe("cka_to_init", inputs)
    reps0 = _cached(initial_model, "reps", inputs, lambda: _representations(initial_model, inputs))
    return cka_by_layer(reps0, _representations(model, inputs))


def weight_cosine_to_init(model: nn.Module, *, initial_model: nn.Module, **_) -> float:
    r""":math:`\cos(\operatorname{vec}\theta_0, \operatorname{vec}\theta_t)` over all parameters.

    Args:
        model: The model now.
        initial_model: The model at init.

    Returns:
        :math:`\cos(\operatorname{vec}\theta_0, \operatorname{vec}\theta_t)`.
    """
    return weight_cosine_similarity(initial_model, model)["__all__"]


def weight_norm_ratio_to_init(model: nn.Module, *, initial_model: nn.Module, **_) -> float:
    r""":math:`\lVert\theta_t\rVert / \lVert\theta_0\rVert` over all parameters.

    Args:
        model: The model now.
        initial_model: The model at init.

    Returns:
        :math:`\lVert\theta_t\rVert / \lVert\theta_0\rVert`.
    """
    return weight_norm_ratio(initial_model, model)["__all__"]


def gn_condition_number_on_batch(model: nn.Module, *, inputs: torch.Tensor,
                                 targets: torch.Tensor, loss_fn: nn.Module, **_
                                 ) -> dict[str, float]:
    r""":math:`\kappa(G)` of the probe batch (Gram side) with the rank it was computed on.

    Args:
        model: The model.
        inputs: The probe batch.
        targets: Its targets.
        loss_fn: The training loss.

    Returns:
        ``{"kappa":`` :math:`\kappa(G)`, ``"rank":`` :math:`r` ``}``.
    """
    _check_probe("gn_condition_number_on_batch", inputs, targets)
    rep = gn_condition_number(model, loss_fn, (inputs, targets), side="gram")
    return {"kappa": float(rep.kappa), "rank": float(rep.rank)}


def nme_trace(model: nn.Module, *, inputs: torch.Tensor, targets: torch.Tensor,
              loss_fn: nn.Module, **_) -> float:
    r""":math:`\operatorname{tr}(\mathrm{NME}) = \operatorname{tr}(H - G)` of the probe batch (exact or
    Hutch++).

    Args:
        model: The model.
        inputs: The probe batch.
        targets: Its targets.
        loss_fn: The training loss.

    Returns:
        :math:`\operatorname{tr}(H - G)` (``nan`` if the estimate is not finite).
    """
    _check_probe("nme_trace", inputs, targets)
    dec = decompose(model, loss_fn, (inputs, targets))
    if dec.num_params <= EXACT_TRACE_MAX_PARAMS:
        return float(torch.trace(dense_matrix(dec.nme)))
    value, _ = estimate_trace(dec.nme, "hutchpp", 90, seed=0)  # forked, seeded RNG
    return float(value) if math.isfinite(value) else math.nan
