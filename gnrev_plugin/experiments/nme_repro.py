"""``gnrev reproduce nme``: the Hessian split ``H = G + NME`` over training (Dauphin, Agarwala &
Mobahi, NeurIPS 2024).

MLPs ``d → h₁ → … → C`` with activation ∈ {linear, ReLU, GELU, tanh, β-GELU} are trained with
mini-batch SGD on the cross-entropy, on PCA-reduced MNIST (or MNIST-1D) inputs. Every few epochs,
on a fixed probe set, :func:`gnrev_plugin.metrics.decompose` builds the curvlinops operators of
``H``, ``G`` and ``NME = H − G`` and its summary gives ``tr(H)``, ``tr(G)``, ``tr(NME)`` (exact
for ``P ≤ exact_max_dim`` parameters, else Hutch++), the NME's extreme eigenvalues and
``‖NME‖_F/‖H‖_F``.

Expected from the theory (checked in the report): linear nets have ``NME ≡ 0`` up to the
cross-layer terms, ReLU nets have ``tr(NME) = 0`` (``φ'' = 0`` a.e.), smooth activations have a
nonzero NME trace, and β-GELU approaches ReLU as β grows.
Resume works per run (finished runs are skipped; each run is seconds long).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gnrev_plugin import data as gdata
from gnrev_plugin import metrics

from .presets import get_preset
from .rundir import RunDir
from .sweep import Job, run_jobs
from .whitening import whitened_inputs

__all__ = ["make_activation", "make_mlp", "run_nme", "build_nme_report"]


def make_activation(name: str) -> nn.Module:
    """``linear``, ``relu``, ``gelu``, ``tanh`` or ``beta_gelu:<β>``."""
    if name == "linear":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    if name.startswith("beta_gelu:"):
        from gnrev_plugin.nn.dauphin_activations import BetaGELU

        return BetaGELU(float(name.split(":", 1)[1]))
    raise ValueError(f"unknown activation {name!r}; use linear, relu, gelu, tanh or "
                     "beta_gelu:<beta>")


def make_mlp(d: int, hidden: list[int], C: int, activation: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, prev = [], d
    for h in hidden:
        layers += [nn.Linear(prev, h), make_activation(activation)]
        prev = h
    layers.append(nn.Linear(prev, C))
    return nn.Sequential(*layers).double()


def _summary_row(model, X, y, exact_max_dim: int, seed: int) -> dict:
    dec = metrics.decompose(model, nn.CrossEntropyLoss(), (X, y))
    s = dec.summary(exact_max_dim=exact_max_dim, per_block=False, seed=seed)
    tr = {k: v["value"] for k, v in s["trace"].items()}
    top = s["top_eigenvalues"]
    row = dict(tr_hessian=tr["hessian"], tr_ggn=tr["ggn"], tr_nme=tr["nme"],
               nme_eig_max=top["nme"][0] if top.get("nme") else None,
               nme_eig_min=s.get("lambda_min_nme"),
               hessian_eig_max=top["hessian"][0] if top.get("hessian") else None,
               hessian_eig_min=s.get("lambda_min_hessian"),
               nme_fro_over_h_fro=s["ratios"]["nme_fro_over_hessian_fro"],
               mode=s["mode"], num_params=s["num_params"])
    return row


def _nme_run(run: RunDir, cfg: dict, X, y, Xp, yp, resume: bool) -> None:
    run.write_config(cfg, resume)
    if resume and run.done:
        return
    run.reset()
    model = make_mlp(X.shape[1], cfg["hidden"], int(y.max()) + 1, cfg["activation"], cfg["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    crit = nn.CrossEntropyLoss()
    for epoch in range(cfg["epochs"] + 1):
        if epoch % cfg["every"] == 0 or epoch == cfg["epochs"]:
            with torch.no_grad():
                out = model(X)
                loss, acc = float(crit(out, y)), float((out.argmax(1) == y).double().mean())
            run.log(dict(epoch=epoch, train_loss=loss, train_acc=acc,
                         **_summary_row(model, Xp, yp, cfg["exact_max_dim"], cfg["seed"])))
        if epoch == cfg["epochs"]:
            break
        for xb, yb in gdata.minibatches(X, y, cfg["batch_size"], cfg["seed"], epoch):
            opt.zero_grad()
            crit(model(xb), yb).backward()
            opt.step()
    run.write_result(dict(final=run.rows()[-1]))


def run_nme(out: str | Path, preset_name: str = "quick", data: str = "mnist",
            data_dir: str | None = None, resume: bool = False, progress: bool = True,
            preset: dict | None = None) -> list[dict]:
    out = Path(out)
    preset = preset if preset is not None else get_preset("nme", preset_name)
    X, y, C, desc = whitened_inputs(data, data_dir, preset["num_samples"], preset["input_dim"])
    Xp, yp = X[:preset["probe_samples"]], y[:preset["probe_samples"]]
    RunDir(out).write_config(dict(experiment="nme", preset_name=preset_name, preset=preset,
                                  data=data, data_describe=desc), resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    jobs = []
    for act in preset["activations"]:
        for seed in preset["seeds"]:
            cfg = dict(activation=act, seed=seed, hidden=preset["hidden"], lr=preset["lr"],
                       epochs=preset["epochs"], batch_size=preset["batch_size"],
                       every=preset["every"], exact_max_dim=preset["exact_max_dim"])
            name = f"{act.replace(':', '')}/seed{seed}"
            run = RunDir(out / "runs" / name)
            jobs.append(Job(name, run.path, lambda run=run, cfg=cfg:
                            _nme_run(run, cfg, X, y, Xp, yp, resume)))
    statuses = run_jobs(out, jobs, progress=progress, desc="nme runs")
    from .report import build_report

    build_report(out)
    return statuses


def build_nme_report(out: Path, cfg: dict) -> Path:
    from tabulate import tabulate

    from .plotting import new_figure, plot_mean_std, save
    from .report import collect_runs, failures_section, fmt, mean_std, write_report

    runs = [r for r in collect_runs(out) if r["config"]]
    acts = []
    for r in runs:
        if r["config"]["activation"] not in acts:
            acts.append(r["config"]["activation"])
    groups = {a: [r["rows"] for r in runs if r["config"]["activation"] == a and r["rows"]]
              for a in acts}
    figs = []
    fig, ax = new_figure(2, 3)
    panels = [("tr_hessian", "tr(H)"), ("tr_ggn", "tr(G)"), ("tr_nme", "tr(NME)"),
              ("nme_eig_max", "λ_max(NME)"), ("nme_eig_min", "λ_min(NME)"),
              ("nme_fro_over_h_fro", "‖NME‖_F / ‖H‖_F")]
    for (key, title), a in zip(panels, ax.flat, strict=True):
        for i, act in enumerate(acts):
            plot_mean_std(a, groups[act], key, act, f"C{i}", marker="o")
        a.set(xlabel="epoch", title=title)
        a.axhline(0, color="k", lw=0.5)
        a.legend(fontsize=7)
    figs.append(save(fig, Path(out) / "figures" / "fig_nme_traces.png"))
    table = []
    for act in acts:
        rows = groups[act]
        if not rows:
            continue

        def last(key, rows=rows):
            return mean_std([r[-1].get(key) for r in rows])

        def first(key, rows=rows):
            return mean_std([r[0].get(key) for r in rows])
        table.append([act, fmt(*last("train_loss")), fmt(*first("tr_nme")),
                      fmt(*last("tr_hessian")), fmt(*last("tr_ggn")), fmt(*last("tr_nme")),
                      f"[{fmt(last('nme_eig_min')[0], digits=3)}, "
                      f"{fmt(last('nme_eig_max')[0], digits=3)}]",
                      fmt(*last("nme_fro_over_h_fro"), digits=3),
                      rows[0][-1].get("mode")])
    relu_tr = [abs(r[-1]["tr_nme"]) for r in groups.get("relu", []) if r]
    notes = []
    if relu_tr:
        notes.append(f"* ReLU: |tr(NME)| at the end = {max(relu_tr):.3g} (theory: 0, since "
                     "φ'' = 0 almost everywhere).")
    for act in acts:
        if act.startswith("beta_gelu") or act in ("gelu", "tanh"):
            v = mean_std([r[-1]["tr_nme"] for r in groups[act] if r])[0]
            if math.isfinite(v):
                notes.append(f"* {act}: tr(NME) at the end = {v:.4g}.")
    p = cfg.get("preset", {})
    text = (f"# Hessian = GN + NME over training (reproduction of Dauphin, Agarwala & Mobahi)\n\n"
            f"Preset `{cfg.get('preset_name')}`. Data: {cfg.get('data_describe')}; "
            f"MLP {p.get('input_dim')} → {p.get('hidden')} → classes, SGD lr {p.get('lr')}, "
            f"batch {p.get('batch_size')}, {p.get('epochs')} epochs, seeds {p.get('seeds')}; "
            f"curvature on the first {p.get('probe_samples')} samples with the mean "
            "cross-entropy. These are our measurements, not the paper's numbers.\n\n"
            "## Final numbers (mean ± std over seeds)\n\n"
            + tabulate(table, headers=["activation", "train loss", "tr(NME) at init",
                                       "tr(H)", "tr(G)", "tr(NME)", "NME eig range",
                                       "‖NME‖_F/‖H‖_F", "mode"], tablefmt="github")
            + "\n\n## Notes\n\n" + "\n".join(notes) + "\n\n## Figures\n\n"
            + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs) + "\n"
            + failures_section(out))
    return write_report(out, text)
