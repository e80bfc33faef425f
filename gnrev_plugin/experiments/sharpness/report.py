"""Figures and ``report.md`` of ``gnrev reproduce sharpness``, from the run logs only.

Every number is read from ``OUT/runs/*/log.jsonl`` and the configuration each run recorded (its
dataset, activation, method, ρ or σ² and ``ablate_nme``). Comparisons are **paired by seed**: a
method's gain is ``acc(method, seed s) − acc(SGD, same activation, seed s)``, averaged over seeds
with its standard error ``SE = sd/√n`` (sample standard deviation). A claim is called

* "holds" when the paired difference it predicts is beyond ``2 SE`` in the predicted direction,
* "contradicted" when it is beyond ``2 SE`` in the other direction,
* "not resolved" otherwise (within the seed noise at this scale).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from tabulate import tabulate

from ..plotting import new_figure, plot_mean_std, save
from ..tables import collect_runs, failures_section, write_report

__all__ = ["build_sharpness_report", "paired", "verdict", "activation_label", "beta_of"]

SGD, SAM, PSAM = "gnrev.sgd", "gnrev.sam", "gnrev.psam"
WN, HTP, GNTP = "gnrev.weight_noise", "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty"
NAMES = {SGD: "SGD", SAM: "SAM", PSAM: "PSAM", WN: "weight noise",
         HTP: "Hessian-trace penalty", GNTP: "GN-trace penalty"}
RHO_METHODS, SIGMA2_METHODS = (SAM, PSAM), (WN, HTP, GNTP)


def beta_of(act: str) -> float:
    """β of an activation name (``gelu`` → 1, ``beta_gelu:b`` → b, ``relu`` → ∞)."""
    if act == "relu":
        return math.inf
    if act == "gelu":
        return 1.0
    if act.startswith("beta_gelu:"):
        return float(act.split(":", 1)[1])
    return math.nan


def activation_label(act: str, ablate: bool = False) -> str:
    base = {"relu": "ReLU", "gelu": "GELU"}.get(act)
    if base is None and act.startswith("beta_gelu:"):
        base = f"β-GELU β={act.split(':', 1)[1]}"
    base = base or act
    return base + (", NME ablated" if ablate else "")


def _stats(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, SE, n)`` with ``SE = sd/√n`` (sample sd; ``nan`` for n < 2)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan, len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return m, sd / len(v) ** 0.5, len(v)


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean and SE over the common seeds of ``a[s] − b[s]``."""
    common = sorted(set(a) & set(b))
    return _stats(a[s] - b[s] for s in common)


def verdict(diff: tuple[float, float, int], predicted_sign: int) -> str:
    """"holds" / "contradicted" / "not resolved" for a paired difference ``(mean, SE, n)`` that
    the claim predicts to have sign ``predicted_sign`` (module docstring)."""
    m, se, n = diff
    if not math.isfinite(m) or n < 2 or not math.isfinite(se):
        return "not resolved (too few seeds)"
    if m * predicted_sign > 2 * se:
        return "holds"
    if m * predicted_sign < -2 * se:
        return "contradicted"
    return "not resolved"


def _pct(x: tuple[float, float, int], signed: bool = True) -> str:
    m, se, n = x
    if not math.isfinite(m):
        return "–"
    body = f"{100 * m:+.1f}" if signed else f"{100 * m:.1f}"
    return body + (f" ± {100 * se:.1f}" if math.isfinite(se) else "")


