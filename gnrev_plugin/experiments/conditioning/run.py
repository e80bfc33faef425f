"""``gnrev reproduce conditioning``: Gauss-Newton conditioning (Zhao, Singh & Lucchi, NeurIPS 2024).

Three parts, on PCA-whitened MNIST (or MNIST-1D) inputs ``X`` with ``Σ = XᵀX/n = I``:

1. **Depth and width** (paper Fig. 2): deep linear nets ``F(x) = W_L⋯W_1 x`` with Kaiming-normal
   weights (``N(0, 2/fan_in)``), hidden width ``m``; ``κ(G) = λ_max/λ_min^{≠0}`` from the spectrum
   lemma (nonzero ``eig(G)`` = ``eig((Σ^{1/2}⊗I) M (Σ^{1/2}⊗I))``,
   :func:`~gnrev_plugin.metrics.deep_linear_gn_spectrum`) against the convex-combination and the
   loose upper bounds (:func:`~gnrev_plugin.metrics.deep_linear_condition_bounds`); also widths
   scaled with depth, ``m = c·L``. These are weight matrices, not trained models.
2. **Residual connections** (Fig. 4): square hidden layers ``W_l → W_l + βI``
   (:func:`~gnrev_plugin.metrics.residual_weights`), κ and bounds against β.
3. **Training**: a two-layer ReLU net ``F(x) = W relu(Vx + b) + c`` (the registered
   ``gnrev.mlp`` with ``hidden=[m]``, float64) trained by full-batch gradient descent
   (``gnrev.sgd``) on the mean squared error to one-hot targets; every few epochs the registered run
   metric ``gnrev.gn_condition_number_on_batch`` logs κ(G) on the column space of the Gram
   (``nC × nC``) of all training samples, for several widths. Each run is a
   :class:`~gnrev_plugin.build.RunSpec` built by :func:`gnrev_plugin.build.build`.

   The preset's ``lr`` is the paper's step ``η`` on ``½‖F − Y‖²/n``. The run's loss is torch's
   ``MSELoss`` (``‖F − Y‖²/(nC)``), whose gradient is ``2/C`` times that one, so the optimizer gets
   ``lr = η·C/2`` and the iterates are the paper's; κ(G) does not depend on the loss's scale.

Each training run is a spec on the training engine (:func:`gnrev_plugin.engine.train_run`): an
interrupted run resumes exactly (``--resume``); finished runs (``result.json``) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from gnrev_plugin import data as gdata
from gnrev_plugin import metrics
from gnrev_plugin.build import RunSpec
from gnrev_plugin.engine import Callback, EpochPlan, train_run
from gnrev_plugin.engine.loop import in_order
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.engine.sweep import Job, run_jobs

from ..presets import get_preset
from ..whitening import whitened_inputs
from .report import KAPPA_METRIC, build_conditioning_report

__all__ = ["run_conditioning", "kaiming_linear_weights", "training_spec"]


def kaiming_linear_weights(widths: list[int], seed: int) -> list[torch.Tensor]:
    """``W_l ∈ R^{m_l × m_{l−1}}`` with entries ``N(0, 2/m_{l−1})`` (Kaiming normal, fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m_out, m_in, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / m_in)
            for m_in, m_out in zip(widths[:-1], widths[1:], strict=True)]


def _kappa_row(Ws, Sigma) -> dict:
    ev = metrics.deep_linear_gn_spectrum(Ws, Sigma)
    rep = metrics.condition_number_from_eigenvalues(ev)
    b = metrics.deep_linear_condition_bounds(Ws, Sigma)
    return dict(kappa=rep.kappa, rank=rep.rank, bound_convex=b["convex"],
                bound_loose=b["loose"])


def _depth_width(run: RunDir, cfg: dict, Sigma: torch.Tensor, resume: bool) -> None:
    run.write_config(cfg, resume)
    if resume and run.done:
        return
    run.reset()
    d, k, seed = cfg["input_dim"], cfg["num_classes"], cfg["seed"]
    for L in cfg["depths"]:
        for m in cfg["widths"]:
            Ws = kaiming_linear_weights([d] + [m] * (L - 1) + [k], seed * 1000 + L * 7 + m)
            run.log(dict(kind="fixed_width", depth=L, width=m, **_kappa_row(Ws, Sigma)))
        for c in cfg["width_factors"]:
            m = c * L
            Ws = kaiming_linear_weights([d] + [m] * (L - 1) + [k], seed * 1000 + L * 7 + m + 1)
            run.log(dict(kind="proportional", depth=L, width=m, factor=c,
                         **_kappa_row(Ws, Sigma)))
    run.write_result(dict(rows=len(run.rows())))


