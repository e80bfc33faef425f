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
* ``gnrev.sgd``: the reference's ``lr = 0.1``; ``gnrev.adam``: torch's ``lr = 1e-3``.
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
    "gnrev.sgd": dict(lr=0.1),
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