class _Runs:
    """The runs of one dataset, indexed by ``(activation, method, ablate, hyper)`` → seed."""

    def __init__(self, runs: list[dict], dataset: str) -> None:
        self.by: dict[tuple, dict[int, dict]] = {}
        for r in runs:
            c = r["config"]
            if c.get("dataset") != dataset or not r["rows"]:
                continue
            key = (c["activation"], c["method"], bool(c["ablate"]), c["hyper"])
            self.by.setdefault(key, {})[c["spec"]["seed"]] = r

    def final(self, act: str, method: str, hyper=None, ablate: bool = False,
              key: str = "test_acc") -> dict[int, float]:
        runs = self.by.get((act, method, ablate, hyper), {})
        return {s: r["rows"][-1][key] for s, r in runs.items()
                if r["rows"][-1].get(key) is not None}

    def rows(self, act: str, method: str, hyper=None, ablate: bool = False,
             key: str | None = None) -> list[list[dict]]:
        """The log rows of each seed (only the seeds that logged ``key``, when given)."""
        return [r["rows"] for r in self.by.get((act, method, ablate, hyper), {}).values()
                if key is None or any(key in row for row in r["rows"])]

    def diverged(self, act: str, method: str, hyper=None, ablate: bool = False) -> int:
        return sum(bool(r["rows"][-1].get("diverged"))
                   for r in self.by.get((act, method, ablate, hyper), {}).values())

    def gain(self, act: str, method: str, hyper, ablate: bool = False) -> tuple[float, float, int]:
        return paired(self.final(act, method, hyper, ablate), self.final(act, SGD))


def _accuracy_tables(R: _Runs, p: dict) -> str:
    out = []
    for methods, grid, sym in ((RHO_METHODS, p["rhos"], "ρ"), (SIGMA2_METHODS, p["sigma2s"], "σ²")):
        table = []
        for method in methods:
            if method not in p["methods"]:
                continue
            variants = [(a, False) for a in p["activations"]]
            if method == PSAM:
                variants += [(a, True) for a in p.get("ablate", [])]
            for act, abl in variants:
                sgd = _stats(R.final(act, SGD).values())
                row = [NAMES[method], activation_label(act, abl), _pct(sgd, signed=False)]
                for h in grid:
                    acc = _stats(R.final(act, method, h, abl).values())
                    gain = R.gain(act, method, h, abl)
                    div = R.diverged(act, method, h, abl)
                    cell = f"{_pct(acc, signed=False)} ({_pct(gain)})"
                    row.append(cell + (f" [{div} diverged]" if div else ""))
                table.append(row)
        headers = ["method", "activation", "SGD"] + [f"{sym} = {h:g}" for h in grid]
        out.append(tabulate(table, headers=headers, tablefmt="github"))
    return ("Final test accuracy in % (mean ± SE over seeds) and, in parentheses, the gain over SGD "
            "with the same activation, paired by seed (percentage points, ± SE).\n\n"
            + "\n\n".join(out) + "\n")


def _curvature_figure(out: Path, R: _Runs, p: dict, ds: str) -> Path | None:
    """``tr H``, ``tr G``, ``tr NME`` over training per activation (one seed)."""
    # curvature over training (the curvature runs: one seed)
    curv = [m for m in p.get("curvature_methods", []) if m == SGD or m in p["methods"]]
    if curv:
        acts = p["activations"]
        fig, ax = new_figure(3, len(acts), width=3.6, height=2.8)
        for j, act in enumerate(acts):
            for i, (key, title) in enumerate((("tr_hessian", "tr H"), ("tr_ggn", "tr G"),
                                              ("tr_nme", "tr NME"))):
                a = ax[i, j]
                plot_mean_std(a, R.rows(act, SGD, key=key), key, "SGD", "k", marker="o")
                for m, cmap in ((HTP, "Reds"), (GNTP, "Blues")):
                    if m not in curv:
                        continue
                    for k, h in enumerate(p["sigma2s"]):
                        import matplotlib

                        c = matplotlib.colormaps[cmap](0.45 + 0.5 * k / max(1, len(p["sigma2s"]) - 1))
                        plot_mean_std(a, R.rows(act, m, h, key=key), key,
                                      f"{'HTP' if m == HTP else 'GNTP'} σ²={h:g}", c, marker=".")
                a.axhline(0, color="k", lw=0.5)
                a.set(xlabel="epoch", title=f"{title}, {activation_label(act)}")
                if i == 0 and j == 0:
                    a.legend(fontsize=6)
        return save(fig, out / "figures" / f"fig_sharpness_curvature_{ds}.png")
    return None


