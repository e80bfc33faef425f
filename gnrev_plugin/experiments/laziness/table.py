"""The laziness table: one row per run from its ``config.json`` and ``log.jsonl`` (the last
logged value of each metric, the mean NTK velocity over the measured epochs, the mean fraction of
exact GN steps), written as ``laziness.csv``, and its grouping by method and sweep axis."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from gnrev_plugin.engine.rundir import atomic_write_text

from ..plotting import COLORS
from ..tables import collect_runs, mean_std

__all__ = ["laziness_rows", "write_laziness_csv", "CSV_COLUMNS", "METHOD_LABELS",
           "METHOD_COLORS", "METHOD_ORDER"]

CSV_COLUMNS = ["data", "optimizer", "step", "width", "init", "init_std", "lr", "seed", "axes",
               "epochs", "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc",
               "ntk_sim_probe", "ntk_alignment", "ntk_velocity", "cka_first", "cka_last",
               "wcos", "wnorm", "exact_frac", "time_s", "run"]

METHOD_LABELS = {"exact_gn-exact": "GN exact", "exact_gn-truncated": "GN truncated",
                 "adam": "Adam", "sgd": "SGD"}
METHOD_COLORS = {"exact_gn-exact": COLORS["exact_gn"], "exact_gn-truncated": "tab:purple",
                 "adam": COLORS["adam"], "sgd": COLORS["sgd"]}
METHOD_ORDER = ["exact_gn-exact", "exact_gn-truncated", "adam", "sgd"]


def _method(row: dict) -> str:
    return row["optimizer"] if row["step"] in ("-", None) else f"{row['optimizer']}-{row['step']}"


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _last(rows: list[dict], key: str):
    for r in reversed(rows):
        if r.get(key) is not None:
            return r[key]
    return None


def _mean_key(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _cka_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("cka/")}
    return sorted(keys, key=lambda k: (int(k.split(".")[1]), k.split(".")[2]))


def laziness_rows(out: Path) -> list[dict]:
    """One summary dict per finished or partial run (keys :data:`CSV_COLUMNS` plus ``rows``, the
    run's log, and ``method``)."""
    table = []
    for run in collect_runs(out):
        cfg, rows = run["config"] or {}, run["rows"]
        if cfg.get("experiment_run") != "laziness" or not rows:
            continue
        cka = _cka_keys(rows)
        r = dict(data=cfg.get("data"), optimizer=cfg["optimizer"], step=cfg["step"],
                 width=cfg["width"], init=cfg["init"], init_std=cfg["init_std"], lr=cfg["lr"],
                 seed=cfg["seed"], axes="+".join(cfg.get("axes", [])), epochs=rows[-1]["epoch"],
                 train_loss=_last(rows, "train_loss"), train_acc=_last(rows, "train_acc"),
                 test_loss=_last(rows, "test_loss"), test_acc=_last(rows, "test_acc"),
                 best_test_acc=max((x.get("test_acc") or 0.0) for x in rows),
                 ntk_sim_probe=_last(rows, "ntk_sim_probe"), ntk_alignment=_last(rows, "ntk_sim"),
                 ntk_velocity=_mean_key(rows, "ntk_velocity"),
                 cka_first=_last(rows, cka[0]) if cka else None,
                 cka_last=_last(rows, cka[-1]) if cka else None,
                 wcos=_last(rows, "wcos/__all__"), wnorm=_last(rows, "wnorm/__all__"),
                 exact_frac=_mean_key(rows, "exact_frac"), time_s=_last(rows, "time_s"),
                 run=run["name"])
        r["method"], r["rows"] = _method(r), rows
        table.append(r)
    return table


def write_laziness_csv(out: Path, table: list[dict]) -> Path:
    """``OUT/laziness.csv``: one row per run, columns :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(table, key=lambda r: (r["method"], r["width"], r["init"], r["lr"],
                                          r["seed"])):
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    path = Path(out) / "laziness.csv"
    atomic_write_text(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------- grouping
def _groups(table: list[dict], axis: str | None = None) -> dict[tuple, list[dict]]:
    """``{(method, width, init, lr): [run summaries over seeds]}`` (runs of ``axis`` only)."""
    g: dict[tuple, list[dict]] = {}
    for r in table:
        if axis is None or axis in r["axes"].split("+"):
            g.setdefault((r["method"], r["width"], r["init"], r["lr"]), []).append(r)
    return g


def _methods(keys) -> list[str]:
    present = {k[0] for k in keys}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _ms(runs: list[dict], key: str) -> tuple[float, float, int]:
    return mean_std(r.get(key) for r in runs)


def _base(table: list[dict]) -> dict:
    """The base width / init of the sweep: what the width axis holds fixed and the init axis
    varies around (read from the runs that belong to every axis)."""
    inits = {r["init"] for r in table if "width" in r["axes"]}
    widths = {r["width"] for r in table if "init" in r["axes"] or "alpha" in r["axes"]}
    gn_lr = {r["lr"] for r in table if "width" in r["axes"] and r["optimizer"] == "exact_gn"}
    return dict(init=next(iter(inits)) if len(inits) == 1 else None,
                width=next(iter(widths)) if len(widths) == 1 else None,
                alpha=next(iter(gn_lr)) if len(gn_lr) == 1 else None)


# ----------------------------------------------------------------------------- figures
