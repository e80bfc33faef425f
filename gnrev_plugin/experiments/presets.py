"""Presets of ``gnrev reproduce``: ``paper`` (the papers' sizes), ``quick`` (≤ 3 min on 2 CPU
cores) and ``smoke`` (seconds; CI).

Exact GN (Buffelli et al.): RevMLP with ``L = 2`` blocks and a linear first block, as in the
reference code. ExactGN keeps the step exact as long as one block's systems have full row rank
(the ReLU block needs ``batch ≤ M + 1``, and in practice ``M`` well above the batch because MNIST's
constant border pixels make many hidden units always on or always off); the fraction of exact steps
is logged (``exact_frac``). Learning rates are the reference ones
(:data:`~gnrev_plugin.experiments.exact_gn.run.REFERENCE_LR`), GN in the ``α = L·lr_ref``
convention.

``quick`` shrinks the sizes to fit 3 minutes on 2 CPU cores: width 1024, a full batch of the first
512 images (the paper: 1024), mini-batches of 256 from the first 2048 training images, the first
1000 test images. ``paper`` uses the paper's sizes (M = 8000, full batch 1024, batch 1024, 100
epochs, the whole training split of ``--data-dir``).
"""

from __future__ import annotations

import copy

__all__ = ["EXACT_GN_PRESETS", "CONDITIONING_PRESETS", "NME_PRESETS", "SHARPNESS_PRESETS",
           "LAZINESS_PRESETS", "get_preset", "PRESET_NAMES", "EXPERIMENT_NAMES"]

PRESET_NAMES = ("quick", "paper", "smoke")

EXACT_GN_PRESETS: dict[str, dict] = {
    "paper": dict(
        hidden=8000, blocks=2, linear_first_block=True, seeds=[42, 43, 44],
        optimizers=["exact_gn", "adam", "sgd"], probe_size=256,
        full_batch=dict(subset=1024, epochs=100),
        mini_batch=dict(batch_size=1024, epochs=100, train_size=None),
    ),
    "quick": dict(
        hidden=1024, blocks=2, linear_first_block=True, seeds=[42, 43, 44],
        optimizers=["exact_gn", "adam", "sgd"], probe_size=64,
        full_batch=dict(subset=512, epochs=10),
        mini_batch=dict(batch_size=256, epochs=10, train_size=2048, test_size=1000),
    ),
    "smoke": dict(
        hidden=48, blocks=2, linear_first_block=True, seeds=[0],
        optimizers=["exact_gn", "adam", "sgd"], probe_size=8,
        full_batch=dict(subset=32, epochs=2),
        mini_batch=dict(batch_size=32, epochs=2, train_size=64, test_size=64),
    ),
}

CONDITIONING_PRESETS: dict[str, dict] = {
    "paper": dict(
        input_dim=64, num_classes=10, num_samples=2000, seeds=[0, 1, 2],
        depths=[2, 3, 4, 6, 8, 12, 16], widths=[64, 128, 512], width_factors=[16, 64],
        residual=dict(depth=5, width=64, betas=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0]),
        training=dict(widths=[15, 20, 50, 100, 150, 200], num_samples=1000, epochs=200,
                      lr=0.1, batch_size=None, every=10, input_dim=64),
    ),
    "quick": dict(
        input_dim=32, num_classes=10, num_samples=1000, seeds=[0, 1, 2],
        depths=[2, 3, 4, 6, 8], widths=[64, 128, 512], width_factors=[16],
        residual=dict(depth=5, width=32, betas=[0.0, 0.5, 1.0, 2.0]),
        training=dict(widths=[20, 50, 200], num_samples=64, epochs=40, lr=0.1,
                      batch_size=None, every=8, input_dim=32),
    ),
    "smoke": dict(
        input_dim=8, num_classes=4, num_samples=64, seeds=[0],
        depths=[2, 3], widths=[16], width_factors=[4],
        residual=dict(depth=3, width=8, betas=[0.0, 1.0]),
        training=dict(widths=[8], num_samples=16, epochs=4, lr=0.1, batch_size=None, every=2,
                      input_dim=8),
    ),
}

