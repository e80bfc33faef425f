"""Figures and ``report.md`` of ``gnrev reproduce exact-gn``, from the run logs only.

Runs are grouped by their ``setting`` and by the short registry name of their optimizer
(``short_name(spec.optimizer)``: ``exact_gn``, ``adam``, ``sgd`` or a third-party name), both read
from each run's ``config.json``.

A partially finished sweep (stopped, still running, or with crashed runs) still gives a report:
every run of the preset is listed in "Sweep progress" as finished, unfinished (epochs logged of
the total), failed or not started; the final-number tables and findings use finished runs only,
and the figures draw unfinished runs as dashed lines of their own, never mixed into the mean of
the finished ones.
"""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from gnrev_plugin.build import short_name
from gnrev_plugin.engine.rundir import RunDir

from ..plotting import LABELS
from ..tables import collect_runs, failures_section, fmt, mean_std, spec_of, write_report
from .figures import SETTING_TITLES, _cka_keys, _optimizers, make_figures

__all__ = ["build_exact_gn_report", "RESOURCES_LOG", "run_status"]

#: Per-epoch resource rows of a run, next to its ``log.jsonl`` (written by
#: :func:`~gnrev_plugin.experiments.exact_gn.run.record_resources`).
RESOURCES_LOG = "resources.jsonl"


def run_status(run: dict) -> str:
    """``finished`` (``result.json`` written), ``failed`` (``error.txt``), ``unfinished`` (epochs
    logged, no result: stopped or still running) or ``not started`` (no epoch logged)."""
    if run.get("result") is not None:
        return "finished"
    if run.get("error"):
        return "failed"
    return "unfinished" if run.get("rows") else "not started"


def _group(runs: list[dict], status: str = "finished"
           ) -> dict[tuple[str, str], list[list[dict]]]:
    """``{(setting, optimizer): [log rows of each run]}`` over the runs with this status."""
    groups: dict[tuple[str, str], list[list[dict]]] = {}
    for r in runs:
        setting = (r["config"] or {}).get("setting")
        optimizer = short_name(spec_of(r).get("optimizer", ""))
        if r["rows"] and run_status(r) == status:
            groups.setdefault((setting, optimizer), []).append(r["rows"])
    return groups


def _expected_runs(cfg: dict) -> list[str]:
    """The run names the sweep's preset asks for (``setting/optimizer/seed<k>``), in sweep
    order (:func:`~gnrev_plugin.experiments.exact_gn.run.exact_gn_run_specs`)."""
    preset = cfg.get("preset") or {}
    return [f"{setting}/{short_name(opt)}/seed{seed}" for setting in SETTING_TITLES
            if setting in preset for seed in preset.get("seeds", [])
            for opt in preset.get("optimizers", [])]


def _final(runs: list[list[dict]], key: str, epoch: int | None = None):
    vals = []
    for rows in runs:
        sel = [r for r in rows if epoch is None or r["epoch"] == epoch]
        if sel:
            vals.append(sel[-1].get(key))
    return mean_std(vals)


def _table(groups, setting, expected: dict | None = None) -> tuple[str, dict]:
    """The final-numbers table of ``setting`` (finished runs; the ``seeds`` column reads
    ``finished / expected`` when ``expected[opt]`` is known) and its summary."""
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
        n_exp = (expected or {}).get(opt)
        rows.append([LABELS.get(opt, opt),
                     f"{len(runs)}" if n_exp is None else f"{len(runs)} / {n_exp}",
                     f"{last_epoch}",
                     fmt(*s["train_loss"]), fmt(*s["train_acc"], pct=True),
                     fmt(*s["test_loss"]), fmt(*s["test_acc"], pct=True),
                     fmt(*s["best_test_acc"], pct=True),
                     fmt(*s["batch_loss_change_pct_ep1"], digits=3) + " / "
                     + fmt(*s["batch_loss_change_pct"], digits=3),
                     fmt(*s["ntk_sim"], digits=5), fmt(*s["cka_first"], digits=4) + " / "
                     + fmt(*s["cka_last"], digits=4),
                     fmt(*s["wcos/__all__"], digits=4),
                     fmt(*s["exact_frac"], pct=True, digits=3)])
    headers = ["optimizer", "seeds (finished)", "epochs", "train loss", "train acc", "test loss",
               "test acc", "best test acc", "% loss change/batch (ep 1 / last)",
               "NTK sim to init", "CKA to init (first / last layer)", "weight cos to init",
               "exact GN steps"]
    return tabulate(rows, headers=headers, tablefmt="github"), summary


