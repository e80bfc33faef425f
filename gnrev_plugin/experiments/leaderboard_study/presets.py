"""Presets of ``gnrev reproduce leaderboard``: contestants, problems, search spaces and budgets.

**Contestants** are short names mapped to registry names (:data:`CONTESTANTS`); ``gn`` is the
exact Gauss-Newton step of the problem's model: ``gnrev.exact_gn`` on a RevMLP, ``gnrev.dense_gn``
elsewhere (the problem's ``gn``). A contestant whose registry entry is missing (e.g. the rivals
plugin without pytorch-optimizer) is listed as missing in the report, never dropped silently.

**Problems** (:data:`PROBLEMS`): the paper's RevMLP on MNIST, full batch and mini-batch; an MLP on
MNIST-1D; DeepOBS's ``mnist_mlp`` architecture (784-1000-500-100-10 ReLU, through ``gnrev.mlp``;
DeepOBS's truncated-normal initialisation is not reproduced). Listed as missing: DeepOBS's
``mnist_logreg`` (``gnrev.mlp`` needs at least one hidden layer) and ``mnist_2c2d`` (no registry
model for the conv net yet; DenseGN's conv path is another helper's work). Every problem splits
its *training* data into train and validation parts; the test split is never read.

**Fair tuning** (the same for every contestant): a declared search space per contestant
(:data:`SEARCH_SPACES`: ``lr`` and at most two main hyperparameters; ``log`` = log-uniform,
``choice`` = uniform over a list), ``trials`` random draws seeded by ``(tuning_seed, problem,
contestant)``; the configuration with the best final validation accuracy (ties: lower final train
loss) is rerun with each of ``seeds``.
"""

from __future__ import annotations

import copy

__all__ = ["CONTESTANTS", "DEFAULT_CONTESTANTS", "PROBLEMS", "MISSING_PROBLEMS", "SEARCH_SPACES",
           "LEADERBOARD_PRESETS", "get_leaderboard_preset"]

#: short name → registry name (``None``: the problem's exact GN optimizer)
CONTESTANTS: dict[str, str | None] = {
    "gn": None,
    "hessian_free": "gnrev.hessian_free",
    "kfac": "gnrev.kfac",
    "shampoo": "pytorch_optimizer.shampoo",
    "soap": "pytorch_optimizer.soap",
    "psgd": "pytorch_optimizer.kron",
    "muon": "pytorch_optimizer.muon",
    "adamw": "pytorch_optimizer.adamw",
    "adam": "gnrev.adam",
    "sgd": "gnrev.sgd",
}
DEFAULT_CONTESTANTS = list(CONTESTANTS)

#: contestant → {hyperparameter: ("log", low, high) | ("choice", [values])}
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "gn": {"lr": ("log", 0.05, 1.0)},
    "hessian_free": {"lr": ("log", 0.3, 1.0), "damping": ("log", 1e-2, 10.0)},
    "kfac": {"lr": ("log", 0.03, 1.0), "damping": ("log", 1e-2, 1.0)},
    "shampoo": {"lr": ("log", 1e-3, 1e-1), "momentum": ("choice", [0.0, 0.9])},
    "soap": {"lr": ("log", 3e-4, 3e-2), "weight_decay": ("log", 1e-4, 1e-1)},
    "psgd": {"lr": ("log", 1e-4, 3e-2), "momentum": ("choice", [0.9, 0.95])},
    "muon": {"lr": ("log", 3e-3, 1e-1), "adamw_lr": ("log", 1e-4, 3e-3)},
    "adamw": {"lr": ("log", 1e-4, 1e-2), "weight_decay": ("log", 1e-4, 1e-1)},
    "adam": {"lr": ("log", 1e-4, 1e-2)},
    "sgd": {"lr": ("log", 1e-2, 1.0), "momentum": ("choice", [0.0, 0.9])},
}

