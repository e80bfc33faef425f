"""``gnrev reproduce conditioning``: Gauss-Newton conditioning (Zhao, Singh & Lucchi, NeurIPS 2024).

Three parts, on PCA-whitened MNIST (or MNIST-1D) inputs ``X`` with ``Σ = XᵀX/n = I``:

1. **Depth and width** (paper Fig. 2): deep linear nets ``F(x) = W_L⋯W_1 x`` with Kaiming-normal
   weights (``N(0, 2/fan_in)``), hidden width ``m``; ``κ(G) = λ_max/λ_min^{≠0}`` from the spectrum
   lemma (nonzero ``eig(G)`` = ``eig((Σ^{1/2}⊗I) M (Σ^{1/2}⊗I))``,
   :func:`~gnrev_plugin.metrics.deep_linear_gn_spectrum`) against the convex-combination and the
   loose upper bounds (:func:`~gnrev_plugin.metrics.deep_linear_condition_bounds`); also widths
   scaled with depth, ``m = c·L``.
2. **Residual connections** (Fig. 4): square hidden layers ``W_l → W_l + βI``
   (:func:`~gnrev_plugin.metrics.residual_weights`), κ and bounds against β.
3. **Training**: a two-layer ReLU net ``F(x) = W relu(Vx + b) + c`` trained by full-batch gradient
   descent on ``½‖F − onehot(y)‖²`` (mean over samples), κ(G) on the column space of the Gram
   (:func:`~gnrev_plugin.metrics.gn_condition_number`, Gram side ``nC × nC``) every few epochs,
   for several widths.

Resume works per run: finished runs (``result.json``) are skipped; each run is seconds long.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gnrev_plugin import metrics

from .presets import get_preset
from .rundir import RunDir
from .sweep import Job, run_jobs
from .whitening import whitened_inputs

__all__ = ["run_conditioning", "build_conditioning_report", "kaiming_linear_weights"]


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


class _TwoLayerReLU(nn.Sequential):
    def __init__(self, d: int, m: int, k: int) -> None:
        super().__init__(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, k))


def _training(run: RunDir, cfg: dict, X: torch.Tensor, Y: torch.Tensor, resume: bool) -> None:
    run.write_config(cfg, resume)
    if resume and run.done:
        return
    run.reset()
    torch.manual_seed(cfg["seed"])
    model = _TwoLayerReLU(X.shape[1], cfg["width"], Y.shape[1]).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])

    def loss_fn(out, target):  # ½‖F − Y‖² averaged over samples
        return 0.5 * ((out - target) ** 2).sum() / out.shape[0]

    kappa_loss = nn.MSELoss(reduction="sum")  # κ is scale-free; same G up to a constant
    for epoch in range(cfg["epochs"] + 1):
        if epoch % cfg["every"] == 0 or epoch == cfg["epochs"]:
            rep = metrics.gn_condition_number(model, kappa_loss, (X, Y), side="gram")
            with torch.no_grad():
                loss = float(loss_fn(model(X), Y))
            run.log(dict(epoch=epoch, loss=loss, kappa=rep.kappa, rank=rep.rank,
                         lambda_max=rep.lambda_max, lambda_min_nonzero=rep.lambda_min_nonzero))
        if epoch == cfg["epochs"]:
            break
        opt.zero_grad()
        loss_fn(model(X), Y).backward()
        opt.step()
    run.write_result(dict(final=run.rows()[-1]))


def run_conditioning(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                     data_dir: str | None = None, resume: bool = False, progress: bool = True,
                     preset: dict | None = None) -> list[dict]:
    out = Path(out)
    preset = preset if preset is not None else get_preset("conditioning", preset_name)
    X, _, _, desc = whitened_inputs(data, data_dir, preset["num_samples"], preset["input_dim"])
    Sigma = X.T @ X / X.shape[0]
    tr = preset["training"]
    Xt, yt, C, desc_t = whitened_inputs(data, data_dir, tr["num_samples"], tr["input_dim"])
    Yt = torch.nn.functional.one_hot(yt, C).double()
    RunDir(out).write_config(dict(experiment="conditioning", preset_name=preset_name,
                                  preset=preset, data=data, data_describe=desc,
                                  training_data_describe=desc_t), resume=resume)
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
            cfg_t = dict(seed=seed, width=w, lr=tr["lr"], epochs=tr["epochs"], every=tr["every"],
                         num_samples=tr["num_samples"], input_dim=tr["input_dim"])
            run_t = RunDir(out / "runs" / "training" / f"width{w}" / f"seed{seed}")
            jobs.append(Job(f"training/width{w}/seed{seed}", run_t.path,
                            lambda run=run_t, cfg=cfg_t: _training(run, cfg, Xt, Yt, resume)))
    statuses = run_jobs(out, jobs, progress=progress, desc="conditioning runs")
    from .report import build_report

    build_report(out)
    return statuses


# ------------------------------------------------------------------------------------ report
def build_conditioning_report(out: Path, cfg: dict) -> Path:
    from tabulate import tabulate

    from .plotting import new_figure, plot_mean_std, save
    from .report import collect_runs, failures_section, fmt, mean_std, write_report

    runs = collect_runs(out)
    by_part: dict[str, list[dict]] = {}
    for r in runs:
        by_part.setdefault(r["name"].split("/")[0], []).append(r)
    figdir, figs, sections = Path(out) / "figures", [], []

    dw = [r["rows"] for r in by_part.get("depth_width", []) if r["rows"]]
    if dw:
        fig, ax = new_figure(1, 2, width=5)
        widths = sorted({row["width"] for rows in dw for row in rows
                         if row["kind"] == "fixed_width"})
        for i, m in enumerate(widths):
            sel = [[dict(row, epoch=row["depth"]) for row in rows
                    if row["kind"] == "fixed_width" and row["width"] == m] for rows in dw]
            color = f"C{i}"
            plot_mean_std(ax[0, 0], sel, "kappa", f"κ(G), m={m}", color, logy=True, marker="o")
            plot_mean_std(ax[0, 0], sel, "bound_convex", f"bound, m={m}", color, logy=True)
            ax[0, 0].lines[-1].set_linestyle("--")
        ax[0, 0].set(xlabel="depth L", ylabel="κ(G)", title="deep linear, whitened: κ vs depth")
        ax[0, 0].legend(fontsize=7)
        factors = sorted({row["factor"] for rows in dw for row in rows
                          if row["kind"] == "proportional"})
        for i, c in enumerate(factors):
            sel = [[dict(row, epoch=row["depth"]) for row in rows
                    if row["kind"] == "proportional" and row["factor"] == c] for rows in dw]
            plot_mean_std(ax[0, 1], sel, "kappa", f"κ(G), m={c}·L", f"C{i}", logy=True,
                          marker="o")
        for m in widths[:1]:
            sel = [[dict(row, epoch=row["depth"]) for row in rows
                    if row["kind"] == "fixed_width" and row["width"] == m] for rows in dw]
            plot_mean_std(ax[0, 1], sel, "kappa", f"κ(G), m={m} fixed", "gray", logy=True)
        ax[0, 1].set(xlabel="depth L", ylabel="κ(G)", title="width scaled with depth")
        ax[0, 1].legend(fontsize=7)
        figs.append(save(fig, figdir / "fig_kappa_depth_width.png"))
        table = []
        depths = sorted({row["depth"] for rows in dw for row in rows})
        for m in widths:
            line = [f"m = {m}"]
            for L in depths:
                k = mean_std([row["kappa"] for rows in dw for row in rows
                              if row["kind"] == "fixed_width" and row["width"] == m
                              and row["depth"] == L])
                b = mean_std([row["bound_convex"] for rows in dw for row in rows
                               if row["kind"] == "fixed_width" and row["width"] == m
                               and row["depth"] == L])
                bl = mean_std([row["bound_loose"] for rows in dw for row in rows
                               if row["kind"] == "fixed_width" and row["width"] == m
                               and row["depth"] == L])
                line.append(f"{fmt(k[0], digits=4)} ({fmt(b[0], digits=4)}; "
                            f"{fmt(bl[0], digits=3)})")
            table.append(line)
        viol = sum(1 for rows in dw for row in rows
                   if row["kappa"] > row["bound_convex"] * (1 + 1e-9))
        sections.append("## κ(G) vs depth and width (deep linear, whitened inputs)\n\n"
                        "Mean over seeds of κ(G), with the convex-combination bound and the "
                        "loose (max) bound in brackets.\n\n"
                        + tabulate(table, headers=["width \\ depth"] + [f"L={L}" for L in depths],
                                   tablefmt="github")
                        + f"\n\nκ(G) exceeded the convex-combination bound in {viol} of "
                          f"{sum(len(r) for r in dw)} configurations.\n")

    res = [r["rows"] for r in by_part.get("residual", []) if r["rows"]]
    if res:
        fig, ax = new_figure(1, 1, width=5)
        sel = [[dict(row, epoch=row["beta"]) for row in rows] for rows in res]
        plot_mean_std(ax[0, 0], sel, "kappa", "κ(G)", "C0", logy=True, marker="o")
        plot_mean_std(ax[0, 0], sel, "bound_convex", "convex bound", "C1", logy=True)
        plot_mean_std(ax[0, 0], sel, "bound_loose", "loose bound", "C2", logy=True)
        ax[0, 0].set(xlabel="β (residual W + βI)", ylabel="κ(G)",
                     title=f"residual deep linear, L={res[0][0]['depth']}, "
                           f"m={res[0][0]['width']}")
        ax[0, 0].legend(fontsize=8)
        figs.append(save(fig, figdir / "fig_kappa_residual.png"))
        betas = sorted({row["beta"] for rows in res for row in rows})
        table = [[b, fmt(*mean_std([row["kappa"] for rows in res for row in rows
                                    if row["beta"] == b])),
                  fmt(*mean_std([row["bound_convex"] for rows in res for row in rows
                                 if row["beta"] == b])),
                  fmt(*mean_std([row["bound_loose"] for rows in res for row in rows
                                 if row["beta"] == b]))] for b in betas]
        sections.append("## Residual connections\n\n"
                        + tabulate(table, headers=["β", "κ(G)", "convex bound", "loose bound"],
                                   tablefmt="github") + "\n")

    trn = by_part.get("training", [])
    if trn:
        fig, ax = new_figure(1, 2)
        widths = sorted({r["config"]["width"] for r in trn if r["config"]})
        table = []
        for i, w in enumerate(widths):
            sel = [r["rows"] for r in trn if r["config"] and r["config"]["width"] == w]
            plot_mean_std(ax[0, 0], sel, "kappa", f"width {w}", f"C{i}", logy=True)
            plot_mean_std(ax[0, 1], sel, "loss", f"width {w}", f"C{i}", logy=True)
            first = mean_std([rows[0]["kappa"] for rows in sel if rows])
            last = mean_std([rows[-1]["kappa"] for rows in sel if rows])
            loss = mean_std([rows[-1]["loss"] for rows in sel if rows])
            table.append([w, fmt(*first), fmt(*last), fmt(*loss)])
        ax[0, 0].set(xlabel="epoch", ylabel="κ(G)", title="two-layer ReLU: κ(G) during training")
        ax[0, 1].set(xlabel="epoch", ylabel="½‖F − Y‖²/n", title="training loss")
        for a in ax[0]:
            a.legend(fontsize=8)
        figs.append(save(fig, figdir / "fig_kappa_training.png"))
        sections.append("## κ(G) during training (two-layer ReLU, full-batch GD)\n\n"
                        + tabulate(table, headers=["width", "κ at init", "κ at the end",
                                                   "final loss"], tablefmt="github") + "\n")

    p = cfg.get("preset", {})
    text = (f"# Gauss-Newton conditioning (reproduction of Zhao, Singh & Lucchi)\n\n"
            f"Preset `{cfg.get('preset_name')}`. Data: {cfg.get('data_describe')}. "
            f"Seeds {p.get('seeds')}. Kaiming-normal weights N(0, 2/fan_in). κ(G) = λ_max / "
            "λ_min^{≠0} (rank cut: eigenvalues > m·eps·λ_max). These are our measurements, "
            "not the paper's numbers.\n\n" + "\n".join(sections) + "\n## Figures\n\n"
            + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs) + "\n"
            + failures_section(out))
    return write_report(out, text)