def _compare(summary: dict, key: str) -> str:
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
    return "\n".join(lines) or "No finished run yet."


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


def _resources(out: Path, run: dict) -> list[dict]:
    return RunDir(Path(out) / "runs" / run["name"]).rows(RESOURCES_LOG)


def _progress_section(runs: list[dict], cfg: dict) -> tuple[str, str]:
    """``(one-line summary per setting, table)`` of every run the preset asks for (and any
    other run directory found): status, epochs logged of the total, latest accuracies."""
    by_name = {r["name"]: r for r in runs}
    names = _expected_runs(cfg)
    names += sorted(n for n in by_name if n not in names)
    preset = cfg.get("preset") or {}
    table, counts = [], {}
    for name in names:
        r = by_name.get(name, {"name": name, "rows": [], "result": None, "error": None,
                               "config": None})
        status = run_status(r)
        setting = name.split("/")[0]
        total = spec_of(r).get("epochs") or (preset.get(setting) or {}).get("epochs")
        last = r["rows"][-1] if r["rows"] else {}
        done = last.get("epoch")
        counts.setdefault(setting, {}).setdefault(status, []).append(done)
        table.append([name, status if status != "unfinished" else f"**{status}**",
                      "–" if done is None else f"{done} / {total}",
                      fmt(last.get("train_acc"), pct=True), fmt(last.get("test_acc"), pct=True),
                      "–" if last.get("time_s") is None else f"{last['time_s']:.0f}"])
    lines = []
    for setting, c in counts.items():
        n = sum(len(v) for v in c.values())
        parts = [f"{len(c.get('finished', []))} of {n} runs finished"]
        if c.get("unfinished"):
            parts.append(f"{len(c['unfinished'])} unfinished (at epoch "
                         + ", ".join(str(e) for e in c["unfinished"]) + ")")
        for st in ("failed", "not started"):
            if c.get(st):
                parts.append(f"{len(c[st])} {st}")
        lines.append(f"* **{SETTING_TITLES.get(setting, setting)}:** " + ", ".join(parts) + ".")
    return "\n".join(lines), tabulate(
        table, headers=["run", "status", "epochs logged", "train acc (latest)",
                        "test acc (latest)", "training time (s)"], tablefmt="github")


def _cpu_and_wall(out: Path, group: list[dict]) -> tuple[float, float]:
    """Σ CPU seconds and Σ wall-clock seconds over consecutive resource rows of one session
    (epoch ``e − 1`` → ``e`` with a wall-clock gap within 5 s of the training clock's: a
    session's first row, whose CPU time includes building the model, is left out)."""
    cpu = wall = 0.0
    for r in group:
        res = _resources(out, r)
        for prev, row in zip(res, res[1:], strict=False):
            dw = row["wall_clock"] - prev["wall_clock"]
            dt = (row.get("time_s") or 0.0) - (prev.get("time_s") or 0.0)
            if row["epoch"] == prev["epoch"] + 1 and abs(dw - dt) < 5.0:
                cpu += row.get("cpu_s") or 0.0
                wall += dw
    return cpu, wall


