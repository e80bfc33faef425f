"""``gnrev reproduce sharpness``: the activation-sensitivity experiment of Dauphin, Agarwala &
Mobahi (NeurIPS 2024) at small scale.

MLPs ``d → h₁ → … → C`` (the registered ``gnrev.mlp``, float64) with activation ∈ {ReLU, GELU,
β-GELU for several β} are trained on PCA-reduced inputs of each of the preset's datasets (the
shared MNIST split and MNIST-1D) with

* SGD (``gnrev.sgd``), the baseline;
* SAM and PSAM (``gnrev.sam``, ``gnrev.psam``) over the preset's ρ sweep, PSAM also on GELU with the
  activation NME ablated in its Hessian-vector product (``ablate_nme=True``);
* weight noise and the Hessian- and GN-trace penalties (``gnrev.weight_noise``,
  ``gnrev.hessian_trace_penalty``, ``gnrev.gn_trace_penalty``) over the σ² sweep;

every wrapper around ``gnrev.sgd`` at the same ``lr``, for the preset's seeds. Each run is a
:class:`~gnrev_plugin.build.RunSpec` built by :func:`gnrev_plugin.build.build` (recorded resolved in
its ``config.json``) and stepped by :func:`gnrev_plugin.stepping.train_step`. Logged every
``every`` epochs: train/test loss and accuracy, the optimizer's penalty estimates, and, for the
runs of the ``curvature_methods`` with a seed in ``curvature_seeds``, ``tr H``, ``tr G`` and
``tr NME = tr H − tr G`` of the mean cross-entropy on the first ``probe_size`` training inputs
(dense curvlinops matrices when ``P ≤ exact_max_dim``, else Hutch++ with ``trace_matvecs``
products).

A step the optimizer refuses as non-finite (:class:`~gnrev_plugin.optim.errors.NonFiniteError`,
parameters unchanged) or a non-finite training loss ends the run early; it is logged as
``diverged`` with the accuracy of its last finite parameters. Each run is a spec plus callbacks
(:class:`OptimizerInfo`, :class:`Traces`, :class:`~gnrev_plugin.engine.StopOnDivergence`) on the
training engine (:func:`gnrev_plugin.engine.train_run`): an interrupted run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gnrev_plugin import data as gdata
from gnrev_plugin import metrics
from gnrev_plugin.build import RunSpec, load_data
from gnrev_plugin.engine import Callback, EpochPlan, StopOnDivergence, train_run
from gnrev_plugin.engine.loop import permutation_of_previous_epoch
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.engine.sweep import Job, run_jobs
from gnrev_plugin.metrics.hessian import dense_matrix, estimate_trace

from ..presets import get_preset
from .report import build_sharpness_report

__all__ = ["run_sharpness", "sharpness_spec", "sharpness_configs", "load_split", "traces",
           "METHODS", "RHO_METHODS", "SIGMA2_METHODS", "OptimizerInfo", "Traces"]

#: The methods, by registry name.
RHO_METHODS = ("gnrev.sam", "gnrev.psam")
SIGMA2_METHODS = ("gnrev.weight_noise", "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty")
METHODS = ("gnrev.sgd", *RHO_METHODS, *SIGMA2_METHODS)


def load_split(data: str, data_dir: str | None, num_train: int, num_test: int, dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, str]:
    """The first ``num_train`` training and ``num_test`` test inputs of dataset ``data`` (through
    the registry), projected on the top-``dim`` principal directions of the training inputs'
    uncentred second moment ``Σ = XᵀX/n = VΛVᵀ`` and whitened with the training ``Λ``:
    ``X ↦ X V Λ^{-1/2}`` (float64; the test inputs use the training ``V``, ``Λ``)."""
    ds = load_data(data, {} if data_dir is None else {"data_dir": str(data_dir)})
    if num_train > len(ds.y_train) or num_test > len(ds.y_test):
        raise ValueError(f"{data} has {len(ds.y_train)} training and {len(ds.y_test)} test "
                         f"samples; {num_train} and {num_test} requested")
    Xtr, Xte = ds.x_train[:num_train].double(), ds.x_test[:num_test].double()
    dim = min(dim, Xtr.shape[1])
    lam, V = torch.linalg.eigh(Xtr.T @ Xtr / len(Xtr))
    lam, V = lam.flip(0)[:dim], V.flip(1)[:, :dim]
    if not lam[-1] > 0:
        raise ValueError(f"{data}: the training inputs have rank < {dim}; lower input_dim")
    W = V / lam.sqrt()
    desc = (f"{ds.describe()}; first {num_train} training / {num_test} test samples, top {dim} "
            "PCA components of the training inputs, whitened")
    return (Xtr @ W, ds.y_train[:num_train], Xte @ W, ds.y_test[:num_test], ds.num_classes,
            desc)


def sharpness_configs(preset: dict) -> list[dict]:
    """Every ``(activation, method, hyperparameter, ablate_nme)`` of the preset (per dataset
    and seed): SGD per activation; SAM/PSAM per ρ; PSAM with ``ablate_nme`` on the preset's
    ``ablate`` activations; the σ² methods per σ²."""
    out = []
    for act in preset["activations"]:
        out.append(dict(activation=act, method="gnrev.sgd", hyper=None, ablate=False))
        for method in preset["methods"]:
            if method in RHO_METHODS:
                out += [dict(activation=act, method=method, hyper=r, ablate=False)
                        for r in preset["rhos"]]
            elif method in SIGMA2_METHODS:
                out += [dict(activation=act, method=method, hyper=s, ablate=False)
                        for s in preset["sigma2s"]]
    for act in preset.get("ablate", []):
        out += [dict(activation=act, method="gnrev.psam", hyper=r, ablate=True)
                for r in preset["rhos"]]
    return out


def sharpness_spec(preset: dict, cfg: dict, seed: int, data: str, device: str = "cpu"
                   ) -> RunSpec:
    """The resolved spec of one run: ``gnrev.mlp`` (preset ``hidden``, the activation, biases,
    float64) and the method at the preset's ``lr`` (ρ or σ², ``ablate_nme``; the noisy methods'
    generators seeded by the run seed)."""
    method = cfg["method"]
    kw: dict = dict(lr=preset["lr"])
    if method in RHO_METHODS:
        kw.update(rho=cfg["hyper"], ablate_nme=cfg["ablate"])
    elif method in SIGMA2_METHODS:
        kw.update(sigma2=cfg["hyper"], ablate_nme=cfg["ablate"], seed=seed,
                  samples=preset["samples"])
    return RunSpec(
        model="gnrev.mlp",
        model_kwargs=dict(hidden=list(preset["hidden"]), activation=cfg["activation"],
                          bias=True, dtype="float64"),
        optimizer=method, optimizer_kwargs=kw, loss="cross_entropy", dataset=data, metrics=[],
        seed=seed, device=device, epochs=preset["epochs"], batch_size=preset["batch_size"],
        probe_size=preset["probe_size"]).resolve()


def traces(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, T: torch.Tensor,
           exact_max_dim: int, matvecs: int, seed: int) -> dict:
    """``tr H``, ``tr G`` and ``tr NME = tr H − tr G`` of ``loss_fn(model(X), T)``
    (:func:`gnrev_plugin.metrics.decompose`): exact from the dense matrices when the model has
    ``P ≤ exact_max_dim`` parameters, else Hutch++ estimates (``matvecs`` products each)."""
    dec = metrics.decompose(model, loss_fn, (X, T))
    if dec.num_params <= exact_max_dim:
        tr_h = float(torch.trace(dense_matrix(dec.hessian)))
        tr_g = float(torch.trace(dense_matrix(dec.ggn)))
        mode = "exact"
    else:
        tr_h = float(estimate_trace(dec.hessian, "hutchpp", matvecs, seed=seed)[0])
        tr_g = float(estimate_trace(dec.ggn, "hutchpp", matvecs, seed=seed)[0])
        mode = "hutchpp"
    return dict(tr_hessian=tr_h, tr_ggn=tr_g, tr_nme=tr_h - tr_g, curvature_mode=mode)


_INFO_KEYS = ("penalty", "hessian_trace_estimate", "gn_trace_estimate", "grad_norm")


class OptimizerInfo(Callback):
    """The epoch's mean of each of the optimizer's ``last_step_info`` estimates (the penalty,
    the trace estimates, the gradient norm) over its finite steps."""

    def __init__(self) -> None:
        self.info: dict[str, list[float]] = {}

    def on_epoch_start(self, state, epoch: int) -> None:
        self.info = {k: [] for k in _INFO_KEYS}

    def on_step(self, state, epoch: int, result) -> None:
        step_info = getattr(state.optimizer, "last_step_info", {})
        for k in _INFO_KEYS:
            if step_info.get(k) is not None:
                self.info[k].append(step_info[k])

    def measure(self, state, epoch: int, row: dict) -> dict:
        return {k: sum(v) / len(v) for k, v in self.info.items() if v}


class Traces(Callback):
    """:func:`traces` of each row with a finite training loss, on the first ``probe_size``
    training samples."""

    def __init__(self, exact_max_dim: int, matvecs: int) -> None:
        self.exact_max_dim, self.matvecs = exact_max_dim, matvecs

    def measure(self, state, epoch: int, row: dict) -> dict:
        if not math.isfinite(row["train_loss"]):
            return {}
        p = state.spec.probe_size
        return traces(state.model, state.loss_fn, state.x_train[:p], state.t_train[:p],
                      self.exact_max_dim, self.matvecs, state.spec.seed)


def _sharpness_run(run: RunDir, spec: RunSpec, extra: dict, split: tuple, resume: bool,
                   progress: bool = False, callbacks: Sequence[Callback] = ()) -> None:
    """One run on the training engine: a row every ``extra["every"]`` epochs; a divergence ends
    the run after a row marked ``diverged``."""
    Xtr, ytr, Xte, yte, C = split
    data = gdata.Dataset(spec.dataset, Xtr, ytr, Xte, yte, C)
    plan = EpochPlan(every=extra["every"], reevaluate=False,
                     batch_order=permutation_of_previous_epoch)
    own: list[Callback] = [StopOnDivergence(), OptimizerInfo()]
    if extra["curvature"]:
        own.append(Traces(extra["exact_max_dim"], extra["trace_matvecs"]))
    train_run(spec, data, run, [*own, *callbacks], plan, resume=resume, progress=progress,
              extra_config=extra)


def run_sharpness(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                  data_dir: str | None = None, resume: bool = False, progress: bool = True,
                  preset: dict | None = None, device: str = "cpu",
                  callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run (or resume) every dataset × configuration × seed into ``out`` and rebuild the
    report; returns the per-run statuses. The datasets are the preset's (``data`` is not used:
    the experiment compares MNIST and MNIST-1D). ``callbacks`` join every training run's own
    (after them), e.g. to stop the sweep."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("sharpness", preset_name)
    splits, descs = {}, {}
    for ds in preset["datasets"]:
        *split, desc = load_split(ds, data_dir if ds == "mnist" else None, preset["num_train"],
                                  preset["num_test"], preset["input_dim"])
        splits[ds], descs[ds] = tuple(split), desc
    top = RunDir(out)
    top.write_config(dict(experiment="sharpness", preset_name=preset_name, preset=preset,
                          datasets=preset["datasets"], data_describe=descs), resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    jobs = []
    for ds in preset["datasets"]:
        for cfg in sharpness_configs(preset):
            for seed in preset["seeds"]:
                spec = sharpness_spec(preset, cfg, seed, ds, device)
                extra = dict(every=preset["every"], exact_max_dim=preset["exact_max_dim"],
                             trace_matvecs=preset["trace_matvecs"],
                             curvature=(seed in preset["curvature_seeds"]
                                        and cfg["method"] in preset["curvature_methods"]),
                             activation=cfg["activation"], method=cfg["method"],
                             hyper=cfg["hyper"], ablate=cfg["ablate"], dataset=ds)
                method = cfg["method"].removeprefix("gnrev.") + ("+ablated" if cfg["ablate"]
                                                                 else "")
                hyper = "" if cfg["hyper"] is None else f"/{cfg['hyper']:g}"
                name = f"{ds}/{cfg['activation'].replace(':', '')}/{method}{hyper}/seed{seed}"
                run = RunDir(out / "runs" / name)
                jobs.append(Job(name, run.path,
                                lambda run=run, spec=spec, extra=extra, ds=ds:
                                _sharpness_run(run, spec, extra, splits[ds], resume, progress,
                                               callbacks)))
    statuses = run_jobs(out, jobs, progress=progress, desc="sharpness runs")
    build_sharpness_report(out, top.read_config())
    return statuses
