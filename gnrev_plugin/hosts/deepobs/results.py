"""DeepOBS's result format: folder names and JSON files (written by the runners), and their reader.

One JSON file per run::

    <output_dir>/<testproblem>/<optimizer name>/
        num_epochs__<E>__batch_size__<B>[__weight_decay__<wd>]__<hp>__<value>.../
            random_seed__<seed>__<YYYY-mm-dd-HH-MM-SS>.json

with keys :data:`RESULT_KEYS`; the per-epoch lists hold ``num_epochs + 1`` values (evaluation
before each epoch and after the last). The optimizer name of a registered optimizer is its
registry name (``gnrev.dense_gn``, ``toy.sign_sgd``), and ``optimizer_hyperparams`` holds every
option the runner passed, registry defaults included (``rank_policy`` of the GN optimizers).
DeepOBS's own runner writes exactly this (checked by the test suite); ``deepobs.analyzer`` and the
published DeepOBS baselines read it.

:func:`read_deepobs` turns such files into :class:`gnrev_plugin.results.Curve` objects for the
leaderboard.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gnrev_plugin.results import Curve, Point, finite_or_none

__all__ = ["RESULT_KEYS", "float2str", "run_folder_name", "result_path", "write_result",
           "read_deepobs", "deepobs_optimizer_label"]

#: Keys of a DeepOBS result JSON for a classification problem, in DeepOBS's order (problems
#: without accuracies, such as ``quadratic_deep``, omit the three ``*_accuracies``).
RESULT_KEYS = (
    "testproblem", "batch_size", "num_epochs", "random_seed", "weight_decay", "optimizer_name",
    "optimizer_hyperparams", "training_params", "train_losses", "valid_losses", "test_losses",
    "minibatch_train_losses", "train_accuracies", "valid_accuracies", "test_accuracies",
)


def float2str(x: float) -> str:
    """DeepOBS's float format in folder names: 10-digit scientific, trailing zeros of the
    mantissa stripped (``0.01 → "1.e-02"``, ``0.125 → "1.25e-01"``)."""
    mantissa, exponent = f"{x:.10e}".split("e")
    return mantissa.rstrip("0") + "e" + exponent


def _fmt(v) -> str:
    return float2str(v) if isinstance(v, float) else str(v)


def run_folder_name(num_epochs: int, batch_size: int, weight_decay: float | None,
                    hyperparams: dict, training_params: dict | None = None) -> str:
    """``num_epochs__E__batch_size__B[__weight_decay__wd]`` then ``__name__value`` for each
    hyperparameter and each non-``None`` training parameter, both sorted by name."""
    name = f"num_epochs__{num_epochs}__batch_size__{batch_size}"
    if weight_decay is not None:
        name += f"__weight_decay__{float2str(weight_decay)}"
    for k, v in sorted(hyperparams.items()):
        name += f"__{k}__{_fmt(v)}"
    for k, v in sorted((training_params or {}).items()):
        if v is not None:
            name += f"__{k}__{_fmt(v)}"
    return name


def result_path(output_dir: str | Path, output: dict, stamp: str | None = None) -> Path:
    """Where DeepOBS files ``output`` (a result dict): ``stamp`` defaults to now."""
    folder = Path(output_dir) / output["testproblem"] / output["optimizer_name"] / \
        run_folder_name(output["num_epochs"], output["batch_size"], output["weight_decay"],
                        output["optimizer_hyperparams"], output.get("training_params"))
    stamp = stamp or time.strftime("%Y-%m-%d-%H-%M-%S")
    return folder / f"random_seed__{output['random_seed']}__{stamp}.json"


def write_result(output_dir: str | Path, output: dict) -> Path:
    """Write ``output`` as DeepOBS does (indented JSON at :func:`result_path`); returns the path."""
    path = result_path(output_dir, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(output, fh, indent=4)
    return path


# ---------------------------------------------------------------------------------- reader
def deepobs_optimizer_label(data: dict) -> str:
    """``optimizer_name[k=v,...]`` over the sorted ``optimizer_hyperparams`` (floats as ``%g``),
    the optimizer column of the leaderboard."""
    hps = data.get("optimizer_hyperparams") or {}
    inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(hps.items()))
    return f"{data['optimizer_name']}[{inner}]" if inner else str(data["optimizer_name"])


def _curve(path: Path) -> Curve | None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not {"testproblem", "optimizer_name",
                                          "train_losses"} <= set(data):
        return None
    train = data.get("train_losses") or []
    test = data.get("test_losses") or [None] * len(train)
    acc = data.get("test_accuracies") or [None] * len(train)
    problem = f"{data['testproblem']} (bs={data.get('batch_size')})"
    curve = Curve("deepobs", problem, deepobs_optimizer_label(data), str(data.get("random_seed")))
    for epoch, (tr, te, ac) in enumerate(zip(train, test, acc, strict=False)):
        curve.points.append(Point(epoch=epoch, train_loss=finite_or_none(tr),
                                  test_loss=finite_or_none(te), test_acc=finite_or_none(ac)))
    return curve


def read_deepobs(folder: str | Path) -> list[Curve]:
    """Curves of every DeepOBS result JSON under ``folder`` (or of one JSON file); JSON files
    without DeepOBS's keys are ignored. No wall time is recorded by DeepOBS."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.json"))
    return [c for c in map(_curve, files) if c is not None]
