"""AlgoPerf adapter: the 5-function PyTorch submission API around exact Gauss-Newton.

AlgoPerf (MLCommons' algorithmic-efficiency benchmark) scores a *submission*: a ``submission.py``
with five module-level functions that the ``submission_runner`` calls. This module implements them
for exact Gauss-Newton, duck-typing the workload (AlgoPerf is not pip-installable next to current
torch), and :func:`export_submission` writes a submission folder that imports them.

One update on the batch ``B`` (``batch["inputs"]``, ``batch["targets"]``):

1. ``logits, new_state = workload.model_fn(params=model, augmented_and_preprocessed_input_batch=
   batch, model_state, mode=TRAIN, rng, update_batch_norm=True)``;
2. ``ℓ = workload.loss_fn(label_batch, logits_batch)["summed"] / n_valid_examples``,
   ``ℓ.backward()``;
3. ``optimizer.step()`` — the drop-in Gauss-Newton step, which reads the model output ``F`` and the
   loss applied to it from that same forward/backward: ``Δθ = −α J⁺ ε`` with the linearised logits
   moving by ``J Δθ = −α ε`` (``α = learning_rate``; ``ε = softmax(F) − Y`` for cross-entropy,
   ``F − Y`` for MSE).

The optimizer is :class:`gnrev_plugin.optim.ExactGN` when the model is a
:class:`~gnrev_plugin.nn.RevMLP` (exact at about the cost of a gradient step), else
:class:`gnrev_plugin.optim.DenseGN` (any module, dense ``nC × nC`` output-space system, so only
small workloads). Hyperparameters (``tuning_search_space.json``): ``learning_rate`` (``α``),
optional ``damping`` (``λ``: ``(J Jᵀ + λI)``, ``DenseGN``; ``solver="damped"`` for ExactGN) and
``label_smoothing``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN

__all__ = [
    "BATCH_SIZES", "TUNING_SEARCH_SPACE", "get_batch_size", "init_optimizer_state",
    "update_params", "prepare_for_eval", "data_selection", "export_submission",
    "ForwardPassMode", "loss_kind",
]

#: Per-workload batch sizes. GN needs ``n ≤`` the rank of each system (``n·C ≤ P`` for DenseGN,
#: ``n ≤ M + 1`` per half-layer for a RevMLP), and DenseGN builds an ``nC × nC`` Gram, so only
#: the small workloads are supported.
BATCH_SIZES = {"mnist": 128, "cifar": 128}

#: External-tuning search space written to ``tuning_search_space.json``.
TUNING_SEARCH_SPACE = {
    "learning_rate": {"feasible_points": [0.1, 0.3, 1.0]},
    "damping": {"feasible_points": [0.0]},
}


def _forward_pass_mode():
    try:  # the real enum when AlgoPerf is installed: workloads compare with it
        from algoperf import spec  # noqa: PLC0415

        return spec.ForwardPassMode
    except ImportError:
        class _ForwardPassMode(enum.Enum):  # AlgoPerf's spec.ForwardPassMode
            TRAIN = 0
            EVAL = 1

        return _ForwardPassMode


ForwardPassMode = _forward_pass_mode()


def loss_kind(loss_type: Any) -> str:
    """Map AlgoPerf's ``spec.LossType`` (or its name) to ``"cross_entropy"`` / ``"mse"``."""
    if loss_type is None:
        return "cross_entropy"
    name = str(getattr(loss_type, "name", loss_type)).upper()
    if name in ("SOFTMAX_CROSS_ENTROPY", "CROSS_ENTROPY"):
        return "cross_entropy"
    if name in ("MEAN_SQUARED_ERROR", "MSE"):
        return "mse"
    raise ValueError(f"exact Gauss-Newton supports softmax cross-entropy and MSE losses, not "
                     f"{name}")


def _hp(hyperparameters: Any, name: str, default: Any = None) -> Any:
    if isinstance(hyperparameters, dict):
        return hyperparameters.get(name, default)
    return getattr(hyperparameters, name, default)


def get_batch_size(workload_name: str) -> int:
    """The batch size of ``workload_name`` (:data:`BATCH_SIZES`)."""
    try:
        return BATCH_SIZES[workload_name]
    except KeyError:
        raise ValueError(f"no exact-GN batch size for workload {workload_name!r}: dense GN builds "
                         "an (n·C)×(n·C) system and needs n·C ≤ #parameters; supported: "
                         f"{', '.join(BATCH_SIZES)}") from None


def init_optimizer_state(workload, model_params: nn.Module, model_state, hyperparameters,
                         rng) -> dict:
    """``{"optimizer": ExactGN | DenseGN, "loss": "cross_entropy" | "mse"}`` for the model.

    In PyTorch AlgoPerf passes the ``nn.Module`` itself as ``model_params``.
    """
    del model_state, rng
    if not isinstance(model_params, nn.Module):
        raise TypeError("the PyTorch AlgoPerf API passes the model (an nn.Module) as "
                        f"model_params, got {type(model_params).__name__}")
    kind = loss_kind(getattr(workload, "loss_type", None))
    lr = float(_hp(hyperparameters, "learning_rate"))
    damping = float(_hp(hyperparameters, "damping", 0.0) or 0.0)
    if isinstance(model_params, RevMLP):
        opt = ExactGN(model_params.parameters(), lr=lr, loss=kind, model=model_params,
                      solver="damped" if damping else "cholesky", damping=damping,
                      rank_policy="warn")
    else:
        opt = DenseGN(model_params.parameters(), lr=lr, loss=kind, model=model_params,
                      damping=damping, rank_policy="warn")
    return {"optimizer": opt, "loss": kind}