def _residual(run: RunDir, cfg: dict, Sigma: torch.Tensor, resume: bool) -> None:
    run.write_config(cfg, resume)
    if resume and run.done:
        return
    run.reset()
    r = cfg["residual"]
    widths = [cfg["input_dim"]] + [r["width"]] * (r["depth"] - 1) + [cfg["num_classes"]]
    Ws = kaiming_linear_weights(widths, cfg["seed"])
    for beta in r["betas"]:
        run.log(dict(beta=beta, depth=r["depth"], width=r["width"],
                     **_kappa_row(metrics.residual_weights(Ws, beta), Sigma)))
    run.write_result(dict(rows=len(run.rows())))


def training_spec(training: dict, width: int, seed: int, num_classes: int, data: str,
                  device: str = "cpu") -> RunSpec:
    """The resolved spec of one training run: ``gnrev.mlp`` with ``hidden=[width]`` (ReLU, biases,
    float64), ``gnrev.sgd`` with ``lr = η·C/2`` (``η = training["lr"]`` on ``½‖F − Y‖²/n``), MSE,
    full batch, κ(G) by ``gnrev.gn_condition_number_on_batch`` on all samples."""
    n = training["num_samples"]
    return RunSpec(
        model="gnrev.mlp",
        model_kwargs=dict(hidden=[width], activation="relu", bias=True, dtype="float64"),
        optimizer="gnrev.sgd", optimizer_kwargs=dict(lr=training["lr"] * num_classes / 2),
        loss="mse", dataset=data, metrics=[KAPPA_METRIC], seed=seed, device=device,
        epochs=training["epochs"], batch_size=n, probe_size=n).resolve()


def _training(run: RunDir, spec: RunSpec, extra: dict, X: torch.Tensor, y: torch.Tensor,
              num_classes: int, resume: bool, progress: bool = False,
              callbacks: Sequence[Callback] = ()) -> None:
    """One training run on the engine: full-batch GD on the samples in order, a row (loss,
    accuracy, κ(G) by the spec's run metric) every ``extra["every"]`` epochs."""
    data = gdata.Dataset(spec.dataset, X, y, None, None, num_classes)
    plan = EpochPlan(every=extra["every"], reevaluate=False, batch_order=in_order)
    train_run(spec, data, run, list(callbacks), plan, resume=resume, progress=progress,
              extra_config=extra)


def run_conditioning(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                     data_dir: str | None = None, resume: bool = False, progress: bool = True,
                     preset: dict | None = None, device: str = "cpu",
                     callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run (or resume) the three parts into ``out``, rebuild the report; returns the per-run
    statuses. ``device`` is where the training runs train (the spectra are computed on the CPU);
    ``callbacks`` are given to every training run (e.g. to stop the sweep)."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("conditioning", preset_name)
    X, _, _, desc = whitened_inputs(data, data_dir, preset["num_samples"], preset["input_dim"])
    Sigma = X.T @ X / X.shape[0]
    tr = preset["training"]
    Xt, yt, C, desc_t = whitened_inputs(data, data_dir, tr["num_samples"], tr["input_dim"])
    top = RunDir(out)
    top.write_config(dict(experiment="conditioning", preset_name=preset_name, preset=preset,
                          data=data, data_describe=desc, training_data_describe=desc_t),
                     resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    base = dict(input_dim=X.shape[1], num_classes=preset["num_classes"])
    jobs = []
    for seed in preset["seeds"]:
        cfg = dict(base, seed=seed, depths=preset["depths"], widths=preset["widths"],
                   width_factors=preset["width_factors"])
        run = RunDir(out / "runs" / "depth_width" / f"seed{seed}")
        jobs.append(Job(f"depth_width/seed{seed}", run.path,
                        lambda run=run, cfg=cfg: _depth_width(run, cfg, Sigma, resume)))
        cfg_r = dict(base, seed=seed, residual=preset["residual"])
        run_r = RunDir(out / "runs" / "residual" / f"seed{seed}")
        jobs.append(Job(f"residual/seed{seed}", run_r.path,
                        lambda run=run_r, cfg=cfg_r: _residual(run, cfg, Sigma, resume)))
        for w in tr["widths"]:
            spec = training_spec(tr, w, seed, C, data, device)
            extra = dict(every=tr["every"], lr_half_squared_error=tr["lr"],
                         data_describe=desc_t)
            run_t = RunDir(out / "runs" / "training" / f"width{w}" / f"seed{seed}")
            jobs.append(Job(f"training/width{w}/seed{seed}", run_t.path,
                            lambda run=run_t, spec=spec, extra=extra:
                            _training(run, spec, extra, Xt, yt, C, resume, progress,
                                      callbacks)))
    statuses = run_jobs(out, jobs, progress=progress, desc="conditioning runs")
    build_conditioning_report(out, top.read_config())
    return statuses
