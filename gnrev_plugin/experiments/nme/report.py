"""Figures and ``report.md`` of ``gnrev reproduce nme``, from the run logs only (the activation of
each run is read from its recorded spec)."""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from ..plotting import new_figure, plot_mean_std, save
from ..tables import collect_runs, failures_section, fmt, mean_std, spec_of, write_report

__all__ = ["build_nme_report"]


def _activation(run: dict) -> str:
    return spec_of(run)["model_kwargs"]["activation"]


def build_nme_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs; ``cfg`` is the
    experiment's ``config.json``."""
    runs = [r for r in collect_runs(out) if spec_of(r)]
    acts = [a for a in cfg.get("preset", {}).get("activations", [])
            if any(_activation(r) == a for r in runs)]          # the preset's order
    for r in runs:
        if _activation(r) not in acts:
            acts.append(_activation(r))
    groups = {a: [r["rows"] for r in runs if _activation(r) == a and r["rows"]] for a in acts}
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