def _beta_figure(out: Path, R: _Runs, p: dict, ds: str) -> Path | None:
    """The gain over SGD against β at the largest ρ and the middle σ²."""
    # the β trend at the largest ρ / the middle σ²
    finite = [a for a in p["activations"] if math.isfinite(beta_of(a))]
    order = sorted(finite, key=beta_of) + [a for a in p["activations"] if beta_of(a) == math.inf]
    if order:
        fig, ax = new_figure(1, 1, width=5.0)
        a = ax[0, 0]
        xs = list(range(len(order)))
        lines = [(m, p["rhos"][-1], "ρ") for m in RHO_METHODS if m in p["methods"]]
        mid = p["sigma2s"][len(p["sigma2s"]) // 2]
        lines += [(m, mid, "σ²") for m in (HTP, GNTP) if m in p["methods"]]
        for k, (m, h, sym) in enumerate(lines):
            g = [R.gain(act, m, h) for act in order]
            a.errorbar(xs, [100 * v[0] for v in g],
                       yerr=[100 * (v[1] if math.isfinite(v[1]) else 0) for v in g],
                       marker="o", capsize=2, color=f"C{k}", label=f"{NAMES[m]} {sym}={h:g}")
        a.axhline(0, color="k", lw=0.6)
        a.set_xticks(xs, [("ReLU (β=∞)" if beta_of(x) == math.inf else f"β={beta_of(x):g}")
                          for x in order])
        a.set(ylabel="test acc − SGD (pp)", title=f"β trend ({ds})")
        a.legend(fontsize=7)
        return save(fig, out / "figures" / f"fig_sharpness_beta_{ds}.png")
    return None


def _figures(out: Path, R: _Runs, p: dict, ds: str) -> list[Path]:
    figs = []
    variants = [(a, False) for a in p["activations"]] + [(a, True) for a in p.get("ablate", [])]
    colors = {v: f"C{i}" for i, v in enumerate(variants)}

    def gain_panel(ax, method: str, grid: list, sym: str) -> None:
        for act, abl in variants:
            if abl and method != PSAM:
                continue
            pts = [(h, R.gain(act, method, h, abl)) for h in grid]
            xs = [h for h, g in pts if math.isfinite(g[0])]
            ms = [100 * g[0] for h, g in pts if math.isfinite(g[0])]
            es = [100 * (g[1] if math.isfinite(g[1]) else 0.0) for h, g in pts if math.isfinite(g[0])]
            if xs:
                ax.errorbar(xs, ms, yerr=es, marker="o", ms=3, capsize=2,
                            color=colors[(act, abl)], ls="--" if abl else "-",
                            label=activation_label(act, abl))
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xscale="log", xlabel=sym, ylabel="test acc − SGD (pp)",
               title=f"{NAMES[method]} ({ds})")
        ax.set_xticks(grid, [f"{h:g}" for h in grid])
        ax.minorticks_off()
        ax.legend(fontsize=7)

    rho_methods = [m for m in RHO_METHODS if m in p["methods"]]
    if rho_methods:
        fig, ax = new_figure(1, len(rho_methods))
        for a, m in zip(ax.flat, rho_methods, strict=True):
            gain_panel(a, m, p["rhos"], "ρ")
        figs.append(save(fig, out / "figures" / f"fig_sharpness_rho_{ds}.png"))
    s2_methods = [m for m in SIGMA2_METHODS if m in p["methods"]]
    if s2_methods:
        fig, ax = new_figure(1, len(s2_methods))
        for a, m in zip(ax.flat, s2_methods, strict=True):
            gain_panel(a, m, p["sigma2s"], "σ²")
        figs.append(save(fig, out / "figures" / f"fig_sharpness_sigma2_{ds}.png"))
    for make in (_curvature_figure, _beta_figure):
        path = make(out, R, p, ds)
        if path is not None:
            figs.append(path)
    return figs