NME_PRESETS: dict[str, dict] = {
    "paper": dict(
        activations=["linear", "relu", "gelu", "tanh", "beta_gelu:4", "beta_gelu:16"],
        input_dim=64, hidden=[128, 128], num_samples=2048, probe_samples=256, epochs=50,
        lr=0.05, batch_size=128, every=5, seeds=[0, 1], loss="cross_entropy",
        exact_max_dim=1500,
    ),
    "quick": dict(
        activations=["linear", "relu", "gelu", "tanh", "beta_gelu:4", "beta_gelu:16"],
        input_dim=16, hidden=[16, 16], num_samples=1024, probe_samples=128, epochs=12,
        lr=0.1, batch_size=64, every=3, seeds=[0], loss="cross_entropy", exact_max_dim=1500,
    ),
    "smoke": dict(
        activations=["relu", "gelu"], input_dim=6, hidden=[5, 5], num_samples=64,
        probe_samples=16, epochs=2, lr=0.1, batch_size=32, every=1, seeds=[0],
        loss="cross_entropy", exact_max_dim=1500,
    ),
}

#: Sharpness regularisers (Dauphin et al.): ``quick`` fits 10 minutes on 2 CPU cores
#: (:mod:`~gnrev_plugin.experiments.sharpness.run`).
SHARPNESS_PRESETS: dict[str, dict] = {
    "paper": dict(
        datasets=["mnist", "mnist1d"], num_train=4000, num_test=1000, input_dim=64,
        hidden=[256, 256], activations=["relu", "gelu", "beta_gelu:2", "beta_gelu:5",
                                        "beta_gelu:20"],
        ablate=["gelu"], methods=["gnrev.sam", "gnrev.psam", "gnrev.weight_noise",
                                  "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty"],
        rhos=[0.01, 0.03, 0.1, 0.3, 1.0], sigma2s=[1e-4, 1e-3, 1e-2, 1e-1], samples=1,
        seeds=[0, 1, 2], epochs=50, lr=0.5, batch_size=128, every=5, probe_size=256,
        curvature_seeds=[0], curvature_methods=["gnrev.sgd", "gnrev.hessian_trace_penalty",
                                                "gnrev.gn_trace_penalty"],
        exact_max_dim=2000, trace_matvecs=90,
    ),
    "quick": dict(
        datasets=["mnist", "mnist1d"], num_train=2048, num_test=1000, input_dim=24,
        hidden=[24], activations=["relu", "gelu", "beta_gelu:3", "beta_gelu:10"],
        ablate=["gelu"], methods=["gnrev.sam", "gnrev.psam", "gnrev.weight_noise",
                                  "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty"],
        rhos=[0.05, 0.2, 0.8], sigma2s=[1e-3, 1e-2, 1e-1], samples=1,
        seeds=[0, 1, 2], epochs=6, lr=0.5, batch_size=128, every=3, probe_size=128,
        curvature_seeds=[0], curvature_methods=["gnrev.sgd", "gnrev.hessian_trace_penalty",
                                                "gnrev.gn_trace_penalty"],
        exact_max_dim=2000, trace_matvecs=90,
    ),
    "smoke": dict(
        datasets=["mnist1d"], num_train=64, num_test=32, input_dim=8, hidden=[6],
        activations=["relu", "gelu"], ablate=["gelu"],
        methods=["gnrev.sam", "gnrev.psam", "gnrev.weight_noise", "gnrev.hessian_trace_penalty",
                 "gnrev.gn_trace_penalty"],
        rhos=[0.1, 1.0], sigma2s=[1e-2], samples=1, seeds=[0], epochs=2, lr=0.5, batch_size=32,
        every=1, probe_size=16, curvature_seeds=[0],
        curvature_methods=["gnrev.sgd", "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty"],
        exact_max_dim=2000, trace_matvecs=30,
    ),
}

