"""Small helpers shared by the metrics: parameter selection, flattening and data normalisation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..nn.validation import check_targets, check_tensor, loss_kind_of, output_width

__all__ = ["select_params", "param_names", "as_batches", "group_by_module", "flat_slices",
           "concat_data"]


def select_params(model: nn.Module, params: Sequence[torch.Tensor] | None = None
                  ) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` (or the given subset, checked to belong to it)."""
    if params is None:
        out = [p for p in model.parameters() if p.requires_grad]
    else:
        owned = {id(p) for p in model.parameters()}
        out = list(params)
        if any(id(p) not in owned for p in out):
            raise ValueError("every tensor in params must be a parameter of model")
    if not out:
        raise ValueError("no trainable parameters selected")
    return out


def param_names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """``model.named_parameters()`` names of ``params`` (identity-matched)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def as_batches(data, model: nn.Module | None = None, loss_fn: nn.Module | None = None,
               who: str = "metric") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Accept ``(X, y)`` or an iterable of ``(X, y)`` batches; return a list of batches.

    Every batch is checked (:mod:`gnrev_plugin.nn.validation`): tensors, non-empty, one target
    per input, finite; with ``model``, the targets also against ``loss_fn`` and the model's
    output width (class indices in ``[0, C)``).

    Args:
        data: ``(X, y)`` or an iterable of ``(X, y)``.
        model: the model the metric evaluates (for the output width), or ``None``.
        loss_fn: the loss (``nn.CrossEntropyLoss``/``nn.MSELoss`` fix the targets' form).
        who: the metric, for the messages.

    Returns:
        The list of ``(X, y)`` batches.

    Raises:
        TypeError, ValueError: a malformed batch, named.
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        batches = [data]
    else:
        batches = list(data)
    if not batches:
        raise ValueError(f"{who}: data is empty")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"{who}: data must be an iterable of (X, y) pairs")
        X = check_tensor(who, "inputs", b[0])
        c = output_width(who, model, X) if model is not None else None
        check_targets(who, loss_kind_of(loss_fn), b[1], X.shape[0], c)
    return [(b[0], b[1]) for b in batches]


def concat_data(data) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of ``data`` concatenated along the sample axis."""
    batches = as_batches(data)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def group_by_module(names: Sequence[str]) -> dict[str, list[int]]:
    """Group parameter indices by owning module (``"blocks.0.f.linear.weight"`` → ``"blocks.0.f"``).

    A trailing ``.linear`` is dropped too, so a RevMLP half-layer ``blocks.l.f`` is one block.
    """
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        mod = n.rsplit(".", 1)[0] if "." in n else n
        if mod.endswith(".linear"):
            mod = mod[: -len(".linear")]
        groups.setdefault(mod, []).append(i)
    return groups


def flat_slices(params: Sequence[torch.Tensor]) -> list[slice]:
    """The slice of each parameter in the flattened parameter vector."""
    out, off = [], 0
    for p in params:
        out.append(slice(off, off + p.numel()))
        off += p.numel()
    return out


def flat_indices(params: Sequence[torch.Tensor], which: Iterable[int]) -> list[int]:
    """Flat indices covered by the parameters with indices ``which``."""
    sl = flat_slices(params)
    return [i for k in which for i in range(sl[k].start, sl[k].stop)]
