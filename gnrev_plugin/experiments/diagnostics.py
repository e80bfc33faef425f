"""Per-epoch laziness diagnostics of a RevMLP relative to its initialisation (Buffelli et al.,
Fig. 4 and appendix), all computed with :mod:`gnrev_plugin.metrics` on a fixed probe batch
``X_p`` (the first ``probe_size`` training images):

* ``ntk_sim = A(Θ₀, Θ_t) = ⟨Θ₀, Θ_t⟩_F / (‖Θ₀‖_F ‖Θ_t‖_F)`` with the structured empirical NTK
  ``Θ = J Jᵀ`` of the logits (:func:`~gnrev_plugin.metrics.revmlp_ntk`);
* ``ntk_velocity = (1 − A(Θ_s, Θ_t)) / (t − s)`` between consecutive measured epochs ``s < t``
  (Fort et al. 2020's kernel velocity, cosine distance, ``dt`` in epochs; every epoch by default,
  so ``dt = 1``);
* ``ntk_sim_probe`` (optional, ``probe_ntk=True``): the reference code's random-probe cosine
  ``cos(K₀ v̄, K_t v̄)`` on the pre-readout features ``X^(L)`` with ``v̄`` the mean of
  ``num_probes`` Gaussian draws (:func:`~gnrev_plugin.metrics.random_probe_similarity`);
* ``cka/<layer>``: linear CKA between the representations ``[X1, X2]`` after each coupling
  half-layer at init and now (:func:`~gnrev_plugin.metrics.linear_cka`);
* ``wcos/<tensor>`` = ``cos(vec W₀, vec W_t)`` and ``wnorm/<tensor>`` = ``‖W_t‖_F / ‖W₀‖_F``
  per weight matrix, plus ``__all__`` over all parameters.
"""

from __future__ import annotations

import math

import torch

from gnrev_plugin import metrics

__all__ = ["RevMLPDiagnostics"]


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-readout features ``X^(L)`` the reference code's NTK probe uses."""
    return model.features(x)


class RevMLPDiagnostics:
    """Diagnostics against the initial model ``model_init`` on a fixed probe batch."""

    def __init__(self, model_init: torch.nn.Module, probe_x: torch.Tensor,
                 ntk: bool = True, cka: bool = True, weights: bool = True,
                 probe_ntk: bool = False, num_probes: int = 100, every: int = 1,
                 last_epoch: int | None = None) -> None:
        """``every``: measure at epoch 0, every ``every``-th epoch and at ``last_epoch`` only
        (other epochs' rows get no diagnostics); ``probe_ntk``: also log ``ntk_sim_probe``."""
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.probe_x = probe_x
        self.do_ntk, self.do_cka, self.do_weights = ntk, cka, weights
        self.do_probe, self.num_probes = probe_ntk, num_probes
        self.every, self.last_epoch = every, last_epoch
        self.model_init = model_init if probe_ntk else None
        self.init_params = metrics.snapshot_parameters(model_init)
        with torch.no_grad():
            self.K0 = self._ntk(model_init) if ntk else None
            self.reps0 = (metrics.revmlp_representations(model_init, probe_x, per="half_layer")
                          if cka else None)
        self.K_prev = self.K0
        self.prev_epoch = 0

    @classmethod
    def factory(cls, probe_size: int = 128, **flags):
        """``factory(model_init, dataset, spec)`` for :class:`gnrev_plugin.engine.Diagnostics`:
        the probe batch is the first ``probe_size`` training inputs, on the model's device and
        dtype (``last_epoch`` defaults to ``spec.epochs``)."""
        def make(model_init, dataset, spec):
            p = next(model_init.parameters())
            kw = dict(flags)
            kw.setdefault("last_epoch", spec.epochs)
            return cls(model_init, dataset.x_train[:probe_size].to(p.device, p.dtype), **kw)
        return make

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is measured: 0, multiples of ``every`` and ``last_epoch``."""
        return epoch % self.every == 0 or epoch == self.last_epoch

    def _ntk(self, model) -> torch.Tensor:
        return metrics.revmlp_ntk(model, self.probe_x).double()

    def measure(self, model: torch.nn.Module, epoch: int) -> dict:
        """The diagnostics of ``model`` at ``epoch`` (``{}`` when the epoch is not due)."""
        if not self.due(epoch):
            return {}
        row: dict[str, float] = {}
        if self.do_probe:   # VJP + JVP (torch.func), outside no_grad
            row["ntk_sim_probe"] = metrics.random_probe_similarity(
                self.model_init, model, self.probe_x, num_probes=self.num_probes,
                output_fn=_features)
        with torch.no_grad():
            row.update(self._measure(model, epoch))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in row.items()}

    def _measure(self, model: torch.nn.Module, epoch: int) -> dict:
        row: dict[str, float] = {}
        if self.do_ntk:
            K = self._ntk(model)
            row["ntk_sim"] = metrics.ntk_similarity(self.K0, K)
            row["ntk_velocity"] = (None if epoch == 0 else
                                   metrics.ntk_velocity(self.K_prev, K,
                                                        dt=float(epoch - self.prev_epoch)))
            self.K_prev = K
        self.prev_epoch = epoch
        if self.do_cka:
            reps = metrics.revmlp_representations(model, self.probe_x, per="half_layer")
            for name, v in metrics.cka_by_layer(self.reps0, reps).items():
                if name != "input":
                    row[f"cka/{name}"] = v
        if self.do_weights:
            cos = metrics.weight_cosine_similarity(self.init_params, model)
            ratio = metrics.weight_norm_ratio(self.init_params, model)
            for k in cos:
                if k == "__all__" or k.endswith("weight"):
                    row[f"wcos/{k}"] = cos[k]
                    row[f"wnorm/{k}"] = ratio[k]
        return row

    def state_dict(self) -> dict:
        return {"K_prev": self.K_prev, "prev_epoch": self.prev_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``Θ_{t−1}`` (checkpoints are loaded on the CPU; moved to ``Θ₀``'s device)."""
        K_prev = state["K_prev"]
        self.prev_epoch = state.get("prev_epoch", self.prev_epoch)
        self.K_prev = K_prev.to(self.K0.device) if (K_prev is not None and
                                                     self.K0 is not None) else K_prev