#: The reference code's truncated pseudo-inverse as ExactGN options (singular values
#: ``s < 1e-2·s_max`` or ``s < 1e-5`` dropped); ``exact`` = the registered defaults.
_GN_STEPS = {"exact": {}, "truncated": {"solver": "eigh", "rtol": 1e-2, "atol": 1e-5}}

#: Is exact GN lazy? (:mod:`~gnrev_plugin.experiments.laziness.run`). One factor at a time around
#: ``base``: the ``widths`` axis runs every optimizer × GN step, the ``alphas`` axis GN (both
#: steps) at the base width, the ``inits`` axis every optimizer × step at the base width
#: (``paper``: init std 1e-3; ``fan_in``: 1/√M). ``base.alpha = None``: the reference full-batch
#: GN step α = L·0.5 = 1.0; Adam/SGD use the reference 1e-4 / 0.1. Full batch (``batch_size =
#: None``) of the first ``subset`` training images; ``every``: diagnostics every that many epochs.
#: ``quick`` (20 configurations × 2 seeds) aims at 10 minutes on 2 CPU cores for MNIST-1D;
#: ``paper``: the paper's widths
#: (512 … 8000), full batch 1024, 100 epochs, 3 seeds.
LAZINESS_PRESETS: dict[str, dict] = {
    "paper": dict(
        blocks=2, linear_first_block=True, seeds=[0, 1, 2], probe_size=128, num_probes=100,
        every=5, subset=1024, test_size=None, batch_size=None, epochs=100,
        base=dict(width=2048, init="paper", alpha=None),
        widths=[512, 1024, 2048, 4000, 8000], alphas=[0.2, 0.5, 2.0], inits=["fan_in"],
        optimizers=["exact_gn", "adam", "sgd"], steps=_GN_STEPS,
    ),
    "quick": dict(
        blocks=2, linear_first_block=True, seeds=[0, 1], probe_size=64, num_probes=100,
        every=4, subset=256, test_size=1000, batch_size=None, epochs=20,
        base=dict(width=512, init="paper", alpha=None),
        widths=[256, 512, 1024], alphas=[0.2, 0.5], inits=["fan_in"],
        optimizers=["exact_gn", "adam", "sgd"], steps=_GN_STEPS,
    ),
    "smoke": dict(
        blocks=2, linear_first_block=True, seeds=[0], probe_size=8, num_probes=10,
        every=2, subset=24, test_size=32, batch_size=None, epochs=2,
        base=dict(width=32, init="paper", alpha=None),
        widths=[16, 32], alphas=[0.5], inits=["fan_in"],
        optimizers=["exact_gn", "adam", "sgd"], steps=_GN_STEPS,
    ),
}

_ALL = {"exact-gn": EXACT_GN_PRESETS, "conditioning": CONDITIONING_PRESETS, "nme": NME_PRESETS,
        "sharpness": SHARPNESS_PRESETS, "laziness": LAZINESS_PRESETS}

#: The experiments of ``gnrev reproduce`` (the keys of
#: :data:`~gnrev_plugin.experiments.catalog.EXPERIMENTS`, which imports their code); the leaderboard
#: study keeps its presets in :mod:`~gnrev_plugin.experiments.leaderboard_study.presets`.
EXPERIMENT_NAMES = (*_ALL, "leaderboard")


def get_preset(experiment: str, name: str) -> dict:
    """A deep copy of a preset (``experiment`` ∈ exact-gn, conditioning, nme, sharpness,
    laziness)."""
    if experiment not in _ALL:
        raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(_ALL)}")
    if name not in _ALL[experiment]:
        raise ValueError(f"unknown preset {name!r} for {experiment}; known: "
                         f"{sorted(_ALL[experiment])}")
    return copy.deepcopy(_ALL[experiment][name])