#: problem → spec (sizes are filled in by the preset)
PROBLEMS: dict[str, dict] = {
    "revmlp_mnist_full_batch": dict(model="gnrev.revmlp", dataset="gnrev.mnist", gn="gnrev.exact_gn",
                                    full_batch=True),
    "revmlp_mnist_mini_batch": dict(model="gnrev.revmlp", dataset="gnrev.mnist", gn="gnrev.exact_gn"),
    "mlp_mnist1d": dict(model="gnrev.mlp", dataset="gnrev.mnist1d", gn="gnrev.dense_gn"),
    "deepobs_mnist_mlp": dict(model="gnrev.mlp", dataset="gnrev.mnist", gn="gnrev.dense_gn",
                              model_kwargs=dict(hidden=[1000, 500, 100], activation="relu")),
}
MISSING_PROBLEMS = {
    "deepobs_mnist_logreg": "gnrev.mlp requires ≥ 1 hidden layer (no registry logistic regression)",
    "deepobs_mnist_2c2d": ("no registry model for DeepOBS's 2c2d conv net (DenseGN runs it "
                           "through DeepOBS's runner: docs/runners/deepobs.md)"),
}


def _problem(name: str, **sizes) -> dict:
    spec = copy.deepcopy(PROBLEMS[name])
    spec.update(sizes)
    return spec


LEADERBOARD_PRESETS: dict[str, dict] = {
    "smoke": dict(
        contestants=DEFAULT_CONTESTANTS, trials=2, seeds=[0], tuning_seed=0, probe_rounds=3,
        tau_max=4.0, target_fraction=0.99, loss_target_factor=1.25,
        problems={
            "revmlp_mnist_full_batch": _problem("revmlp_mnist_full_batch", train_size=32, val_size=32,
                                                epochs=3, model_kwargs=dict(hidden=32, num_blocks=2)),
            "mlp_mnist1d": _problem("mlp_mnist1d", train_size=64, val_size=64, batch_size=32, epochs=2,
                                    model_kwargs=dict(hidden=[16])),
        },
    ),
    "quick": dict(
        contestants=DEFAULT_CONTESTANTS, trials=3, seeds=[0, 1, 2], tuning_seed=0, probe_rounds=5,
        tau_max=4.0, target_fraction=0.99, loss_target_factor=1.25,
        problems={
            "revmlp_mnist_full_batch": _problem("revmlp_mnist_full_batch", train_size=128, val_size=512,
                                                epochs=8, model_kwargs=dict(hidden=128, num_blocks=2)),
            "revmlp_mnist_mini_batch": _problem("revmlp_mnist_mini_batch", train_size=512, val_size=512,
                                                batch_size=128, epochs=2,
                                                model_kwargs=dict(hidden=128, num_blocks=2)),
            "mlp_mnist1d": _problem("mlp_mnist1d", train_size=1000, val_size=1000, batch_size=128,
                                    epochs=3, model_kwargs=dict(hidden=[64, 64])),
        },
    ),
    "paper": dict(
        contestants=DEFAULT_CONTESTANTS, trials=8, seeds=[0, 1, 2], tuning_seed=0, probe_rounds=7,
        tau_max=4.0, target_fraction=0.99, loss_target_factor=1.25,
        problems={
            "revmlp_mnist_full_batch": _problem("revmlp_mnist_full_batch", train_size=1024,
                                                val_size=2000, epochs=100,
                                                model_kwargs=dict(hidden=8000, num_blocks=2)),
            "revmlp_mnist_mini_batch": _problem("revmlp_mnist_mini_batch", train_size=None,
                                                val_size=2000, batch_size=1024, epochs=100,
                                                model_kwargs=dict(hidden=8000, num_blocks=2)),
            "mlp_mnist1d": _problem("mlp_mnist1d", train_size=None, val_size=1000, batch_size=128,
                                    epochs=50, model_kwargs=dict(hidden=[100, 100])),
            "deepobs_mnist_mlp": _problem("deepobs_mnist_mlp", train_size=None, val_size=2000,
                                          batch_size=128, epochs=20),
        },
    ),
}


def get_leaderboard_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (``smoke``, ``quick`` or ``paper``).

    Args:
        name: the preset.

    Returns:
        The preset dict.
    """
    if name not in LEADERBOARD_PRESETS:
        raise ValueError(f"unknown leaderboard preset {name!r}; known: {sorted(LEADERBOARD_PRESETS)}")
    return copy.deepcopy(LEADERBOARD_PRESETS[name])
