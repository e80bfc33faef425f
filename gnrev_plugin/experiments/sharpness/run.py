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
``diverged`` with the accuracy of its last finite parameters. Runs are seconds long; ``--resume``
skips finished ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gnrev_plugin import data as gdata
from gnrev_plugin import metrics
from gnrev_plugin.build import RunSpec, build, load_data, loss_targets
from gnrev_plugin.metrics.hessian import dense_matrix, estimate_trace
from gnrev_plugin.optim.errors import NonFiniteError
from gnrev_plugin.stepping import evaluate, train_step

from ..presets import get_preset
from ..rundir import RunDir
from ..sweep import Job, run_jobs
from .report import build_sharpness_report

__all__ = ["run_sharpness", "sharpness_spec", "sharpness_configs", "load_split", "traces",
           "METHODS", "RHO_METHODS", "SIGMA2_METHODS"]

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


def _sharpness_run(run: RunDir, spec: RunSpec, extra: dict, split: tuple, resume: bool) -> None:
    run.write_config({"spec": spec.to_dict(), **extra}, resume)
    if resume and run.done:
        return
    run.reset()
    Xtr, ytr, Xte, yte, C = split
    built = build(spec, in_features=Xtr.shape[1], num_classes=C)
    model, opt, loss_fn = built.model, built.optimizer, built.loss_fn
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    Xtr, ytr, Xte, yte = Xtr.to(dev, dtype), ytr.to(dev), Xte.to(dev, dtype), yte.to(dev)
    T = loss_targets(spec.loss, ytr, C, dtype)
    Xp, Tp = Xtr[:spec.probe_size], T[:spec.probe_size]
    every, diverged, info = extra["every"], None, {}

    def log(epoch: int) -> None:
        tr_loss, tr_acc = evaluate(model, loss_fn, Xtr, ytr, T)
        te_loss, te_acc = evaluate(model, loss_fn, Xte, yte)
        row = dict(epoch=epoch, train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss,
                   test_acc=te_acc, diverged=diverged is not None,
                   **{k: sum(v) / len(v) for k, v in info.items() if v})
        if extra["curvature"] and math.isfinite(tr_loss):
            row.update(traces(model, loss_fn, Xp, Tp, extra["exact_max_dim"],
                              extra["trace_matvecs"], spec.seed))
        run.log(row)

    for epoch in range(spec.epochs + 1):
        if epoch % every == 0 or epoch == spec.epochs or diverged is not None:
            log(epoch)
        if epoch == spec.epochs or diverged is not None:
            break
        info = {k: [] for k in _INFO_KEYS}
        for xb, tb in gdata.minibatches(Xtr, T, spec.batch_size, spec.seed, epoch):
            try:
                res = train_step(opt, model, loss_fn, xb, tb, reevaluate=False)
            except NonFiniteError as err:
                diverged = str(err)
                break
            if not math.isfinite(res.loss_before):
                diverged = "non-finite training loss"
                break
            step_info = getattr(opt, "last_step_info", {})
            for k in _INFO_KEYS:
                if step_info.get(k) is not None:
                    info[k].append(step_info[k])
    if hasattr(opt, "close"):
        opt.close()
    run.write_result(dict(final=run.rows()[-1], diverged=diverged))


def run_sharpness(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                  data_dir: str | None = None, resume: bool = False, progress: bool = True,
                  preset: dict | None = None, device: str = "cpu") -> list[dict]:
    """Run (or resume) every dataset × configuration × seed into ``out`` and rebuild the
    report; returns the per-run statuses. The datasets are the preset's (``data`` is not used:
    the experiment compares MNIST and MNIST-1D)."""
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
                                _sharpness_run(run, spec, extra, splits[ds], resume)))
    statuses = run_jobs(out, jobs, progress=progress, desc="sharpness runs")
    build_sharpness_report(out, top.read_config())
    return statuses
