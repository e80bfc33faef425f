"""Which trained parameters have a structured Gram, and their factors from one forward pass.

:func:`plan_layers` groups the trained parameters by owning module: a module of a kind in
:func:`~gnrev_plugin.optim.gram.layer_kind` whose trained parameters are among ``weight``/``bias``
is *structured*; every other trained parameter is *generic* (DenseGN takes its per-sample
Jacobian). :func:`capture_factors` runs the forward with hooks on the structured layers, gets the
output-VJPs ``G = ∂F_{ic}/∂z`` of all of them with one batched backward over the ``C`` output
coordinates, and returns each layer's :class:`~.factored.LayerFactors` and ``λ ↦ Jᵀλ`` (one
backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import PARAMETER_NAMES, layer_factors, layer_kind

__all__ = ["StructuredLayer", "plan_layers", "capture_factors"]


@dataclass
class StructuredLayer:
    """A layer whose Gram is formed from factors."""

    name: str
    kind: str
    module: nn.Module
    use_weight: bool
    use_bias: bool


def plan_layers(model: nn.Module, names: list[str]
                ) -> tuple[list[StructuredLayer], list[str]]:
    """Split trained parameter ``names`` into structured layers and generic parameters.

    Args:
        model: the module owning the parameters.
        names: the trained parameters' qualified names.

    Returns:
        ``(structured layers in first-parameter order, generic parameter names)``.
    """
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(n.rpartition(".")[0], []).append(n)
    layers, generic = [], []
    for mod_name, members in by_module.items():
        module = model.get_submodule(mod_name) if mod_name else model
        kind = layer_kind(module)
        attrs = {m.rpartition(".")[2] for m in members}
        if kind is None or not attrs <= set(PARAMETER_NAMES):
            generic += members
            continue
        layers.append(StructuredLayer(mod_name, kind, module, "weight" in attrs, "bias" in attrs))
    return layers, generic


def capture_factors(forward: Callable[[dict, torch.Tensor], torch.Tensor],
                    trained: dict[str, torch.Tensor], x: torch.Tensor,
                    layers: list[StructuredLayer]):
    """One forward with hooks, one batched backward for the output-VJPs.

    Args:
        forward: ``(trained, x) ↦ F`` (a functional call of the model).
        trained: the trained parameters (detached; made leaves here).
        x: the batch.
        layers: from :func:`plan_layers`.

    Returns:
        ``(F (n, C), [LayerFactors per layer], λ ↦ Jᵀλ as a list in trained order)``.
    """
    records: dict[str, list] = {layer.name: [] for layer in layers}
    handles = [layer.module.register_forward_hook(
        lambda m, a, z, key=layer.name: records[key].append((a[0].detach(), z)))
        for layer in layers]
    leaves = {n: q.requires_grad_() for n, q in trained.items()}
    try:
        with torch.enable_grad():
            out = forward(leaves, x)
    finally:
        for h in handles:
            h.remove()
    if out.dim() != 2:
        raise ValueError(f"DenseGN expects outputs of shape (n, C), got {tuple(out.shape)}")
    twice = [k for k, r in records.items() if len(r) != 1]
    if twice:
        raise ValueError(f"layers {twice} ran {[len(records[k]) for k in twice]} times in one "
                         "forward pass; their structured Gram assumes one call: use "
                         "jacobian='per_sample'")
    n, C = out.shape
    eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, n, C)
    factors = []
    if layers:
        with torch.enable_grad():
            grads = torch.autograd.grad(out, [records[layer.name][0][1] for layer in layers],
                                        grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=True)
        for layer, G in zip(layers, grads, strict=True):
            x_in = records[layer.name][0][0]
            factors.append(layer_factors(layer.kind, layer.module, x_in, G.transpose(0, 1),
                                         layer.use_weight, layer.use_bias))
    params = list(leaves.values())

    def apply_jt(lam: torch.Tensor) -> list[torch.Tensor]:
        with torch.enable_grad():
            return list(torch.autograd.grad(out, params,
                                            grad_outputs=lam.reshape(n, C).to(out.dtype)))
    return out.detach(), factors, apply_jt