def _resources_section(out: Path, runs: list[dict]) -> str:
    """Training time, CPU use, peak memory and machine load per setting and optimizer, from
    each run's ``resources.jsonl`` and the training clock of its ``log.jsonl``."""
    table = []
    for setting in SETTING_TITLES:
        sel = [r for r in runs if (r["config"] or {}).get("setting") == setting and r["rows"]]
        if not sel:
            continue
        opts = _optimizers({(setting, short_name(spec_of(r).get("optimizer", ""))): None
                            for r in sel}, setting)
        for opt in opts + ["__all__"]:
            group = [r for r in sel
                     if opt == "__all__" or short_name(spec_of(r).get("optimizer", "")) == opt]
            res = [row for r in group for row in _resources(out, r)]
            fin = [r for r in group if run_status(r) == "finished"]
            train_s = sum(r["rows"][-1].get("time_s") or 0.0 for r in group)
            per_run = mean_std([r["rows"][-1].get("time_s") for r in fin])
            epochs = sum(r["rows"][-1]["epoch"] for r in group)
            cpu, wall = _cpu_and_wall(out, group)
            load = [row["load1"] for row in res if row.get("load1") is not None]
            rss = [row["maxrss_mib"] for row in res if row.get("maxrss_mib") is not None]
            span = ((max(x["wall_clock"] for x in res) - min(x["wall_clock"] for x in res))
                    if res else math.nan)
            label = "**all**" if opt == "__all__" else LABELS.get(opt, opt)
            table.append([
                SETTING_TITLES[setting], label, f"{len(fin)} / {len(group)}", f"{epochs}",
                f"{train_s:.4g}", fmt(*per_run, digits=4),
                f"{train_s / epochs:.2f}" if epochs else "–",
                f"{cpu / wall:.2f}" if wall else "–",
                f"{max(rss):.0f}" if rss else "–",
                (f"{sum(load) / len(load):.1f} [{min(load):.1f}–{max(load):.1f}]"
                 if load else "–"),
                f"{span:.0f}" if math.isfinite(span) else "–",
                "/".join(str(t) for t in sorted({row.get("threads") for row in res} - {None}))
                or "–"])
    if not table:
        return ""
    return ("\n## Time, memory and machine load\n\nFrom each run's `log.jsonl` (training clock "
            "`time_s`, summed over resumed sessions; it includes the per-epoch evaluations, "
            "diagnostics and checkpoints) and `resources.jsonl` (one row per logged epoch). Peak "
            "RSS is the sweep process's `ru_maxrss` (one process runs the runs one after the "
            "other, so it is the peak up to that run). CPU / wall is the process's user + system "
            "CPU seconds per wall-clock second between consecutive epochs of a session (2 = both "
            "of 2 cores busy). The "
            "load average (1 min) is the whole machine's, other users' jobs included. The "
            "wall-clock span runs from the first to the last logged epoch of the group and "
            "includes any pause between resumed sessions.\n\n"
            + tabulate(table, headers=[
                "setting", "optimizer", "runs finished", "epochs logged",
                "training time, sum (s)", "per finished run (s)", "s / epoch",
                "CPU / wall", "peak RSS (MiB)", "load avg, mean [min–max]",
                "wall-clock span (s)", "torch threads"], tablefmt="github") + "\n")


def build_exact_gn_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs; ``cfg`` is the
    sweep's ``config.json``. Works on a partially finished sweep (see the module docstring)."""
    runs = collect_runs(out)
    groups = _group(runs)
    partial = _group(runs, "unfinished")
    figures = make_figures(out, groups, partial)
    preset = cfg.get("preset", {})
    n_seeds = len(preset.get("seeds", [])) or None
    progress, progress_table = _progress_section(runs, cfg)
    tables, summaries = [], {}
    for setting in ("full_batch", "mini_batch"):
        if any(s == setting for s, _ in groups):
            t, summ = _table(groups, setting,
                             {o: n_seeds for (s, o) in groups if s == setting})
            summaries[setting] = summ
            tables.append(f"### {SETTING_TITLES[setting].capitalize()}\n\n"
                          f"{cfg.get('data_describe', {}).get(setting, '')}\n\n{t}\n")
        elif setting in preset:
            tables.append(f"### {SETTING_TITLES[setting].capitalize()}\n\nNo finished run "
                          "yet (see Sweep progress).\n")
    finished = {r["name"] for r in runs if run_status(r) == "finished"}
    complete = ("Every run of the preset finished."
                if set(_expected_runs(cfg)) <= finished and len(finished) == len(runs) else
                "**This sweep is not finished.** The tables and findings below use finished "
                "runs only; the figures draw unfinished runs dashed. `gnrev reproduce ... "
                "--resume` continues it.")
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

## Sweep progress

{progress}

{complete}

<details><summary>every run</summary>

{progress_table}

</details>

## What the logs say (finished runs)

{_findings(summaries)}

## Final numbers (finished runs; mean ± std over seeds, last epoch)

{chr(10).join(tables)}
## Figures

""" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures) + "\n"
    text += _resources_section(out, runs)
    text += failures_section(out)
    return write_report(out, text)
