"""Figures and ``report.md`` of ``gnrev reproduce exact-gn``, from the run logs only.

Runs are grouped by their ``setting`` and by the short registry name of their optimizer
(``short_name(spec.optimizer)``: ``exact_gn``, ``adam``, ``sgd`` or a third-party name), both read
from each run's ``config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from gnrev_plugin.build import short_name

from ..plotting import COLORS, LABELS, new_figure, plot_mean_std, save
from ..tables import collect_runs, failures_section, fmt, mean_std, spec_of, write_report

__all__ = ["build_exact_gn_report"]

SETTING_TITLES = {"full_batch": "full batch", "mini_batch": "mini-batch"}


def _group(runs: list[dict]) -> dict[tuple[str, str], list[list[dict]]]:
    groups: dict[tuple[str, str], list[list[dict]]] = {}
    for r in runs:
        setting = (r["config"] or {}).get("setting")
        optimizer = short_name(spec_of(r).get("optimizer", ""))
        if r["rows"]:
            groups.setdefault((setting, optimizer), []).append(r["rows"])
    return groups


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


def _panel(ax, groups, setting, key, title, ylabel, logy=False):
    drew = False
    for opt in _optimizers(groups, setting):
        drew |= plot_mean_std(ax, groups[(setting, opt)], key, LABELS.get(opt, opt),
                              COLORS.get(opt), logy=logy)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return drew


def make_figures(out: Path, groups) -> list[Path]:
    figdir = Path(out) / "figures"
    paths = []
    for setting, name in (("full_batch", "fig1_full_batch.png"),
                          ("mini_batch", "fig2_mini_batch.png")):
        fig, ax = new_figure(1, 4)
        t = SETTING_TITLES[setting]
        _panel(ax[0, 0], groups, setting, "train_loss", f"{t}: train loss", "cross-entropy",
               logy=True)
        _panel(ax[0, 1], groups, setting, "test_loss", f"{t}: test loss", "cross-entropy",
               logy=True)
        _panel(ax[0, 2], groups, setting, "train_acc", f"{t}: train accuracy", "accuracy")
        _panel(ax[0, 3], groups, setting, "test_acc", f"{t}: test accuracy", "accuracy")
        paths.append(save(fig, figdir / name))
    fig, ax = new_figure(1, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        _panel(ax[0, j], groups, setting, "batch_loss_change_pct",
               f"{SETTING_TITLES[setting]}: loss change on the stepped batch",
               "% change of ℓ_B per step (epoch mean)")
        ax[0, j].axhline(0, color="k", lw=0.5)
    paths.append(save(fig, figdir / "fig3_batch_loss_change.png"))
    fig, ax = new_figure(2, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        _panel(ax[0, j], groups, setting, "ntk_sim",
               f"{SETTING_TITLES[setting]}: NTK similarity to init", "A(Θ₀, Θ_t)")
        _panel(ax[1, j], groups, setting, "ntk_velocity",
               f"{SETTING_TITLES[setting]}: NTK velocity", "1 − A(Θ_{t−1}, Θ_t)", logy=True)
    paths.append(save(fig, figdir / "fig4_ntk.png"))
    keys = _cka_keys(groups)
    if keys:
        fig, ax = new_figure(2, len(keys), width=3.4)
        for i, setting in enumerate(("full_batch", "mini_batch")):
            for j, k in enumerate(keys):
                _panel(ax[i, j], groups, setting, k,
                       f"{SETTING_TITLES[setting]}: CKA to init, {k[4:]}", "linear CKA")
        paths.append(save(fig, figdir / "fig5_cka.png"))
    fig, ax = new_figure(2, 2)
    for j, setting in enumerate(("full_batch", "mini_batch")):
        _panel(ax[0, j], groups, setting, "wcos/__all__",
               f"{SETTING_TITLES[setting]}: weight cosine to init", "cos(θ₀, θ_t)")
        _panel(ax[1, j], groups, setting, "wnorm/__all__",
               f"{SETTING_TITLES[setting]}: weight norm ratio", "‖θ_t‖ / ‖θ₀‖", logy=True)
    paths.append(save(fig, figdir / "fig6_weights.png"))
    return paths


def _final(runs: list[list[dict]], key: str, epoch: int | None = None):
    vals = []
    for rows in runs:
        sel = [r for r in rows if epoch is None or r["epoch"] == epoch]
        if sel:
            vals.append(sel[-1].get(key))
    return mean_std(vals)


def _table(groups, setting) -> tuple[str, dict]:
    keys = _cka_keys(groups)
    first_cka, last_cka = (keys[0], keys[-1]) if keys else (None, None)
    rows, summary = [], {}
    for opt in _optimizers(groups, setting):
        runs = groups[(setting, opt)]
        last_epoch = min(rows_[-1]["epoch"] for rows_ in runs)
        s = {k: _final(runs, k, last_epoch) for k in
             ("train_loss", "train_acc", "test_loss", "test_acc", "batch_loss_change_pct",
              "ntk_sim", "wcos/__all__", "wnorm/__all__", "exact_frac")}
        s["batch_loss_change_pct_ep1"] = _final(runs, "batch_loss_change_pct", 1)
        s["best_test_acc"] = mean_std([max((r.get("test_acc") or 0) for r in rows_)
                                       for rows_ in runs])
        for name, key in (("cka_first", first_cka), ("cka_last", last_cka)):
            s[name] = _final(runs, key, last_epoch) if key else (math.nan, math.nan, 0)
        summary[opt] = s
        rows.append([LABELS.get(opt, opt), f"{len(runs)}", f"{last_epoch}",
                     fmt(*s["train_loss"]), fmt(*s["train_acc"], pct=True),
                     fmt(*s["test_loss"]), fmt(*s["test_acc"], pct=True),
                     fmt(*s["best_test_acc"], pct=True),
                     fmt(*s["batch_loss_change_pct_ep1"], digits=3) + " / "
                     + fmt(*s["batch_loss_change_pct"], digits=3),
                     fmt(*s["ntk_sim"], digits=5), fmt(*s["cka_first"], digits=4) + " / "
                     + fmt(*s["cka_last"], digits=4),
                     fmt(*s["wcos/__all__"], digits=4),
                     fmt(*s["exact_frac"], pct=True, digits=3)])
    headers = ["optimizer", "seeds", "epochs", "train loss", "train acc", "test loss",
               "test acc", "best test acc", "% loss change/batch (ep 1 / last)",
               "NTK sim to init", "CKA to init (first / last layer)", "weight cos to init",
               "exact GN steps"]
    return tabulate(rows, headers=headers, tablefmt="github"), summary


def _compare(summary: dict, key: str, lower_is_better: bool = True) -> str:
    parts = []
    for opt, s in summary.items():
        m, sd, n = s[key]
        parts.append(f"{LABELS.get(opt, opt)} {fmt(m, sd, n)}")
    return ", ".join(parts)


def _findings(summaries: dict) -> str:
    """Plain statements of what the logged numbers say about each of the paper's claims."""
    lines = []
    fb, mb = summaries.get("full_batch", {}), summaries.get("mini_batch", {})

    def val(s, opt, key):
        return s.get(opt, {}).get(key, (math.nan,))[0]

    if fb:
        lines.append(f"* **Full batch, final train loss:** {_compare(fb, 'train_loss')}.")
        gn, others = val(fb, "exact_gn", "train_loss"), [val(fb, o, "train_loss")
                                                        for o in fb if o != "exact_gn"]
        if math.isfinite(gn) and others:
            verdict = ("lower than every other optimizer's"
                       if all(gn < o for o in others if math.isfinite(o))
                       else "not lower than every other optimizer's")
            lines.append(f"  GN's final full-batch train loss is {verdict}.")
    if mb:
        lines.append("* **Mini-batch, final test accuracy:** "
                     + ", ".join(f"{LABELS.get(o, o)} {fmt(*s['test_acc'], pct=True)}"
                                 for o, s in mb.items()) + ".")
    for name, s in (("full batch", fb), ("mini-batch", mb)):
        if s:
            lines.append(f"* **{name}, % loss change on the stepped batch (epoch 1 mean):** "
                         + ", ".join(f"{LABELS.get(o, o)} "
                                     f"{fmt(*v['batch_loss_change_pct_ep1'], digits=3)}%"
                                     for o, v in s.items()) + ".")
    for name, s in (("full batch", fb), ("mini-batch", mb)):
        if s:
            lines.append(f"* **{name}, NTK similarity to init (last epoch):** "
                         + ", ".join(f"{LABELS.get(o, o)} {fmt(*v['ntk_sim'], digits=5)}"
                                     for o, v in s.items()) + ".")
            lines.append(f"* **{name}, CKA to init of the first / last coupling layer:** "
                         + ", ".join(f"{LABELS.get(o, o)} {fmt(*v['cka_first'], digits=4)} / "
                                     f"{fmt(*v['cka_last'], digits=4)}"
                                     for o, v in s.items()) + ".")
    return "\n".join(lines)


