"""``laziness.csv``, figures and ``report.md`` of ``gnrev reproduce laziness``, from the run logs only.

Every run's ``config.json`` records its configuration (``optimizer``, ``step``, ``width``,
``init``, ``lr``, ``seed``, ``axes``; :mod:`.run`); its ``log.jsonl`` the per-epoch metrics. One
CSV row per run holds the last logged value of each metric (the diagnostics are always measured at
the last epoch), the mean NTK velocity over the measured epochs and the mean fraction of exact GN
steps. The report states, per claim, where it holds: a map over the sweep's axes.

Thresholds of "near init" (stated in the report): NTK similarity ≥ :data:`NTK_NEAR` (both
metrics), CKA of the last half-layer ≥ :data:`CKA_NEAR`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tabulate import tabulate

from ..plotting import new_figure, plot_mean_std, save
from ..tables import failures_section, fmt, mean_std, write_report
from .table import (
    CSV_COLUMNS,
    METHOD_COLORS,
    METHOD_ORDER,
    _base,
    _cka_keys,
    _groups,
    _label,
    _methods,
    _ms,
    laziness_rows,
    write_laziness_csv,
)

__all__ = ["build_laziness_report", "laziness_rows", "write_laziness_csv", "CSV_COLUMNS",
           "NTK_NEAR", "CKA_NEAR"]

#: "The NTK stays near init": similarity to init ≥ this (probe cosine and Frobenius alignment).
NTK_NEAR = 0.9
#: "The representations stay near init": linear CKA of the last half-layer to init ≥ this.
CKA_NEAR = 0.99
#: A change of a similarity smaller than this between neighbouring widths counts as flat.
FLAT = 1e-3

def _vs(ax, groups, xkey_index: int, key: str, methods, logx=True, ls="-", suffix=""):
    drew = False
    for m in methods:
        pts = sorted((k[xkey_index], _ms(v, key)) for k, v in groups.items() if k[0] == m)
        pts = [(x, s) for x, s in pts if math.isfinite(s[0])]
        if not pts:
            continue
        xs = np.array([p[0] for p in pts], dtype=float)
        mu = np.array([p[1][0] for p in pts])
        sd = np.array([p[1][1] if p[1][2] > 1 else 0.0 for p in pts])
        ax.errorbar(xs, mu, yerr=sd, label=_label(m) + suffix, color=METHOD_COLORS.get(m),
                    marker="o", ms=4, capsize=3, ls=ls)
        drew = True
    if logx:
        ax.set_xscale("log", base=2)
    if drew:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return drew


def make_figures(out: Path, table: list[dict]) -> list[Path]:
    """The figures of the report (``OUT/figures``)."""
    figdir, paths = Path(out) / "figures", []
    base = _base(table)
    gw = _groups(table, "width")
    methods = _methods(gw)
    fig, ax = new_figure(1, 3)
    for j, (key, title) in enumerate((("ntk_sim_probe", "NTK similarity (reference probe)"),
                                      ("ntk_alignment", "NTK alignment (full logit NTK)"),
                                      ("cka_last", "CKA to init, last half-layer"))):
        _vs(ax[0, j], gw, 1, key, methods)
        ax[0, j].set_title(f"{title}, last epoch", fontsize=9)
        ax[0, j].set_xlabel("width M")
    paths.append(save(fig, figdir / "similarity_vs_width.png"))

    widths = sorted({k[1] for k in gw})
    if widths:
        M = widths[-1]
        fig, ax = new_figure(2, 3)
        panels = (("ntk_sim_probe", "NTK similarity (probe)", False),
                  ("ntk_sim", "NTK alignment", False),
                  ("ntk_velocity", "NTK velocity per epoch", True),
                  (None, "CKA to init, last half-layer", False),
                  ("train_loss", "train loss", True), ("test_acc", "test accuracy", False))
        for i, (key, title, logy) in enumerate(panels):
            a = ax[i // 3, i % 3]
            drew = False
            for m in methods:
                runs = [r["rows"] for k, v in gw.items() if k[0] == m and k[1] == M for r in v]
                k_ = key or (_cka_keys(runs[0])[-1] if runs and _cka_keys(runs[0]) else "")
                rows = [[x for x in rr if x.get(k_) is not None] for rr in runs]
                drew |= plot_mean_std(a, rows, k_, _label(m), METHOD_COLORS.get(m), logy=logy,
                                      marker="o")
            a.set_title(f"M = {M}: {title}", fontsize=9)
            a.set_xlabel("epoch")
            if drew:
                a.legend(fontsize=7)
        paths.append(save(fig, figdir / "similarity_over_training.png"))

        fig, ax = new_figure(1, 2)
        _vs(ax[0, 0], gw, 1, "test_acc", methods)
        ax[0, 0].set_title("test accuracy, last epoch", fontsize=9)
        ax[0, 0].set_xlabel("width M")
        for m in methods:
            runs = [r["rows"] for k, v in gw.items() if k[0] == m and k[1] == M for r in v]
            plot_mean_std(ax[0, 1], runs, "test_acc", _label(m), METHOD_COLORS.get(m))
        ax[0, 1].set_title(f"M = {M}: test accuracy over training", fontsize=9)
        ax[0, 1].set_xlabel("epoch")
        ax[0, 1].legend(fontsize=7)
        paths.append(save(fig, figdir / "test_acc_exact_vs_truncated.png"))

    ga, gi = _groups(table, "alpha"), _groups(table, "init")
    if ga or gi:
        fig, ax = new_figure(1, 2)
        _vs(ax[0, 0], ga, 3, "ntk_sim_probe", _methods(ga), suffix=" (probe)")
        _vs(ax[0, 0], ga, 3, "ntk_alignment", _methods(ga), ls="--", suffix=" (alignment)")
        ax[0, 0].set_title(f"GN at M = {base['width']}: NTK similarity vs α", fontsize=9)
        ax[0, 0].set_xlabel("α (function-space step)")
        inits = sorted({k[2] for k in gi})
        ms = _methods(gi)
        for i, init in enumerate(inits):
            for j, m in enumerate(ms):
                runs = [r for k, v in gi.items() if k[0] == m and k[2] == init for r in v]
                for key, mk in (("ntk_sim_probe", "o"), ("ntk_alignment", "s"),
                                ("cka_last", "^")):
                    mu, sd, n = _ms(runs, key)
                    if math.isfinite(mu):
                        ax[0, 1].errorbar(j + 0.35 * i, mu, yerr=sd if n > 1 else 0,
                                          marker=mk, color=METHOD_COLORS.get(m),
                                          alpha=1.0 if i == 0 else 0.55, capsize=2)
        ax[0, 1].set_xticks(range(len(ms)), [_label(m) for m in ms], fontsize=8)
        ax[0, 1].set_title("init: " + " | ".join(f"{init} ({'left' if i == 0 else 'right'})"
                                                 for i, init in enumerate(inits))
                           + "\n○ probe, □ alignment, △ CKA last", fontsize=8)
        paths.append(save(fig, figdir / "alpha_and_init.png"))
    return paths


# ----------------------------------------------------------------------------- the map
def _f(m: tuple, digits=3, pct=False) -> str:
    return fmt(*m, digits=digits, pct=pct)


def _near(ms: tuple, thr: float) -> bool | None:
    return None if not math.isfinite(ms[0]) else ms[0] >= thr


def _ntk_map(table: list[dict]) -> tuple[str, list[str]]:
    """Claims 1 and 2: GN's NTK / representations near init, per GN configuration, next to the
    first-order optimizers at the same (width, init)."""
    g = _groups(table)
    rows, near_ntk, near_cka, lazier = [], [], [], []
    for key in sorted((k for k in g if k[0].startswith("exact_gn")),
                      key=lambda k: (k[0], k[2], k[1], k[3])):
        m, M, init, lr = key
        runs = g[key]
        p, a, c = _ms(runs, "ntk_sim_probe"), _ms(runs, "ntk_alignment"), _ms(runs, "cka_last")
        others = {o: [r for k, v in g.items() if k[0] == o and k[1] == M and k[2] == init
                      for r in v] for o in ("adam", "sgd")}
        op = {o: _ms(v, "ntk_sim_probe") for o, v in others.items()}
        oc = {o: _ms(v, "cka_last") for o, v in others.items()}
        ntk_ok = _near(p, NTK_NEAR), _near(a, NTK_NEAR)
        verdict_ntk = ("holds" if all(ntk_ok) else "fails" if not any(ntk_ok) else
                       "probe only" if ntk_ok[0] else "alignment only")
        verdict_cka = "holds" if _near(c, CKA_NEAR) else "fails"
        fo = [v[0] for v in op.values() if math.isfinite(v[0])]
        rel = ("–" if not fo or not math.isfinite(p[0]) else
               "lazier than both" if all(p[0] >= x for x in fo) else
               "less lazy than both" if all(p[0] < x for x in fo) else "between")
        near_ntk.append((verdict_ntk, m, M, init, lr))
        near_cka.append((verdict_cka, m, M, init, lr))
        lazier.append((rel, m, M, init, lr))
        ol = {o: _ms(v, "train_loss") for o, v in others.items()}
        rows.append([_label(m), M, init, f"{lr:g}", len(runs), _f(_ms(runs, "train_loss")),
                     f"{_f(ol['adam'])} / {_f(ol['sgd'])}",
                     _f(p), _f(a), _f(op["adam"]), _f(op["sgd"]), verdict_ntk, rel,
                     _f(c, 4), _f(oc["adam"], 4), _f(oc["sgd"], 4), verdict_cka,
                     _f(_ms(runs, "exact_frac"), 3, pct=True)])
    headers = ["GN step", "M", "init", "α", "seeds", "train loss", "Adam / SGD train loss",
               "NTK sim (probe)",
               "NTK alignment", "Adam probe", "SGD probe", f"NTK near init (≥ {NTK_NEAR})",
               "GN vs Adam/SGD (probe)", "CKA last", "Adam CKA", "SGD CKA",
               f"CKA near init (≥ {CKA_NEAR})", "exact steps"]

    def where(items, verdict):
        sel = [f"{_label(m)} M={M} {init} α={lr:g}" for v, m, M, init, lr in items if v == verdict]
        return "; ".join(sel) if sel else "nowhere in this sweep"
    lines = [
        f"* **GN's NTK stays near init** (both metrics ≥ {NTK_NEAR}): holds in "
        f"{sum(v == 'holds' for v, *_ in near_ntk)} of {len(near_ntk)} GN configurations "
        f"({where(near_ntk, 'holds')}); fails on both metrics in "
        f"{sum(v == 'fails' for v, *_ in near_ntk)} ({where(near_ntk, 'fails')}). "
        f"Compared with Adam and SGD at the same width and init (probe metric), GN is lazier "
        f"than both in {sum(v == 'lazier than both' for v, *_ in lazier)}, less lazy than both "
        f"in {sum(v == 'less lazy than both' for v, *_ in lazier)}, in between in "
        f"{sum(v == 'between' for v, *_ in lazier)}.",
        f"* **GN's representations stay near init** (CKA of the last half-layer ≥ {CKA_NEAR}): "
        f"holds in {sum(v == 'holds' for v, *_ in near_cka)} of {len(near_cka)} "
        f"GN configurations; fails in {where(near_cka, 'fails')}.",
    ]
    return tabulate(rows, headers=headers, tablefmt="github"), lines


def _trend(vals: list[tuple[int, tuple]]) -> str:
    """The trend of a similarity against the width: steps within :data:`FLAT` count as flat."""
    mus = [v[0] for _, v in vals if math.isfinite(v[0])]
    if len(mus) < 2:
        return "–"
    d = np.diff(mus)
    if (np.abs(d) <= FLAT).all():
        return f"flat (every step within {FLAT:g})"
    if (d >= -FLAT).all():
        return "holds (rises monotonically)"
    if (d <= FLAT).all():
        return "reversed (falls monotonically)"
    return ("mixed, up overall" if mus[-1] > mus[0] else "mixed, down overall")


def _width_map(table: list[dict]) -> tuple[str, list[str]]:
    """Claim 3: wider ⇒ lazier, per method along the width axis."""
    g = _groups(table, "width")
    rows, lines = [], []
    for m in _methods(g):
        keys = sorted(k for k in g if k[0] == m)
        for metric in ("ntk_sim_probe", "ntk_alignment", "cka_last"):
            vals = [(k[1], _ms(g[k], metric)) for k in keys]
            t = _trend(vals)
            rows.append([_label(m), metric] + [f"M={M}: {_f(v, 4)}" for M, v in vals] + [t])
            lines.append((m, metric, t))
    width = max((len(r) for r in rows), default=0)
    rows = [r[:-1] + [""] * (width - len(r)) + [r[-1]] for r in rows]
    headers = ["method", "metric"] + [f"width {i + 1}" for i in range(width - 3)] + \
        ["wider ⇒ lazier?"]
    summary = "; ".join(f"{_label(m)} {metric}: {t}" for m, metric, t in lines
                        if metric != "cka_last")
    return tabulate(rows, headers=headers, tablefmt="github"), [
        f"* **Wider ⇒ lazier** (similarity at the last epoch against M, base init and α): "
        f"{summary or 'no width axis in this sweep'}."]


def _trunc_map(table: list[dict]) -> tuple[str, list[str]]:
    """Claim 4: the reference truncation improves test accuracy, seed-paired per (M, init, α)."""
    by = {}
    for r in table:
        if r["optimizer"] == "exact_gn":
            by.setdefault((r["width"], r["init"], r["lr"]), {}).setdefault(
                r["step"], {})[r["seed"]] = r
    rows, verdicts = [], []
    for (M, init, lr), steps in sorted(by.items()):
        ex, tr = steps.get("exact", {}), steps.get("truncated", {})
        seeds = sorted(set(ex) & set(tr))
        if not seeds:
            continue
        diffs = [tr[s]["test_acc"] - ex[s]["test_acc"] for s in seeds]
        v = ("improves (every seed)" if all(d > 0 for d in diffs) else
             "worsens (every seed)" if all(d < 0 for d in diffs) else "mixed")
        verdicts.append((v, M, init, lr))
        rows.append([M, init, f"{lr:g}", len(seeds),
                     _f(mean_std(ex[s]["test_acc"] for s in seeds), 4, pct=True),
                     _f(mean_std(tr[s]["test_acc"] for s in seeds), 4, pct=True),
                     _f(mean_std(diffs), 3, pct=True),
                     _f(mean_std(ex[s]["train_loss"] for s in seeds)),
                     _f(mean_std(tr[s]["train_loss"] for s in seeds)),
                     _f(mean_std(tr[s]["exact_frac"] for s in seeds), 3, pct=True), v])
    headers = ["M", "init", "α", "seeds", "test acc exact", "test acc truncated",
               "truncated − exact", "train loss exact", "train loss truncated",
               "exact steps (truncated runs)", "truncation improves test acc?"]

    def where(v):
        sel = [f"M={M} {init} α={lr:g}" for v_, M, init, lr in verdicts if v_ == v]
        return ", ".join(sel) or "nowhere"
    lines = [f"* **The truncation improves test accuracy** (seed-paired): improves on every seed "
             f"at {where('improves (every seed)')}; worsens on every seed at "
             f"{where('worsens (every seed)')}; mixed at {where('mixed')}."]
    return tabulate(rows, headers=headers, tablefmt="github"), lines


def _all_table(table: list[dict]) -> str:
    g = _groups(table)
    rows = []
    for k in sorted(g, key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 9,
                                      k[1], k[2], k[3])):
        runs = g[k]
        rows.append([_label(k[0]), k[1], k[2], f"{k[3]:g}", runs[0]["axes"], len(runs),
                     runs[0]["epochs"], _f(_ms(runs, "train_loss")),
                     _f(_ms(runs, "train_acc"), 4, pct=True),
                     _f(_ms(runs, "test_acc"), 4, pct=True), _f(_ms(runs, "ntk_sim_probe"), 4),
                     _f(_ms(runs, "ntk_alignment"), 4), _f(_ms(runs, "ntk_velocity"), 3),
                     _f(_ms(runs, "cka_first"), 4), _f(_ms(runs, "cka_last"), 4),
                     _f(_ms(runs, "wcos"), 3), _f(_ms(runs, "wnorm"), 3)])
    headers = ["method", "M", "init", "lr / α", "axes", "seeds", "epochs", "train loss",
               "train acc", "test acc", "NTK sim probe", "NTK alignment", "NTK velocity (mean)",
               "CKA first", "CKA last", "weight cos", "weight norm ratio"]
    return tabulate(rows, headers=headers, tablefmt="github")


def build_laziness_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/laziness.csv``, ``OUT/figures/*.png`` and ``OUT/report.md`` from the logs;
    ``cfg`` is the sweep's ``config.json``."""
    out = Path(out)
    table = laziness_rows(out)
    write_laziness_csv(out, table)
    figures = make_figures(out, table)
    preset = cfg.get("preset", {})
    base = _base(table)
    ntk_t, ntk_l = _ntk_map(table)
    w_t, w_l = _width_map(table)
    t_t, t_l = _trunc_map(table)
    steps = preset.get("steps", {})
    batch = preset.get("batch_size")
    text = f"""# Is exact GN lazy? A map of when the laziness claims hold

Preset `{cfg.get('preset_name')}` on `{cfg.get('data')}` ({cfg.get('data_describe', '')}).
RevMLP, L = {preset.get('blocks')} blocks, linear first block = {preset.get('linear_first_block')},
fixed orthonormal readout, cross-entropy. {'Full batch' if batch is None else f'Batches of {batch}'}
of the first {preset.get('subset')} training images, {preset.get('epochs')} epochs, seeds
{preset.get('seeds')}. One factor at a time around the base configuration M = {base['width']},
init `{base['init']}`, GN α = {base['alpha']}: widths {preset.get('widths')} (every method),
GN α ∈ {sorted({*preset.get('alphas', []), base['alpha'] or 0} - {0})} (both GN steps, base M),
inits {[base['init'], *preset.get('inits', [])]} (every method, base M). Inits: `paper` =
W ~ N(0, (1e-3)²), `fan_in` = W ~ N(0, 1/M) (std 1/√fan-in). GN steps: `exact` = ExactGN's
exact minimum-norm step, `truncated` = the reference code's truncated pseudo-inverse, ExactGN
options {steps.get('truncated', {})}. Adam / SGD at the reference learning rates (no momentum).

**Metrics** (on the first {preset.get('probe_size')} training images, every
{preset.get('every')} epochs and at the last): `ntk_sim_probe` = the reference code's NTK
similarity cos(K₀ v̄, K_t v̄), v̄ the mean of {preset.get('num_probes')} Gaussian probes, on the
pre-readout features X^(L); `ntk_alignment` = ⟨Θ₀, Θ_t⟩_F / (‖Θ₀‖_F ‖Θ_t‖_F) of the full logit NTK;
NTK velocity = (1 − alignment between consecutive measurements) per epoch, averaged over training;
CKA = linear CKA to init after each coupling half-layer (`cka_last` = the last one); weight
cosine / norm ratio over all trained parameters. "Near init": NTK ≥ {NTK_NEAR}, CKA ≥
{CKA_NEAR} (our thresholds). All numbers: last epoch, mean ± std over seeds. How far training
got matters (a run that barely moved is trivially lazy): the train loss is shown next to
every similarity. Width trends: a change below {FLAT:g} between neighbouring widths counts as
flat.

## The map

{chr(10).join(ntk_l + w_l + t_l)}

### Claims 1–2: GN's NTK and representations near init, per GN configuration

{ntk_t}

### Claim 3: wider ⇒ lazier (width axis)

{w_t}

### Claim 4: the truncation and test accuracy (seed-paired)

{t_t}

## Every configuration

{_all_table(table)}

Per-run values: `laziness.csv`.

## Figures

""" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures) + "\n"
    text += failures_section(out)
    return write_report(out, text)
