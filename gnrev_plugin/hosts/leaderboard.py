"""Leaderboard tables from benchmark results: benchopt, DeepOBS and gnrev run logs.

It lives among the host adapters because it reads through their result readers, each of which
sits beside its writer (and the engine's reader of gnrev run directories beside the engine's run
directories); nothing below the hosts layer may import the host readers.

Every source is read into :class:`~gnrev_plugin.results.Curve` objects (one training run, one
seed, of one optimizer configuration on one problem) by the reader that lives next to the
format's writer:

* **benchopt** result files (``.parquet`` or ``.csv``):
  :func:`gnrev_plugin.hosts.benchopt.results.read_benchopt`;
* **DeepOBS** result folders (``<testproblem>/<optimizer>/<settings>/random_seed__*.json``): the
  DeepOBS host's ``read_deepobs``;
* **gnrev** run directories (``gnrev train`` / ``gnrev reproduce``):
  :func:`gnrev_plugin.engine.rundir.read_runs`.

Optimizers are named by their registry names (``gnrev.exact_gn[lr=0.2,...]``, a plugin's
``toy.sign_sgd[lr=0.001]``) in benchopt and gnrev results alike.

:func:`summarize` groups curves by ``(problem, optimizer)`` and averages over seeds:

* ``best_test_acc`` = mean over runs of ``max_t acc_test(t)``; ``best_test_loss`` = mean of
  ``min_t ℓ_test(t)``; ``final_train_loss`` = mean of the last ``ℓ_train``;
* with a target loss ``ℓ*``, ``t* = min{t : ℓ_train(t) ≤ ℓ*}`` per run, reported as the mean
  time, epochs and steps at ``t*`` over the runs that reach it (``reached`` counts them).
  Without ``ℓ*`` each problem gets its own target ``max_runs min_t ℓ_train(t)``, the best loss
  that every run of that problem reaches, over the runs that improve on their initial loss (a
  diverged run would make the target trivial).

:func:`merge_into_table` adds rows to an existing leaderboard (CSV or Markdown pipe table) while
leaving its columns, its rows and the rest of the file byte-for-byte untouched: new lines are
appended to the table, values are placed under the table's own columns (matched by name, or by
explicit ``COLUMN=metric`` mappings), and columns without a matching metric stay empty.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from tabulate import tabulate

from gnrev_plugin.engine.rundir import read_runs
from gnrev_plugin.hosts.benchopt.results import read_benchopt
from gnrev_plugin.hosts.deepobs.results import read_deepobs  # re-exported; reader beside writer
from gnrev_plugin.registry import Registry, get_registry
from gnrev_plugin.results import Curve, Point, finite_or_none

__all__ = [
    "Curve", "Point", "METRICS", "read_benchopt", "read_deepobs", "read_runs",
    "load_results", "summarize", "format_markdown", "format_csv", "merge_into_table",
    "is_gn_optimizer",
]

#: Columns of :func:`summarize`, in order.
METRICS = ("problem", "optimizer", "runs", "best_test_acc", "best_test_loss", "final_train_loss",
           "target_loss", "reached", "time_to_target_s", "epochs_to_target", "steps_to_target")


_num = finite_or_none


def load_results(paths: Iterable[str | Path]) -> list[Curve]:
    """Read every source: benchopt ``.parquet`` / ``.csv`` files, and folders holding DeepOBS
    JSON results and/or gnrev run directories (searched recursively)."""
    curves: list[Curve] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such result file or folder: {p}")
        if p.is_file():
            if p.suffix in (".parquet", ".csv"):
                curves += read_benchopt(p)
            elif p.suffix == ".json":
                found = read_deepobs(p)
                if not found:
                    raise ValueError(f"{p} is not a DeepOBS result JSON")
                curves += found
            else:
                raise ValueError(f"{p}: expected a benchopt .parquet/.csv file or a folder")
            continue
        found = read_runs(p) + read_deepobs(p)
        found += [c for f in sorted(p.rglob("*.parquet")) for c in read_benchopt(f)]
        if not found:
            raise ValueError(f"{p} holds no benchopt, DeepOBS or gnrev results")
        curves += found
    return curves


# ---------------------------------------------------------------------------------- summary
def is_gn_optimizer(name: str, registry: Registry | None = None) -> bool:
    """Whether a result's optimizer is a Gauss-Newton method, read from the registry's tags.

    The result name (``ExactGN[lr=0.2]``, ``exact_gn``, ``gnrev.dense_gn``, ``DenseGN``) is
    matched, parameters in brackets dropped and compared case- and punctuation-blind, to a
    registered optimizer's name, its name without ``gnrev.``, or its factory's class name; the
    optimizer is Gauss-Newton when that entry declares the ``"gauss_newton"`` tag. A name equal
    to the tag itself (``gauss-newton``) also counts.

    Args:
        name: the optimizer name a result file records.
        registry: the registry to read (default: the installed plugins').

    Returns:
        ``True`` for a Gauss-Newton optimizer, ``False`` for any other or an unknown name.
    """
    reg = registry if registry is not None else get_registry()
    key = _norm(name.split("[", 1)[0])
    if key == _norm("gauss_newton"):
        return True
    for e in reg.list("optimizer"):
        aliases = (e.name, e.name.removeprefix("gnrev."), e.target.rsplit(":", 1)[-1].split("(")[0])
        if key in {_norm(a) for a in aliases}:
            return "gauss_newton" in e.tags
    return False


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _reach(curve: Curve, target: float) -> Point | None:
    for p in curve.points:
        if p.train_loss is not None and p.train_loss <= target:
            return p
    return None


def _default_target(curves: Sequence[Curve]) -> float | None:
    """``max_runs min_t ℓ_train(t)`` over the runs that improve on their initial loss."""
    mins = []
    for c in curves:
        losses = [p.train_loss for p in c.points if p.train_loss is not None]
        if len(losses) > 1 and min(losses[1:]) < losses[0]:
            mins.append(min(losses))
    return max(mins) if mins else None


def summarize(curves: Sequence[Curve], target_loss: float | None = None) -> list[dict]:
    """One row per ``(problem, optimizer)`` with the columns of :data:`METRICS` (module
    docstring for the definitions); rows sorted by problem then best test accuracy."""
    if not curves:
        return []
    groups: dict[tuple, list[Curve]] = defaultdict(list)
    for c in curves:
        groups[(c.problem, c.optimizer)].append(c)
    targets = {}
    for problem in {c.problem for c in curves}:
        targets[problem] = target_loss if target_loss is not None else _default_target(
            [c for c in curves if c.problem == problem])
    rows = []
    for (problem, optimizer), runs in groups.items():
        best_acc = [max((p.test_acc for p in c.points if p.test_acc is not None), default=None)
                    for c in runs]
        best_loss = [min((p.test_loss for p in c.points if p.test_loss is not None),
                         default=None) for c in runs]
        final = [next((p.train_loss for p in reversed(c.points) if p.train_loss is not None),
                      None) for c in runs]
        target = targets[problem]
        hits = [h for h in (_reach(c, target) for c in runs)
                if h is not None] if target is not None else []
        rows.append(dict(
            problem=problem, optimizer=optimizer, runs=len(runs),
            best_test_acc=_mean(best_acc), best_test_loss=_mean(best_loss),
            final_train_loss=_mean(final), target_loss=target,
            reached=f"{len(hits)}/{len(runs)}",
            time_to_target_s=_mean([h.time for h in hits]),
            epochs_to_target=_mean([h.epoch for h in hits]),
            steps_to_target=_mean([h.steps for h in hits]),
        ))
    rows.sort(key=lambda r: (r["problem"], -(r["best_test_acc"] or -1.0),
                             r["final_train_loss"] if r["final_train_loss"] is not None
                             else math.inf))
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_markdown(rows: Sequence[dict], columns: Sequence[str] = METRICS) -> str:
    """A GitHub-flavoured Markdown table (tabulate)."""
    return tabulate([[_fmt(r.get(c)) for c in columns] for r in rows], headers=list(columns),
                    tablefmt="github", disable_numparse=True)


def format_csv(rows: Sequence[dict], columns: Sequence[str] = METRICS) -> str:
    """CSV text with full-precision numbers (empty cells for missing values)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


# ---------------------------------------------------------------------------------- merging
_SYNONYMS = {
    "optimizer": ("optimizer", "method", "solver", "submission", "algorithm", "name", "model"),
    "problem": ("problem", "testproblem", "dataset", "benchmark", "task", "workload"),
    "best_test_acc": ("besttestacc", "besttestaccuracy", "testacc", "testaccuracy", "accuracy",
                      "acc", "top1", "top1accuracy"),
    "best_test_loss": ("besttestloss", "testloss"),
    "final_train_loss": ("finaltrainloss", "trainloss", "trainingloss", "loss"),
    "time_to_target_s": ("timetotargets", "timetotarget", "time", "times", "wallclock",
                         "wallclocktime"),
    "epochs_to_target": ("epochstotarget", "epochs"),
    "steps_to_target": ("stepstotarget", "steps"),
    "runs": ("runs", "seeds", "nruns"),
    "reached": ("reached",),
    "target_loss": ("targetloss", "target"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _column_map(columns: Sequence[str], explicit: dict[str, str]) -> dict[str, str]:
    """Table column → metric name."""
    unknown = {m for m in explicit.values() if m not in METRICS}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} in --map; known: "
                         f"{', '.join(METRICS)}")
    missing = [c for c in explicit if c not in columns]
    if missing:
        raise ValueError(f"--map names columns {missing} that the table does not have; its "
                         f"columns: {list(columns)}")
    mapping = dict(explicit)
    taken = set(mapping.values())
    for metric, names in _SYNONYMS.items():
        if metric in taken:
            continue
        for syn in names:
            hit = next((c for c in columns if c not in mapping and _norm(c) == syn), None)
            if hit is not None:
                mapping[hit] = metric
                taken.add(metric)
                break
    if "optimizer" not in taken and columns and columns[0] not in mapping:
        mapping[columns[0]] = "optimizer"  # the first column names the entry
    return mapping


def _looks_percent(cells: Iterable[str]) -> bool:
    vals = [_num(re.sub(r"[%\s]", "", c)) for c in cells]
    vals = [v for v in vals if v is not None]
    return bool(vals) and max(vals) > 1.0


def _cell(row: dict, metric: str, percent: bool) -> str:
    v = row.get(metric)
    if v is not None and percent and metric == "best_test_acc":
        v = 100.0 * v
    return _fmt(v)


def _split_md_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def _find_md_table(lines: list[str]) -> tuple[int, int]:
    """``(header index, index after the last row)`` of the first Markdown pipe table."""
    sep = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
    for i in range(len(lines) - 1):
        if "|" in lines[i] and sep.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and "|" in lines[end] and lines[end].strip():
                end += 1
            return i, end
    raise ValueError("no Markdown pipe table (header row + '---' separator) found")


def merge_into_table(table_path: str | Path, rows: Sequence[dict],
                     column_map: dict[str, str] | None = None,
                     percent: bool | None = None) -> str:
    """Return the text of ``table_path`` (``.csv`` or Markdown) with ``rows`` appended.

    The table's header, its existing rows and any text around a Markdown table are kept
    verbatim; each new row fills the table's columns mapped to a metric (``column_map``:
    column → metric, plus name matching) and leaves the others empty. ``percent`` (default: auto,
    if the accuracy column already holds values above 1) writes accuracies in percent.
    """
    path = Path(table_path)
    text = path.read_text()
    explicit = dict(column_map or {})
    if path.suffix.lower() == ".csv":
        reader = list(csv.reader(io.StringIO(text)))
        if not reader:
            raise ValueError(f"{path} is empty: no header row to merge into")
        header, body = reader[0], reader[1:]
        mapping = _column_map(header, explicit)
        acc_cols = [i for i, c in enumerate(header) if mapping.get(c) == "best_test_acc"]
        pct = percent if percent is not None else (
            bool(acc_cols) and _looks_percent(r[acc_cols[0]] for r in body if len(r) > acc_cols[0]))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n" if "\r\n" in text else "\n")
        for r in rows:
            w.writerow([_cell(r, mapping[c], pct) if c in mapping else "" for c in header])
        sep = "" if text.endswith(("\n", "\r")) or not text else "\n"
        return text + sep + buf.getvalue()
    lines = text.splitlines(keepends=True)
    start, end = _find_md_table([ln.rstrip("\r\n") for ln in lines])
    header = _split_md_row(lines[start])
    body = [_split_md_row(ln) for ln in lines[start + 2:end]]
    mapping = _column_map(header, explicit)
    acc_idx = [i for i, c in enumerate(header) if mapping.get(c) == "best_test_acc"]
    pct = percent if percent is not None else (
        bool(acc_idx) and _looks_percent(r[acc_idx[0]] for r in body if len(r) > acc_idx[0]))
    eol = "\r\n" if lines[start].endswith("\r\n") else "\n"
    new = []
    for r in rows:
        cells = [_cell(r, mapping[c], pct).replace("|", "\\|") if c in mapping else ""
                 for c in header]
        new.append("| " + " | ".join(cells) + " |" + eol)
    if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
        lines[end - 1] += eol
    return "".join(lines[:end] + new + lines[end:])
