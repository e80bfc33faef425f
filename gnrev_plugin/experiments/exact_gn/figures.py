"""The figures of ``gnrev reproduce exact-gn`` (Buffelli et al. Figs. 2-6 at the preset's
size), drawn from the runs' logs grouped by setting and optimizer."""

from __future__ import annotations

from pathlib import Path

from ..plotting import COLORS, LABELS, new_figure, plot_mean_std, save

__all__ = ["make_figures", "SETTING_TITLES"]

SETTING_TITLES = {"full_batch": "full batch", "mini_batch": "mini-batch"}


def _optimizers(groups, setting):
    order = ["exact_gn", "adam", "sgd"]
    present = {o for (s, o) in groups if s == setting}
    return [o for o in order if o in present] + sorted(present - set(order))


def _cka_keys(groups) -> list[str]:
    keys = set()
    for runs in groups.values():
        for rows in runs:
            for row in rows:
                keys |= {k for k in row if k.startswith("cka/")}

    def order(k):
        parts = k.split("/")[1].split(".")  # blocks.l.f
        return int(parts[1]), parts[2]
    return sorted(keys, key=order)


def _panel(ax, groups, setting, key, title, ylabel, logy=False, partial=None):
    drew = False
    for opt in _optimizers(groups, setting):
        drew |= plot_mean_std(ax, groups[(setting, opt)], key, LABELS.get(opt, opt),
                              COLORS.get(opt), logy=logy)
    for opt in _optimizers(partial or {}, setting):
        runs = partial[(setting, opt)]
        label = (f"{LABELS.get(opt, opt)}, unfinished ({len(runs)} run"
                 f"{'s' if len(runs) > 1 else ''}, to epoch "
                 f"{max(rows[-1]['epoch'] for rows in runs)})")
        before = len(ax.lines)
        if plot_mean_std(ax, runs, key, label, COLORS.get(opt), logy=logy):
            drew = True
            for line in ax.lines[before:]:
                line.set_linestyle("--")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return drew


def make_figures(out: Path, groups, partial=None) -> list[Path]:
    """The report's figures from the finished runs' logs (``groups``) and, dashed, the
    unfinished ones' (``partial``)."""
    def panel(*args, **kwargs):
        return _panel(*args, partial=partial, **kwargs)

    figdir = Path(out) / "figures"
    paths = []
    for setting, name in (("full_batch", "fig1_full_batch.png"),
                          ("mini_batch", "fig2_mini_batch.png")):
        fig, ax = new_figure(1, 4)
        t = SETTING_TITLES[setting]
        panel(ax[0, 0], groups, setting, "train_loss", f"{t}: train loss", "cross-entropy",
              logy=True)
        panel(ax[0, 1], groups, setting, "test_loss", f"{t}: test loss", "cross-entropy",
              logy=True)
        panel(ax[0, 2], groups, setting, "train_acc", f"{t}: train accuracy", "accuracy")
        panel(ax[0, 3], groups, setting, "test_acc", f"{t}: test accuracy", "accuracy")
        paths.append(save(fig, figdir / name))
    fig, ax = new_figure(1, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        panel(ax[0, j], groups, setting, "batch_loss_change_pct",
              f"{SETTING_TITLES[setting]}: loss change on the stepped batch",
              "% change of ℓ_B per step (epoch mean)")
        ax[0, j].axhline(0, color="k", lw=0.5)
    paths.append(save(fig, figdir / "fig3_batch_loss_change.png"))
    fig, ax = new_figure(2, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        panel(ax[0, j], groups, setting, "ntk_sim",
              f"{SETTING_TITLES[setting]}: NTK similarity to init", "A(Θ₀, Θ_t)")
        panel(ax[1, j], groups, setting, "ntk_velocity",
              f"{SETTING_TITLES[setting]}: NTK velocity", "1 − A(Θ_{t−1}, Θ_t)", logy=True)
    paths.append(save(fig, figdir / "fig4_ntk.png"))
    keys = _cka_keys({**(partial or {}), **groups})
    if keys:
        fig, ax = new_figure(2, len(keys), width=3.4)
        for i, setting in enumerate(("full_batch", "mini_batch")):
            for j, k in enumerate(keys):
                panel(ax[i, j], groups, setting, k,
                      f"{SETTING_TITLES[setting]}: CKA to init, {k[4:]}", "linear CKA")
        paths.append(save(fig, figdir / "fig5_cka.png"))
    fig, ax = new_figure(2, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        panel(ax[0, j], groups, setting, "wcos/__all__",
              f"{SETTING_TITLES[setting]}: weight cosine to init", "cos(θ₀, θ_t)")
        panel(ax[1, j], groups, setting, "wnorm/__all__",
              f"{SETTING_TITLES[setting]}: weight norm ratio", "‖θ_t‖ / ‖θ₀‖", logy=True)
    paths.append(save(fig, figdir / "fig6_weights.png"))
    return paths
