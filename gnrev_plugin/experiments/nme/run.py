"""``gnrev reproduce nme``: the Hessian split ``H = G + NME`` over training (Dauphin, Agarwala &
Mobahi, NeurIPS 2024).

MLPs ``d → h₁ → … → C`` with activation ∈ {linear, ReLU, GELU, tanh, β-GELU} (the registered
``gnrev.mlp``, float64) are trained with mini-batch SGD (``gnrev.sgd``) on the preset's loss (the
mean cross-entropy), on PCA-reduced MNIST (or MNIST-1D) inputs; each run is a
:class:`~gnrev_plugin.build.RunSpec` built by :func:`gnrev_plugin.build.build` and recorded in its
``config.json``. Every few epochs, on the fixed probe set ``(X_p, y_p)`` (the first
``probe_samples`` inputs), :func:`gnrev_plugin.metrics.decompose` builds the curvlinops operators
of ``H``, ``G`` and ``NME = H − G`` and its summary gives ``tr(H)``, ``tr(G)``, ``tr(NME)``
(exact for ``P ≤ exact_max_dim`` parameters, else Hutch++), the NME's extreme eigenvalues and
``‖NME‖_F/‖H‖_F``.

Expected from the theory (checked in the report): linear nets have ``NME ≡ 0`` up to the
cross-layer terms, ReLU nets have ``tr(NME) = 0`` (``φ'' = 0`` a.e.), smooth activations have a
nonzero NME trace, and β-GELU approaches ReLU as β grows.
Each run is a spec plus the :class:`Curvature` callback on the training engine
(:func:`gnrev_plugin.engine.train_run`): an interrupted run resumes exactly (``--resume``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gnrev_plugin import data as gdata
from gnrev_plugin import metrics
from gnrev_plugin.build import RunSpec
from gnrev_plugin.engine import Callback, EpochPlan, train_run
from gnrev_plugin.engine.loop import permutation_of_previous_epoch
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.engine.sweep import Job, run_jobs

from ..presets import get_preset
from ..whitening import whitened_inputs
from .report import build_nme_report

__all__ = ["run_nme", "nme_spec", "curvature_row", "Curvature"]


def nme_spec(preset: dict, activation: str, seed: int, data: str, device: str = "cpu"
             ) -> RunSpec:
    """The resolved spec of one run: ``gnrev.mlp`` (``hidden``, ``activation``, biases, float64),
    ``gnrev.sgd`` at the preset's ``lr``, the preset's loss and batch size."""
    return RunSpec(
        model="gnrev.mlp",
        model_kwargs=dict(hidden=list(preset["hidden"]), activation=activation, bias=True,
                          dtype="float64"),
        optimizer="gnrev.sgd", optimizer_kwargs=dict(lr=preset["lr"]), loss=preset["loss"],
        dataset=data, metrics=[], seed=seed, device=device, epochs=preset["epochs"],
        batch_size=preset["batch_size"], probe_size=preset["probe_samples"]).resolve()


def curvature_row(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, targets: torch.Tensor,
                  exact_max_dim: int, seed: int) -> dict:
    """The logged curvature of ``loss_fn(model(X), targets)``: ``tr(H)``, ``tr(G)``,
    ``tr(NME)``, ``λ_max``/``λ_min`` of the NME and of ``H``, ``‖NME‖_F/‖H‖_F``, the summary's
    mode and the number of parameters ``P`` (:meth:`~gnrev_plugin.metrics.HessianDecomposition
    .summary`)."""
    s = metrics.decompose(model, loss_fn, (X, targets)).summary(
        exact_max_dim=exact_max_dim, per_block=False, seed=seed)
    top = s.top_eigenvalues
    return dict(tr_hessian=s.trace["hessian"].value, tr_ggn=s.trace["ggn"].value,
                tr_nme=s.trace["nme"].value,
                nme_eig_max=top["nme"][0] if top.get("nme") else None,
                nme_eig_min=s.lambda_min_nme,
                hessian_eig_max=top["hessian"][0] if top.get("hessian") else None,
                hessian_eig_min=s.lambda_min_hessian,
                nme_fro_over_h_fro=s.ratios.nme_fro_over_hessian_fro,
                mode=s.mode, num_params=s.num_params)


class Curvature(Callback):
    """The :func:`curvature_row` of each row, on the probe batch (the first ``probe_size``
    training samples)."""

    def __init__(self, exact_max_dim: int) -> None:
        self.exact_max_dim = exact_max_dim

    def measure(self, state, epoch: int, row: dict) -> dict:
        p = state.spec.probe_size
        return curvature_row(state.model, state.loss_fn, state.x_train[:p], state.t_train[:p],
                             self.exact_max_dim, state.spec.seed)


def _nme_run(run: RunDir, spec: RunSpec, extra: dict, X: torch.Tensor, y: torch.Tensor,
             num_classes: int, resume: bool, progress: bool = False,
             callbacks: Sequence[Callback] = ()) -> None:
    """One run on the training engine: mini-batch SGD, a row with the curvature every
    ``extra["every"]`` epochs."""
    data = gdata.Dataset(spec.dataset, X, y, None, None, num_classes)
    plan = EpochPlan(every=extra["every"], reevaluate=False,
                     batch_order=permutation_of_previous_epoch)
    train_run(spec, data, run, [Curvature(extra["exact_max_dim"]), *callbacks], plan, resume=resume,
              progress=progress, extra_config=extra)


def run_nme(out: str | Path, preset_name: str = "quick", data: str = "mnist",
            data_dir: str | None = None, resume: bool = False, progress: bool = True,
            preset: dict | None = None, device: str = "cpu",
            callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run (or resume) every activation × seed into ``out``, rebuild the report; returns the
    per-run statuses. ``callbacks`` join every training run's own (after them), e.g. to stop the
    sweep."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("nme", preset_name)
    X, y, C, desc = whitened_inputs(data, data_dir, preset["num_samples"], preset["input_dim"])
    top = RunDir(out)
    top.write_config(dict(experiment="nme", preset_name=preset_name, preset=preset, data=data,
                          data_describe=desc), resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    jobs = []
    for act in preset["activations"]:
        for seed in preset["seeds"]:
            spec = nme_spec(preset, act, seed, data, device)
            extra = dict(every=preset["every"], exact_max_dim=preset["exact_max_dim"],
                         data_describe=desc)
            name = f"{act.replace(':', '')}/seed{seed}"
            run = RunDir(out / "runs" / name)
            jobs.append(Job(name, run.path, lambda run=run, spec=spec, extra=extra:
                            _nme_run(run, spec, extra, X, y, C, resume, progress, callbacks)))
    statuses = run_jobs(out, jobs, progress=progress, desc="nme runs")
    build_nme_report(out, top.read_config())
    return statuses
