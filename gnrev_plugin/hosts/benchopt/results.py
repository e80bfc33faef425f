"""Reader of benchopt result files (the ``.parquet``/``.csv`` that ``benchopt run`` writes).

One :class:`~gnrev_plugin.results.Curve` per ``(objective_name / dataset_name, solver_name,
idx_rep)``: ``stop_val`` is the epoch (the gnrev solvers sample once per epoch), ``time`` the
solver time; losses from ``objective_train_loss`` (else ``objective_value``),
``objective_test_loss`` and ``objective_test_accuracy``. Solver names are the registry names the
gnrev solvers carry (``gnrev.exact_gn[batch_size=128,lr=0.2,rank_policy=warn]``).
"""

from __future__ import annotations

from pathlib import Path

from gnrev_plugin.results import Curve, Point, finite_or_none

__all__ = ["read_benchopt"]


def read_benchopt(path: str | Path) -> list[Curve]:
    """Curves of a benchopt result file (``.parquet`` needs pandas + pyarrow; ``.csv`` pandas)."""
    path = Path(path)
    try:
        import pandas as pd  # noqa: PLC0415 - optional, comes with the benchopt extra
    except ImportError as err:
        raise ImportError("reading benchopt results needs pandas (pip install "
                          "'gnrev-plugin[benchopt]')") from err
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    required = {"solver_name", "dataset_name", "stop_val", "objective_value"}
    missing = required - set(df.columns)
    if missing:
        raise ValueError(f"{path} is not a benchopt result file (missing columns "
                         f"{sorted(missing)})")
    train_col = "objective_train_loss" if "objective_train_loss" in df else "objective_value"

    def col(row, name):
        return finite_or_none(row[name]) if name in row else None

    curves: dict[tuple, Curve] = {}
    for _, row in df.sort_values("stop_val").iterrows():
        problem = str(row["dataset_name"])
        if "objective_name" in row and row["objective_name"] is not None:
            problem = f"{row['objective_name']} / {problem}"
        seed = str(row.get("idx_rep", 0))
        key = (problem, str(row["solver_name"]), seed)
        curve = curves.setdefault(key, Curve("benchopt", problem, key[1], seed))
        curve.points.append(Point(epoch=finite_or_none(row["stop_val"]), steps=None,
                                  time=col(row, "time"), train_loss=col(row, train_col),
                                  test_loss=col(row, "objective_test_loss"),
                                  test_acc=col(row, "objective_test_accuracy")))
    return list(curves.values())