def _claims(R: _Runs, p: dict) -> list[str]:
    lines = []
    rho = p["rhos"][-1]
    smooth = [a for a in p["activations"] if a != "relu"]
    have = set(p["methods"])
    if {SAM, PSAM} <= have and "relu" in p["activations"] and "gelu" in p["activations"]:
        gap = {a: paired(R.final(a, PSAM, rho), R.final(a, SAM, rho)) for a in ("relu", "gelu")}
        dd = paired({s: R.final("relu", PSAM, rho)[s] - R.final("relu", SAM, rho)[s]
                     for s in set(R.final("relu", PSAM, rho)) & set(R.final("relu", SAM, rho))},
                    {s: R.final("gelu", PSAM, rho)[s] - R.final("gelu", SAM, rho)[s]
                     for s in set(R.final("gelu", PSAM, rho)) & set(R.final("gelu", SAM, rho))})
        below = R.gain("relu", PSAM, rho)
        lines.append(
            f"1. **PSAM drops with ReLU at large ρ** (ρ = {rho:g}): PSAM − SAM = "
            f"{_pct(gap['relu'])} pp with ReLU, {_pct(gap['gelu'])} pp with GELU; the ReLU − GELU "
            f"difference of these gaps is {_pct(dd)} pp → **{verdict(dd, -1)}**. PSAM − SGD "
            f"with ReLU: {_pct(below)} pp (the paper: below SGD) → **{verdict(below, -1)}**.")
    if PSAM in have:
        order = sorted([a for a in p["activations"] if math.isfinite(beta_of(a))], key=beta_of)
        order += [a for a in p["activations"] if beta_of(a) == math.inf]
        gains = [(a, R.gain(a, PSAM, rho)) for a in order]
        first, last = order[0], order[-1]
        trend = paired({s: R.final(last, PSAM, rho)[s] - R.final(last, SGD)[s]
                        for s in set(R.final(last, PSAM, rho)) & set(R.final(last, SGD))},
                       {s: R.final(first, PSAM, rho)[s] - R.final(first, SGD)[s]
                        for s in set(R.final(first, PSAM, rho)) & set(R.final(first, SGD))})
        mono = all(g1[0] >= g2[0] for (_, g1), (_, g2) in zip(gains, gains[1:], strict=False))
        text = ", ".join(f"{activation_label(a)} {_pct(g)}" for a, g in gains)
        line = (f"2. **β trend** (PSAM gain over SGD at ρ = {rho:g}, pp): {text}. "
                f"{activation_label(last)} − {activation_label(first)}: {_pct(trend)} pp → "
                f"**{verdict(trend, -1)}**; the gain is {'' if mono else 'not '}monotone in β.")
        if GNTP in have:
            mid = p["sigma2s"][len(p["sigma2s"]) // 2]
            gn = [R.gain(a, GNTP, mid)[0] for a in order]
            ps = [g[0] for _, g in gains]
            if all(math.isfinite(v) for v in gn + ps):
                line += (f" Spread over β of the gain (max − min): PSAM {100 * (max(ps) - min(ps)):.1f}"
                         f" pp, GN-trace penalty (σ² = {mid:g}) {100 * (max(gn) - min(gn)):.1f} pp "
                         f"(the paper: the GN-trace penalty is more stable across β).")
        lines.append(line)
    for act in p.get("ablate", []):
        if PSAM not in have:
            break
        d = paired(R.final(act, PSAM, rho, True), R.final(act, PSAM, rho))
        relu = R.gain("relu", PSAM, rho) if "relu" in p["activations"] else (math.nan, math.nan, 0)
        lines.append(
            f"3. **Ablating the activation NME** ({activation_label(act)}, PSAM ρ = {rho:g}): "
            f"ablated − plain = {_pct(d)} pp (gain over SGD: plain {_pct(R.gain(act, PSAM, rho))}, "
            f"ablated {_pct(R.gain(act, PSAM, rho, True))}, ReLU {_pct(relu)}) → "
            f"**{verdict(d, -1)}** (the paper: the ablated GELU loses PSAM's effectiveness, "
            "like ReLU).")
    if {HTP, GNTP} <= have:
        parts, verdicts = [], []
        for h in p["sigma2s"]:
            for act in smooth:
                d = paired(R.final(act, GNTP, h), R.final(act, HTP, h))
                parts.append(f"{activation_label(act)} σ²={h:g}: {_pct(d)}")
                verdicts.append((h, act, verdict(d, +1), d))
        hmax = p["sigma2s"][-1]
        at_max = [f"{activation_label(a)} {v}" for h, a, v, _ in verdicts if h == hmax]
        div_h = sum(R.diverged(a, HTP, h) for a in p["activations"] for h in p["sigma2s"])
        div_g = sum(R.diverged(a, GNTP, h) for a in p["activations"] for h in p["sigma2s"])
        curv = []
        for act in smooth[:1]:
            th = R.rows(act, HTP, hmax, key="tr_hessian")
            tg = R.rows(act, GNTP, hmax, key="tr_hessian")
            ts = R.rows(act, SGD, key="tr_hessian")
            if th and tg and ts:
                curv.append(
                    f"final tr H of {activation_label(act)} (seed {p['curvature_seeds'][0]}): "
                    f"SGD {ts[0][-1]['tr_hessian']:.3g}, Hessian-trace penalty σ²={hmax:g} "
                    f"{th[0][-1]['tr_hessian']:.3g} (its tr NME {th[0][-1]['tr_nme']:.3g}); final "
                    f"tr G: SGD {ts[0][-1]['tr_ggn']:.3g}, GN-trace penalty "
                    f"{tg[0][-1]['tr_ggn']:.3g}")
        lines.append(
            "4. **GN-trace penalty more stable than the Hessian-trace penalty** (GNTP − HTP test "
            f"accuracy, pp, smooth activations): {'; '.join(parts)}. At the largest σ² = {hmax:g}: "
            f"{', '.join(at_max)}. Diverged runs: Hessian-trace {div_h}, GN-trace {div_g}. "
            + ("; ".join(curv) + "." if curv else ""))
    return lines


def build_sharpness_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs; ``cfg`` is the
    experiment's ``config.json``."""
    out = Path(out)
    runs = [r for r in collect_runs(out) if (r.get("config") or {}).get("spec")]
    p = cfg.get("preset", {})
    secs, figs = [], []
    for ds in cfg.get("datasets", []):
        R = _Runs(runs, ds)
        if not R.by:
            continue
        ds_figs = _figures(out, R, p, ds)
        figs += ds_figs
        secs.append(f"## {ds}\n\n{(cfg.get('data_describe') or {}).get(ds, '')}\n\n"
                    + _accuracy_tables(R, p) + "\n### The paper's claims at this scale\n\n"
                    + "\n".join(_claims(R, p)) + "\n\n"
                    + "\n".join(f"![{f.stem}](figures/{f.name})" for f in ds_figs) + "\n")
    text = (
        "# Sharpness regularisers and the NME (reproduction of Dauphin, Agarwala & Mobahi)\n\n"
        f"Preset `{cfg.get('preset_name')}`: MLP {p.get('input_dim')} (whitened PCA inputs) → "
        f"{p.get('hidden')} → classes, float64, cross-entropy; every method wraps SGD at lr "
        f"{p.get('lr')}, batch {p.get('batch_size')}, {p.get('epochs')} epochs on "
        f"{p.get('num_train')} training samples, tested on {p.get('num_test')}; seeds "
        f"{p.get('seeds')}; ρ ∈ {p.get('rhos')}, σ² ∈ {p.get('sigma2s')}, "
        f"{p.get('samples')} Hutchinson probe / sampled label / noise draw per step. Curvature "
        f"(tr H, tr G, tr NME of the mean cross-entropy on the first {p.get('probe_size')} "
        f"training samples) for seed(s) {p.get('curvature_seeds')} of "
        f"{[NAMES.get(m, m) for m in p.get('curvature_methods', [])]}.\n\n"
        "Every number below comes from this run's logs; none is the paper's. Verdicts compare "
        "paired-by-seed differences with twice their standard error (see "
        "`gnrev_plugin/experiments/sharpness/report.py`).\n\n"
        + "\n".join(secs) + failures_section(out))
    return write_report(out, text)