def _lr_summary(runs: list[dict]) -> str:
    """``full_batch: exact GN 1, Adam 0.0001, ...; mini_batch: ...`` from the recorded specs."""
    lrs: dict[str, dict[str, set]] = {}
    for r in runs:
        spec = spec_of(r)
        setting = (r["config"] or {}).get("setting")
        if spec and setting:
            opt = short_name(spec["optimizer"])
            lrs.setdefault(setting, {}).setdefault(opt, set()).add(
                spec["optimizer_kwargs"].get("lr"))
    parts = []
    for setting in (s for s in SETTING_TITLES if s in lrs):
        opts = lrs[setting]
        order = _optimizers(dict.fromkeys((setting, o) for o in opts), setting)
        parts.append(f"{SETTING_TITLES[setting]} " + ", ".join(
            f"{LABELS.get(o, o)} " + "/".join(f"{v:g}" if isinstance(v, (int, float)) else str(v)
                                             for v in sorted(opts[o], key=str))
            for o in order))
    return "; ".join(parts) or "–"


def _rank_policies(runs: list[dict]) -> str:
    """The ``rank_policy`` values recorded in the specs of optimizers that take one."""
    policies = sorted({str(spec_of(r)["optimizer_kwargs"]["rank_policy"]) for r in runs
                       if "rank_policy" in spec_of(r).get("optimizer_kwargs", {})})
    return ", ".join(f"`{p}`" for p in policies) or "–"


