"""Every default a runner uses, in one place.

``gnrev train``, ``gnrev reproduce``, the benchopt solvers and benchmark, the DeepOBS runner and
the AlgoPerf submission build what they run through :func:`gnrev_plugin.build.build`, which fills
unset options from here (built-ins) or from a third-party entry's own registered ``defaults``.
The resolved values are written into every run's ``config.json`` (and into benchopt's solver
parameters and DeepOBS's ``optimizer_hyperparams``), so each result records them.

Choices, and why:

* ``gnrev.revmlp``: ``linear_first_block=True`` and ``init_std=1e-3`` are the paper's and the
  reference code's architecture (``RevMLP``'s own defaults); ``hidden = M = 1024`` and
  ``num_blocks = L = 2`` fit a CPU (the paper uses ``M = 8000``).
* ``gnrev.exact_gn`` / ``gnrev.dense_gn``: ``lr = α = 0.2`` is the paper's MNIST mini-batch GN
  step in function-space units (reference ``lr 0.1`` times ``L = 2``). ``rank_policy="warn"``:
  a runner never crashes mid-run on a rank-deficient batch; the step takes the least-squares
  update, records ``last_step_exact = False`` and the runners log the fraction of exact steps.
  (The optimizer classes themselves default to ``"raise"`` for direct use.)
* ``gnrev.kfac``: ``fisher_type="type-2"`` (exact GGN factors, deterministic); ``lr = 0.3`` and
  ``damping = 0.1``, factors recomputed at every step (``update_interval = 1``). Measured (RevMLP
  M = 128 on 128 MNIST images, full batch; MLP on MNIST-1D, batches of 128): ``damping = 1e-2``
  diverges within 15 steps on both, and so do factors reused for 3 or 10 steps on the RevMLP (its
  curvature grows by orders of magnitude from the ``init_std = 1e-3`` start); ``(0.3, 0.1)`` with
  fresh factors reaches loss 0.004 in 8 full-batch steps. The price: ``C`` backward passes per
  step for ``C`` classes.
* ``gnrev.hessian_free``: Martens (2010): ``lr = 1`` (the damping sets the step length), initial
  ``λ = 1`` adapted by the Levenberg-Marquardt rule, CG warm-started from ``0.95`` times the previous
  solution, capped at ``cg_max_iter = 20`` iterations (each one GGN-vector product ≈ two
  forward-backward passes) with relative residual ``1e-4``; no preconditioner (the ``"martens"`` one
  needs per-sample gradients, ``N × P`` memory).
* ``gnrev.sgd``: the reference's ``lr = 0.1``; ``gnrev.adam``: torch's ``lr = 1e-3``.
* rivals (``pytorch_optimizer.*``, :mod:`gnrev_plugin.hosts.rivals`): the package's defaults
  (SOAP ``lr = 3e-3``, ``precondition_frequency = 10``; Kron ``lr = 1e-3``, ``momentum = 0.9``;
  Muon ``lr = 0.02``, ``momentum = 0.95``, AdamW groups ``adamw_lr = 3e-4``; AdamW torch's;
  Shampoo ``lr = 1e-3``, ``preconditioning_compute_steps = 1``: with 10, the package leaves the
  preconditioner, hence the update, at zero for the first 9 steps). Shampoo's inverse matrix roots
  at every step are its real cost (≈ 0.6 s per step for one 784×256 layer on the loaded 2-core CPU).
* sharpness regularisers (``gnrev.sam`` ... ``gnrev.gn_trace_penalty``): base ``gnrev.sgd`` with
  its ``lr = 0.1`` (a wrapper passes base options through to the shared param groups);
  ``ρ = 0.05`` (Foret et al.'s SAM default); ``σ² = 1e-4`` (weight noise of
  standard deviation 0.01); one noise draw / Hutchinson probe / sampled label per step (the
  paper's); ``seed = 0`` for the methods' own generators, so a run is reproducible (the
  experiments pass the run's seed).
"""

from __future__ import annotations

import copy

__all__ = ["MODEL_DEFAULTS", "OPTIMIZER_DEFAULTS", "RUN_DEFAULTS", "RANK_POLICY", "run_defaults"]

#: The rank policy of the GN optimizers in every runner.
RANK_POLICY = "warn"

MODEL_DEFAULTS: dict[str, dict] = {
    "gnrev.revmlp": dict(hidden=1024, num_blocks=2, activation="relu", linear_first_block=True,
                         init_std=1e-3),
    "gnrev.revmlp_preset": dict(preset="mnist_small"),
    "gnrev.mlp": dict(hidden=[256, 256], activation="relu"),
}

OPTIMIZER_DEFAULTS: dict[str, dict] = {
    "gnrev.exact_gn": dict(lr=0.2, rank_policy=RANK_POLICY),
    "gnrev.dense_gn": dict(lr=0.2, rank_policy=RANK_POLICY),
    "gnrev.kfac": dict(lr=0.3, damping=0.1, update_interval=1, fisher_type="type-2"),
    "gnrev.hessian_free": dict(lr=1.0, damping=1.0, cg_max_iter=20, cg_tol=1e-4,
                               cg_warm_start=0.95, preconditioner="none"),
    "gnrev.sgd": dict(lr=0.1),
    # rivals (gnrev_plugin.hosts.rivals, pytorch-optimizer 4.1.0): the package's own defaults,
    # except where noted below
    "pytorch_optimizer.soap": dict(lr=3e-3, weight_decay=0.01, precondition_frequency=10),
    "pytorch_optimizer.shampoo": dict(lr=1e-3, momentum=0.0, preconditioning_compute_steps=1),
    "pytorch_optimizer.kron": dict(lr=1e-3, momentum=0.9),
    "pytorch_optimizer.muon": dict(lr=0.02, momentum=0.95, adamw_lr=3e-4),
    "pytorch_optimizer.adamw": dict(lr=1e-3, weight_decay=0.01),
    "gnrev.adam": dict(lr=1e-3),
    "gnrev.sam": dict(rho=0.05, base="gnrev.sgd", lr=0.1, ablate_nme=False),
    "gnrev.psam": dict(rho=0.05, base="gnrev.sgd", lr=0.1, ablate_nme=False),
    "gnrev.weight_noise": dict(sigma2=1e-4, samples=1, base="gnrev.sgd", lr=0.1,
                               ablate_nme=False, seed=0),
    "gnrev.hessian_trace_penalty": dict(sigma2=1e-4, samples=1, probes="gaussian",
                                        base="gnrev.sgd", lr=0.1,
                                        ablate_nme=False, seed=0),
    "gnrev.gn_trace_penalty": dict(sigma2=1e-4, samples=1, base="gnrev.sgd",
                                   lr=0.1, ablate_nme=False, seed=0),
}

#: Defaults of a run (:class:`gnrev_plugin.build.RunSpec`): what ``gnrev train`` runs with no
#: options (the README's main job).
RUN_DEFAULTS: dict = dict(
    model="gnrev.revmlp", optimizer="gnrev.exact_gn", loss="cross_entropy",
    dataset="gnrev.mnist", metrics=[], seed=42, device="cpu",
    epochs=3, batch_size=256, probe_size=128,
)


def run_defaults() -> dict:
    """A deep copy of :data:`RUN_DEFAULTS`.

    Returns:
        A fresh dict, safe to mutate.
    """
    return copy.deepcopy(RUN_DEFAULTS)
