"""AlgoPerf adapter: the 5-function PyTorch submission API around any registered optimizer.

AlgoPerf (MLCommons' algorithmic-efficiency benchmark) scores a *submission*: a ``submission.py``
with five module-level functions that its ``submission_runner`` calls. This module implements them
for an optimizer named in the plugin registry, duck-typing the workload (AlgoPerf is not
pip-installable next to current torch), and :func:`export_submission` writes a submission folder
bound to one registry name (``gnrev algoperf export DIR --optimizer NAME``).

**Which optimizer.** :func:`init_optimizer_state` builds it with
:func:`gnrev_plugin.build.build_optimizer` from its registry name (default
:data:`DEFAULT_OPTIMIZER` = ``gnrev.dense_gn``: AlgoPerf's workloads are not RevMLPs; use
``gnrev.exact_gn`` when the model is a :class:`~gnrev_plugin.nn.RevMLP`, or any registered name:
``gnrev.adam``, a plugin's ``toy.sign_sgd``). Options: the entry's registered defaults, then the
export's fixed ``optimizer_kwargs`` (``--opt K=V``), then AlgoPerf's tuned ``learning_rate`` as
``lr``. An optimizer that declares ``needs=("model", "loss")`` (:mod:`gnrev_plugin.registry.hookspecs`:
the Gauss-Newton optimizers, the sharpness wrappers, a plugin's) gets the network and the loss
name (``workload.loss_type``: softmax cross-entropy or MSE); a ``DistributedDataParallel`` /
``DataParallel`` model (anything wrapping the network as ``.module``) gives it the inner network,
while the training step still runs the wrapper.

**One update** on the batch ``B``:

1. ``logits, new_state = workload.model_fn(params=model, augmented_and_preprocessed_input_batch=
   batch, model_state, mode=TRAIN, rng, update_batch_norm=True)``;
2. ``ℓ = workload.loss_fn(label_batch, logits_batch, mask_batch)["summed"] / n_valid_examples``,
   ``ℓ.backward()``;
3. ``optimizer.step()``. A Gauss-Newton step reads the model output ``F`` and the loss applied to
   it from that same forward/backward: ``J Δθ = −α ε`` (``α = learning_rate``; ``ε = softmax(F) −
   Y`` for cross-entropy, ``F − Y`` for MSE). Masked batches (``batch["weights"]``) are passed to
   ``loss_fn``, except for an optimizer that needs the loss: it applies the loss by name to the
   whole captured batch (the GN target, SAM's second pass), so it refuses them.

**Checkpoints.** AlgoPerf's PyTorch checkpointing calls ``state_dict()`` on every value of
``optimizer_state`` when saving and ``load_state_dict()`` on every value when restoring
(``algoperf/checkpoint_utils.py``), so ``optimizer_state`` holds only such objects:
``{"optimizer": <the optimizer>, "submission": SubmissionState}``; the latter records the registry
name and loss and refuses to restore a checkpoint of another optimizer.

**Batch sizes.** :func:`get_batch_size` knows every AlgoPerf workload name
(:data:`WORKLOADS`): AlgoPerf's reference batch sizes, and for the Gauss-Newton optimizers
(tagged :data:`GAUSS_NEWTON_TAG` in the registry) :data:`GN_BATCH_SIZES` or a ``ValueError``
that says why GN cannot run there (:data:`GN_UNSUPPORTED`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gnrev_plugin.build import build_optimizer
from gnrev_plugin.optim.distributed import unwrap_model
from gnrev_plugin.registry import Registry, get_registry

__all__ = [
    "DEFAULT_OPTIMIZER", "GAUSS_NEWTON_TAG", "WORKLOADS", "REFERENCE_BATCH_SIZES", "GN_BATCH_SIZES",
    "GN_UNSUPPORTED", "get_batch_size", "is_gauss_newton", "tuning_search_space",
    "init_optimizer_state", "update_params", "prepare_for_eval", "data_selection",
    "export_submission", "ForwardPassMode", "loss_kind", "unwrap_model", "SubmissionState",
]

#: The optimizer of a submission unless another registry name is given.
DEFAULT_OPTIMIZER = "gnrev.dense_gn"
#: The registry tag of the optimizers whose batch size is bounded by the Gauss-Newton
#: output-space system (:data:`GN_BATCH_SIZES`, :data:`GN_UNSUPPORTED`), declared by the entry as
#: data. ``needs=("model", "loss")`` alone does not say this: the sharpness wrappers declare it too.
GAUSS_NEWTON_TAG = "gauss_newton"

#: Every workload name of AlgoPerf's registry (``algoperf/workloads/workloads.py``, checked at
#: commit 2c90454 of github.com/mlcommons/algorithmic-efficiency) → its base workload.
WORKLOADS: dict[str, str] = {
    "cifar": "cifar", "mnist": "mnist",
    **{n: "criteo1tb" for n in ("criteo1tb", "criteo1tb_test", "criteo1tb_layernorm",
                                "criteo1tb_embed_init", "criteo1tb_resnet")},
    **{n: "fastmri" for n in ("fastmri", "fastmri_model_size", "fastmri_tanh",
                              "fastmri_layernorm")},
    **{n: "imagenet_resnet" for n in ("imagenet_resnet", "imagenet_resnet_silu",
                                      "imagenet_resnet_gelu", "imagenet_resnet_large_bn_init")},
    **{n: "imagenet_vit" for n in ("imagenet_vit", "imagenet_vit_glu", "imagenet_vit_post_ln",
                                   "imagenet_vit_map")},
    **{n: "librispeech_conformer" for n in (
        "librispeech_conformer", "librispeech_conformer_attention_temperature",
        "librispeech_conformer_layernorm", "librispeech_conformer_gelu")},
    **{n: "librispeech_deepspeech" for n in (
        "librispeech_deepspeech", "librispeech_deepspeech_tanh",
        "librispeech_deepspeech_no_resnet", "librispeech_deepspeech_norm_and_spec_aug")},
    **{n: "ogbg" for n in ("ogbg", "ogbg_gelu", "ogbg_silu", "ogbg_model_size")},
    **{n: "wmt" for n in ("wmt", "wmt_post_ln", "wmt_attention_temp", "wmt_glu_tanh")},
}

#: AlgoPerf's reference global batch sizes: ``get_batch_size`` of the PyTorch NAdamW baseline
#: (``algorithms/baselines/external_tuning/pytorch_nadamw_full_budget.py``; it names the base
#: workloads and ``imagenet_resnet_silu``/``_gelu``: 512; every other variant falls back to its
#: base, as AlgoPerf's runner does) and ``cifar``: 128 from
#: ``algorithms/development_algorithms/cifar``.
REFERENCE_BATCH_SIZES: dict[str, int] = {
    name: {"criteo1tb": 262_144, "fastmri": 32, "imagenet_resnet": 1024, "imagenet_vit": 1024,
           "librispeech_conformer": 256, "librispeech_deepspeech": 256, "ogbg": 512,
           "wmt": 128, "mnist": 16, "cifar": 128}[base]
    for name, base in WORKLOADS.items()
}
REFERENCE_BATCH_SIZES.update(imagenet_resnet_silu=512, imagenet_resnet_gelu=512)

#: Gauss-Newton batch sizes. ``mnist`` (784 → 128 → 10 sigmoid MLP, ``P = 101,770``): a batch
#: of 128 gives ``n·C = 1,280`` output rows ≤ ``P`` (an exact solve is possible) and a dense
#: Jacobian of 1,280 × 101,770 ≈ 1.3·10⁸ entries, under DenseGN's ``max_jacobian_entries`` (2·10⁸).
GN_BATCH_SIZES: dict[str, int] = {"mnist": 128}

#: Why the Gauss-Newton family cannot run on the other base workloads.
GN_UNSUPPORTED: dict[str, str] = {
    "cifar": "ResNet-18 (about 11M parameters, BatchNorm) with 10 classes: with BatchNorm in "
             "training mode DenseGN differentiates every output row, so even a batch of 2 needs "
             "a 20 × 11M Jacobian (over max_jacobian_entries = 2·10⁸), and a batch of 1 cannot "
             "train BatchNorm",
    "criteo1tb": "its loss is sigmoid binary cross-entropy (spec.LossType.SIGMOID_CROSS_ENTROPY); "
                 "the Gauss-Newton targets cover softmax cross-entropy and MSE only",
    "fastmri": "its loss is the mean absolute error (spec.LossType.MEAN_ABSOLUTE_ERROR), whose "
               "curvature in the output is zero: there is no Gauss-Newton system",
    "imagenet_resnet": "ResNet-50 (about 25.6M parameters, BatchNorm) with 1000 classes: one "
                       "image already has a 1000 × 25.6M Jacobian, over max_jacobian_entries",
    "imagenet_vit": "ViT-S/16 (about 22M parameters) with 1000 classes: one image already has a "
                    "1000 × 22M Jacobian, over max_jacobian_entries",
    "librispeech_conformer": "its loss is CTC over sequences (spec.LossType.CTC_LOSS), not a "
                             "per-example (n, C) output with cross-entropy or MSE",
    "librispeech_deepspeech": "its loss is CTC over sequences (spec.LossType.CTC_LOSS), not a "
                              "per-example (n, C) output with cross-entropy or MSE",
    "ogbg": "its loss_fn is a masked sigmoid binary cross-entropy over 128 tasks (although "
            "loss_type says softmax), which the Gauss-Newton step does not recognise",
    "wmt": "its logits are (batch, length, 32000): the output-space system would have "
           "tokens × 32000 rows per batch, and DenseGN takes (n, C) outputs",
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


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else get_registry()


def is_gauss_newton(optimizer: str, registry: Registry | None = None) -> bool:
    """Whether registered ``optimizer`` declares the :data:`GAUSS_NEWTON_TAG` capability.

    Args:
        optimizer: a registered optimizer name (a built-in's may omit ``gnrev.``).
        registry: the registry to read (default: the installed plugins').

    Returns:
        ``True`` when the entry's tags include ``"gauss_newton"``.
    """
    return GAUSS_NEWTON_TAG in _registry(registry).optimizer_tags(optimizer)


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


def get_batch_size(workload_name: str, *, optimizer: str = DEFAULT_OPTIMIZER,
                   registry: Registry | None = None) -> int:
    """The global batch size of ``workload_name`` for registered ``optimizer`` (module docstring).

    Raises:
        ValueError: an unknown workload name, or a Gauss-Newton optimizer on a workload it
            cannot run (the message says why).
    """
    if workload_name not in WORKLOADS:
        raise ValueError(f"unknown AlgoPerf workload {workload_name!r}; known: "
                         f"{', '.join(sorted(WORKLOADS))}")
    if not is_gauss_newton(optimizer, registry):
        return REFERENCE_BATCH_SIZES[workload_name]
    base = WORKLOADS[workload_name]
    if base in GN_BATCH_SIZES:
        return GN_BATCH_SIZES[base]
    raise ValueError(f"{optimizer} (Gauss-Newton) cannot run AlgoPerf's {workload_name!r}: "
                     f"{GN_UNSUPPORTED[base]}")


def tuning_search_space(optimizer: str = DEFAULT_OPTIMIZER,
                        registry: Registry | None = None) -> dict:
    """External-tuning search space: ``learning_rate`` at ⅓, 1 and 3 times the optimizer's
    registered default ``lr`` (``[1e-3, 1e-2, 1e-1]`` without one)."""
    reg = _registry(registry)
    lr = reg.entry("optimizer", reg.resolve_name("optimizer", optimizer)).defaults.get("lr")
    points = [1e-3, 1e-2, 1e-1] if lr is None else [float(f"{lr * f:.6g}") for f in (1 / 3, 1, 3)]
    return {"learning_rate": {"feasible_points": points}}


class SubmissionState:
    """The ``optimizer_state`` entry that records which registered optimizer the submission runs,
    its loss, and whether the optimizer takes the loss by name (``needs`` ``"loss"``); it
    checkpoints like the optimizer (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, optimizer: str, loss: str, needs_loss: bool) -> None:
        self.optimizer, self.loss, self.needs_loss = optimizer, loss, bool(needs_loss)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer, "loss": self.loss, "needs_loss": self.needs_loss}

    def load_state_dict(self, state: dict) -> None:
        """Restore; a checkpoint of another optimizer or loss is a ``ValueError``."""
        if (state.get("optimizer"), state.get("loss")) != (self.optimizer, self.loss):
            raise ValueError(f"the checkpoint was written by optimizer {state.get('optimizer')!r}"
                             f" with loss {state.get('loss')!r}; this submission runs "
                             f"{self.optimizer!r} with {self.loss!r}")


def init_optimizer_state(workload, model_params: nn.Module, model_state, hyperparameters,
                         rng, *, optimizer: str = DEFAULT_OPTIMIZER,
                         optimizer_kwargs: dict | None = None,
                         registry: Registry | None = None) -> dict:
    """``{"optimizer": <registered optimizer>, "submission": SubmissionState}`` for the model.

    In PyTorch AlgoPerf passes the ``nn.Module`` itself (possibly DDP-wrapped) as
    ``model_params``. ``hyperparameters`` may be ``None`` (self-tuning ruleset): the registered
    ``lr`` is used then.
    """
    del model_state, rng
    if not isinstance(model_params, nn.Module):
        raise TypeError("the PyTorch AlgoPerf API passes the model (an nn.Module) as "
                        f"model_params, got {type(model_params).__name__}")
    reg = _registry(registry)
    name = reg.resolve_name("optimizer", optimizer)
    needs = reg.entry("optimizer", name).needs
    kind = loss_kind(getattr(workload, "loss_type", None)) if "loss" in needs else \
        "cross_entropy"
    kwargs = dict(optimizer_kwargs or {})
    lr = _hp(hyperparameters, "learning_rate")
    if lr is not None:
        kwargs["lr"] = float(lr)
    model = unwrap_model(model_params) if "model" in needs else model_params
    opt = build_optimizer(name, model, kwargs, loss=kind, registry=reg)
    return {"optimizer": opt,
            "submission": SubmissionState(name, kind, "loss" in needs)}


def update_params(workload, current_param_container: nn.Module, current_params_types,
                  model_state, hyperparameters, batch: dict[str, torch.Tensor], loss_type,
                  optimizer_state: dict, eval_results, global_step: int, rng,
                  train_state: dict | None = None):
    """One step of the submission's optimizer on ``batch`` (module docstring); returns
    ``(optimizer_state, model, new_model_state)``."""
    del current_params_types, eval_results, global_step, train_state
    info: SubmissionState = optimizer_state["submission"]
    if info.needs_loss and loss_type is not None and loss_kind(loss_type) != info.loss:
        raise ValueError(f"loss_type {loss_type} differs from the optimizer's {info.loss!r}")
    weights = batch.get("weights")
    masked = weights is not None and not bool(torch.all(weights == 1))
    if masked and info.needs_loss:
        raise ValueError(f"masked training batches (batch['weights'] ≠ 1) are not supported by "
                         f"{info.optimizer}: it applies the {info.loss} loss to the whole batch "
                         "itself (a Gauss-Newton target would include the masked examples)")
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
    losses = workload.loss_fn(label_batch=batch["targets"], logits_batch=logits,
                              mask_batch=weights if masked else None,
                              label_smoothing=float(_hp(hyperparameters, "label_smoothing", 0.0)
                                                    or 0.0))
    loss = losses["summed"] / losses["n_valid_examples"]
    loss.backward()
    opt.step()
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
_SUBMISSION_PY = '''"""AlgoPerf submission: the registered optimizer {name!r}, through gnrev-plugin.

Written by ``gnrev algoperf export``. Requires ``gnrev-plugin`` (and the plugin that registers
{name!r}) in the submission's environment. The five functions are
:mod:`gnrev_plugin.hosts.algoperf`'s, bound to this optimizer and these fixed options.
"""

from gnrev_plugin.hosts import algoperf as _gnrev

OPTIMIZER = {name!r}
OPTIMIZER_KWARGS = {kwargs!r}


def get_batch_size(workload_name):
    return _gnrev.get_batch_size(workload_name, optimizer=OPTIMIZER)


def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
    return _gnrev.init_optimizer_state(workload, model_params, model_state, hyperparameters,
                                       rng, optimizer=OPTIMIZER,
                                       optimizer_kwargs=OPTIMIZER_KWARGS)


update_params = _gnrev.update_params
prepare_for_eval = _gnrev.prepare_for_eval
data_selection = _gnrev.data_selection
'''


def _yaml_scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def export_submission(dest: str | Path, name: str | None = None, *,
                      optimizer: str = DEFAULT_OPTIMIZER, optimizer_kwargs: dict | None = None,
                      authors: str = "gnrev-plugin developers", affiliations: str = "",
                      version: str = "1.0", ruleset: str = "external", overwrite: bool = False,
                      registry: Registry | None = None) -> list[Path]:
    """Write ``submission.py`` (bound to registered ``optimizer`` and ``optimizer_kwargs``),
    ``submission_info.yml`` and (external tuning) ``tuning_search_space.json``
    (:func:`tuning_search_space`). ``name`` defaults to ``gnrev_<optimizer>`` with dots as
    underscores.

    ``submission_info.yml`` carries the fields of AlgoPerf's submissions repository
    (``submission_name, submission_folder, authors, affiliations, version, ruleset, framework,
    description``). Returns the written paths.

    Raises:
        FileExistsError: if ``dest`` holds a ``submission.py`` and ``overwrite`` is false.
        UnknownNameError: ``optimizer`` is not registered (the message lists the names).
    """
    if ruleset not in ("external", "self"):
        raise ValueError(f"ruleset must be 'external' or 'self', got {ruleset!r}")
    reg = _registry(registry)
    optimizer = reg.resolve_name("optimizer", optimizer)
    entry = reg.entry("optimizer", optimizer)
    kwargs = dict(optimizer_kwargs or {})
    json.dumps(kwargs, allow_nan=False)  # the options are JSON values
    name = name or "gnrev_" + optimizer.replace(".", "_")
    dest = Path(dest)
    if (dest / "submission.py").exists() and not overwrite:
        raise FileExistsError(f"{dest} already holds a submission.py; pass --force to "
                              "overwrite it")
    dest.mkdir(parents=True, exist_ok=True)
    gn = " (Gauss-Newton: learning_rate is the function-space step alpha, J dtheta = -alpha "\
         "eps)" if is_gauss_newton(optimizer, reg) else ""
    info = {
        "submission_name": name,
        "submission_folder": f"submissions/{ruleset}_tuning/{name}",
        "authors": authors,
        "affiliations": affiliations,
        "version": version,
        "ruleset": ruleset,
        "framework": "PyTorch",
        "description": f"gnrev-plugin's registered optimizer {optimizer} "
                       f"({entry.description or entry.target}){gn}.",
    }
    paths = [dest / "submission.py", dest / "submission_info.yml"]
    paths[0].write_text(_SUBMISSION_PY.format(name=optimizer, kwargs=kwargs))
    paths[1].write_text("".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in info.items()))
    if ruleset == "external":  # the self-tuning ruleset has no search space
        paths.append(dest / "tuning_search_space.json")
        paths[2].write_text(json.dumps(tuning_search_space(optimizer, reg), indent=2) + "\n")
    return paths
