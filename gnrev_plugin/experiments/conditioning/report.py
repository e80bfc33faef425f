"""Figures and ``report.md`` of ``gnrev reproduce conditioning``, from the run logs only.

The training runs log κ(G) under the registry name of the run metric that measured it
(:data:`KAPPA`); their width is read from the recorded spec (``model_kwargs["hidden"]``).
"""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from ..plotting import new_figure, plot_mean_std, save
from ..tables import collect_runs, failures_section, fmt, mean_std, spec_of, write_report

__all__ = ["build_conditioning_report", "KAPPA_METRIC", "KAPPA"]

#: The run metric that measures κ(G) during training, and the log key of its κ.
KAPPA_METRIC = "gnrev.gn_condition_number_on_batch"
KAPPA = f"{KAPPA_METRIC}.kappa"


def _width(run: dict) -> int:
    """The hidden width ``m`` of a training run's ``gnrev.mlp`` (``hidden=[m]``)."""
    return int(spec_of(run)["model_kwargs"]["hidden"][0])


def _depth_width_section(dw: list[list[dict]], figdir: Path) -> tuple[Path, str]:
    """Figure and section of κ(G) against depth and width."""
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
    path = save(fig, figdir / "fig_kappa_depth_width.png")
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
    section = ("## κ(G) vs depth and width (deep linear, whitened inputs)\n\n"
                    "Mean over seeds of κ(G), with the convex-combination bound and the "
                    "loose (max) bound in brackets.\n\n"
                    + tabulate(table, headers=["width \\ depth"] + [f"L={L}" for L in depths],
                               tablefmt="github")
                    + f"\n\nκ(G) exceeded the convex-combination bound in {viol} of "
                      f"{sum(len(r) for r in dw)} configurations.\n")
    return path, section


def _residual_section(res: list[list[dict]], figdir: Path) -> tuple[Path, str]:
    """Figure and section of κ(G) against the residual β."""
    fig, ax = new_figure(1, 1, width=5)
    sel = [[dict(row, epoch=row["beta"]) for row in rows] for rows in res]
    plot_mean_std(ax[0, 0], sel, "kappa", "κ(G)", "C0", logy=True, marker="o")
    plot_mean_std(ax[0, 0], sel, "bound_convex", "convex bound", "C1", logy=True)
    plot_mean_std(ax[0, 0], sel, "bound_loose", "loose bound", "C2", logy=True)
    ax[0, 0].set(xlabel="β (residual W + βI)", ylabel="κ(G)",
                 title=f"residual deep linear, L={res[0][0]['depth']}, "
                       f"m={res[0][0]['width']}")
    ax[0, 0].legend(fontsize=8)
    path = save(fig, figdir / "fig_kappa_residual.png")
    betas = sorted({row["beta"] for rows in res for row in rows})
    table = [[b, fmt(*mean_std([row["kappa"] for rows in res for row in rows
                                if row["beta"] == b])),
              fmt(*mean_std([row["bound_convex"] for rows in res for row in rows
                             if row["beta"] == b])),
              fmt(*mean_std([row["bound_loose"] for rows in res for row in rows
                             if row["beta"] == b]))] for b in betas]
    section = ("## Residual connections\n\n"
                    + tabulate(table, headers=["β", "κ(G)", "convex bound", "loose bound"],
                               tablefmt="github") + "\n")
    return path, section


def _training_section(trn: list[dict], figdir: Path) -> tuple[Path, str]:
    """Figure and section of κ(G) during training."""
    fig, ax = new_figure(1, 2)
    widths = sorted({_width(r) for r in trn})
    table = []
    for i, w in enumerate(widths):
        sel = [r["rows"] for r in trn if _width(r) == w]
        plot_mean_std(ax[0, 0], sel, KAPPA, f"width {w}", f"C{i}", logy=True)
        plot_mean_std(ax[0, 1], sel, "train_loss", f"width {w}", f"C{i}", logy=True)
        first = mean_std([rows[0][KAPPA] for rows in sel if rows])
        last = mean_std([rows[-1][KAPPA] for rows in sel if rows])
        loss = mean_std([rows[-1]["train_loss"] for rows in sel if rows])
        table.append([w, fmt(*first), fmt(*last), fmt(*loss)])
    ax[0, 0].set(xlabel="epoch", ylabel="κ(G)", title="two-layer ReLU: κ(G) during training")
    ax[0, 1].set(xlabel="epoch", ylabel="‖F − Y‖²/(nC)", title="training loss (MSE)")
    for a in ax[0]:
        a.legend(fontsize=8)
    path = save(fig, figdir / "fig_kappa_training.png")
    section = ("## κ(G) during training (two-layer ReLU, full-batch GD)\n\n"
                    + tabulate(table, headers=["width", "κ at init", "κ at the end",
                                               "final MSE"], tablefmt="github") + "\n")
    return path, section


def build_conditioning_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs; ``cfg`` is the
    experiment's ``config.json``."""
    runs = collect_runs(out)
    by_part: dict[str, list[dict]] = {}
    for r in runs:
        by_part.setdefault(r["name"].split("/")[0], []).append(r)
    figdir, figs, sections = Path(out) / "figures", [], []

    parts = [(_depth_width_section, [r["rows"] for r in by_part.get("depth_width", [])
                                     if r["rows"]]),
             (_residual_section, [r["rows"] for r in by_part.get("residual", []) if r["rows"]]),
             (_training_section, [r for r in by_part.get("training", []) if spec_of(r)])]
    for make, part in parts:
        if part:
            path, section = make(part, figdir)
            figs.append(path)
            sections.append(section)

    p = cfg.get("preset", {})
    text = (f"# Gauss-Newton conditioning (reproduction of Zhao, Singh & Lucchi)\n\n"
            f"Preset `{cfg.get('preset_name')}`. Data: {cfg.get('data_describe')}. "
            f"Seeds {p.get('seeds')}. Kaiming-normal weights N(0, 2/fan_in). κ(G) = λ_max / "
            "λ_min^{≠0} (rank cut: eigenvalues > m·eps·λ_max). These are our measurements, "
            "not the paper's numbers.\n\n" + "\n".join(sections) + "\n## Figures\n\n"
            + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs) + "\n"
            + failures_section(out))
    return write_report(out, text)
