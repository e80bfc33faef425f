"""The torch side of the shipped benchmark and of the solvers (no benchopt import).

The benchmark is supervised classification of flattened inputs ``X ∈ R^{n×d}`` into ``C``
classes with the cross-entropy loss on the logits ``F = f_θ(X)``:

    ℓ(θ) = (1/n) Σ_i −log softmax(F_i)_{y_i},      accuracy = (1/n) Σ_i 1[argmax_c F_ic = y_i]

(:func:`gnrev_plugin.stepping.evaluate`). Models come from the registry
(:func:`gnrev_plugin.build.build_model`): ``gnrev.revmlp`` by default, any registered model by
name. The per-batch loss change of a step is
:attr:`gnrev_plugin.stepping.StepResult.pct_change`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from gnrev_plugin.build import build_model

__all__ = ["model_factory", "as_tensor"]


def model_factory(name: str, options: dict, in_features: int, num_classes: int,
                  seed: int = 0) -> Callable[[], nn.Module]:
    """A picklable zero-argument callable returning a fresh model ``name`` built through the
    registry with ``options`` (the entry's defaults fill the rest)."""
    return partial(build_model, name, dict(options), in_features=int(in_features),
                   num_classes=int(num_classes), seed=int(seed))


def as_tensor(a, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch tensor view of a numpy array or tensor (floats to ``dtype`` if given)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else torch.as_tensor(a)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t