def build_exact_gn_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs; ``cfg`` is the
    sweep's ``config.json``."""
    runs = collect_runs(out)
    groups = _group(runs)
    figures = make_figures(out, groups)
    preset = cfg.get("preset", {})
    tables, summaries = [], {}
    for setting in ("full_batch", "mini_batch"):
        if any(s == setting for s, _ in groups):
            t, summ = _table(groups, setting)
            summaries[setting] = summ
            tables.append(f"### {SETTING_TITLES[setting].capitalize()}\n\n"
                          f"{cfg.get('data_describe', {}).get(setting, '')}\n\n{t}\n")
    fb, mb = preset.get("full_batch", {}), preset.get("mini_batch", {})
    text = f"""# Exact Gauss-Newton in a RevMLP vs Adam and SGD (reproduction)

Preset `{cfg.get('preset_name')}` on `{cfg.get('data')}`. RevMLP with L = {preset.get('blocks')}
blocks, width M = {preset.get('hidden')}, linear first block = {preset.get('linear_first_block')},
init std 1e-3, fixed orthonormal readout; cross-entropy loss for every optimizer. Seeds
{preset.get('seeds')}. Full batch: the first {fb.get('subset')} training images, {fb.get('epochs')}
epochs (one step each). Mini-batch: batch {mb.get('batch_size')}, {mb.get('epochs')} epochs.

**Step-size convention.** Exact GN's `lr` is the function-space step α (J Δθ = −α ε,
ε = softmax(F) − onehot(y), the reference's `use_identity` target); the reference code's learning
rates are translated by α = L · lr_ref, Adam's and SGD's are used as released (no momentum, no
weight decay). Learning rates of these runs (from their specs): {_lr_summary(runs)}.
GN rank policy: {_rank_policies(runs)}. The per-batch loss change is
100 (ℓ_B(θ_{{t+1}}) − ℓ_B(θ_t)) / ℓ_B(θ_t) on the batch just stepped on. NTK: structured
empirical NTK of the logits on the first {preset.get('probe_size')} training images; similarity
= uncentred Frobenius alignment with the NTK at init; velocity = 1 − alignment between
consecutive epochs. CKA: linear CKA of the representations after each coupling half-layer
(`blocks.l.f`, `blocks.l.g`) against init on the same probe batch.

## What the logs say

{_findings(summaries)}

## Final numbers (mean ± std over seeds, last epoch)

{chr(10).join(tables)}
## Figures

""" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures) + "\n"
    text += failures_section(out)
    return write_report(out, text)