def update_params(workload, current_param_container: nn.Module, current_params_types,
                  model_state, hyperparameters, batch: dict[str, torch.Tensor], loss_type,
                  optimizer_state: dict, eval_results, global_step: int, rng,
                  train_state: dict | None = None):
    """One drop-in Gauss-Newton step on ``batch``; returns ``(optimizer_state, model,
    new_model_state)``. ``optimizer_state["last_loss"]`` holds ``ℓ_B`` before the step."""
    del current_params_types, eval_results, global_step, train_state
    if loss_type is not None and loss_kind(loss_type) != optimizer_state["loss"]:
        raise ValueError(f"loss_type {loss_type} differs from the optimizer's "
                         f"{optimizer_state['loss']!r}")
    weights = batch.get("weights")
    if weights is not None and not bool(torch.all(weights == 1)):
        raise ValueError("masked training batches (batch['weights'] ≠ 1) are not supported: "
                         "the Gauss-Newton target would include the masked examples")
    model = current_param_container
    model.train()
    opt = optimizer_state["optimizer"]
    opt.zero_grad()
    kwargs = {}
    dropout = _hp(hyperparameters, "dropout_rate")
    if dropout is not None:
        kwargs["dropout_rate"] = dropout
    logits, new_model_state = workload.model_fn(
        params=model, augmented_and_preprocessed_input_batch=batch, model_state=model_state,
        mode=ForwardPassMode.TRAIN, rng=rng, update_batch_norm=True, **kwargs)
    losses = workload.loss_fn(label_batch=batch["targets"], logits_batch=logits, mask_batch=None,
                              label_smoothing=float(_hp(hyperparameters, "label_smoothing", 0.0)
                                                    or 0.0))
    loss = losses["summed"] / losses["n_valid_examples"]
    loss.backward()
    opt.step()
    optimizer_state["last_loss"] = float(loss.detach())
    return optimizer_state, model, new_model_state


def prepare_for_eval(workload, current_param_container, current_params_types, model_state,
                     hyperparameters, loss_type, optimizer_state, eval_results, global_step,
                     rng):
    """Nothing to do before evaluation: the parameters are the iterate."""
    del workload, current_params_types, hyperparameters, loss_type, eval_results
    del global_step, rng
    return optimizer_state, current_param_container, model_state


def data_selection(workload, input_queue: Iterator[dict[str, torch.Tensor]], optimizer_state,
                   current_param_container, model_state, hyperparameters, global_step,
                   rng) -> dict[str, torch.Tensor]:
    """The next batch of the input queue (no data selection)."""
    del workload, optimizer_state, current_param_container, model_state, hyperparameters
    del global_step, rng
    return next(input_queue)


# ---------------------------------------------------------------------------------- export
_SUBMISSION_PY = '''"""AlgoPerf submission: exact Gauss-Newton (gnrev-plugin).

ExactGN on reversible RevMLPs, DenseGN (exact GN through the output-space system) on other
models. Requires the ``gnrev-plugin`` package in the submission's environment.
"""

from gnrev_plugin.hosts.algoperf import (  # noqa: F401
    data_selection,
    get_batch_size,
    init_optimizer_state,
    prepare_for_eval,
    update_params,
)
'''


def _yaml_scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def export_submission(dest: str | Path, name: str = "gnrev_exact_gn",
                      authors: str = "gnrev-plugin developers", affiliations: str = "",
                      version: str = "1.0", ruleset: str = "external",
                      overwrite: bool = False) -> list[Path]:
    """Write ``submission.py``, ``submission_info.yml`` and (external tuning) the
    ``tuning_search_space.json`` of :data:`TUNING_SEARCH_SPACE`.

    ``submission_info.yml`` carries the fields of AlgoPerf's submissions repository
    (``submission_name, submission_folder, authors, affiliations, version, ruleset, framework,
    description``). Returns the written paths.

    Raises:
        FileExistsError: if ``dest`` holds a ``submission.py`` and ``overwrite`` is false.
    """
    if ruleset not in ("external", "self"):
        raise ValueError(f"ruleset must be 'external' or 'self', got {ruleset!r}")
    dest = Path(dest)
    if (dest / "submission.py").exists() and not overwrite:
        raise FileExistsError(f"{dest} already holds a submission.py; pass --force to "
                              "overwrite it")
    dest.mkdir(parents=True, exist_ok=True)
    folder = f"submissions/{ruleset}_tuning/{name}"
    info = {
        "submission_name": name,
        "submission_folder": folder,
        "authors": authors,
        "affiliations": affiliations,
        "version": version,
        "ruleset": ruleset,
        "framework": "PyTorch",
        "description": "Exact Gauss-Newton: ExactGN on reversible RevMLPs (Buffelli et al., "
                       "NeurIPS 2024), DenseGN on other models; learning_rate is the "
                       "function-space step alpha (J dtheta = -alpha eps).",
    }
    paths = [dest / "submission.py", dest / "submission_info.yml"]
    paths[0].write_text(_SUBMISSION_PY)
    paths[1].write_text("".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in info.items()))
    if ruleset == "external":  # the self-tuning ruleset has no search space
        paths.append(dest / "tuning_search_space.json")
        paths[2].write_text(json.dumps(TUNING_SEARCH_SPACE, indent=2) + "\n")
    return paths
