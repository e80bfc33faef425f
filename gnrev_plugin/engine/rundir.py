"""Run directories: ``config.json``, append-only JSONL logs, atomic result files and checkpoints.

Nothing is lost on a crash:

* result files are written to a temporary file in the same directory, flushed, ``fsync``-ed and
  moved into place with :func:`os.replace` (atomic on POSIX), so a reader sees the old or the new
  file, never half of one;
* log rows are appended one JSON object per line and flushed at once; a torn last line (a crash
  in the middle of a write) is ignored by :func:`read_jsonl`;
* checkpoints are written atomically too, after the log row of the same epoch, and
  :meth:`RunDir.truncate_log` drops log rows newer than the checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_jsonl",
           "read_jsonl", "RunDir", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Convert tensors / numpy scalars / paths to JSON types; non-finite floats become None.

    Args:
        obj: a value, or dicts/lists/tuples of values.

    Returns:
        The same structure in JSON types.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    Args:
        path: the file (its folder is created).
        data: the bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8.

    Args:
        path: the file.
        text: the text.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with sorted keys (:func:`to_jsonable`).

    Args:
        path: the file.
        obj: the value.
    """
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON row (sorted keys) and flush it to disk.

    Args:
        path: the JSONL file (created with its folder).
        row: the row (:func:`to_jsonable`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(to_jsonable(row), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete rows of a JSONL file.

    Args:
        path: the JSONL file.

    Returns:
        The rows (``[]`` if the file does not exist; a torn last line is skipped).
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunDir:
    """One run's directory: ``config.json``, ``log.jsonl``, ``checkpoint.pt``, ``result.json``.

    ``result.json`` exists only when the run finished; ``error.txt`` when it crashed.
    """

    CONFIG, LOG, CHECKPOINT, RESULT, ERROR = ("config.json", "log.jsonl", "checkpoint.pt",
                                              "result.json", "error.txt")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # config ------------------------------------------------------------------------------
    def write_config(self, config: dict, resume: bool) -> None:
        """Write ``config.json``; on resume, refuse a config that differs from the stored one."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg = to_jsonable(config)
        old = self.read_config()
        if resume and old is not None and old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise ValueError(f"cannot resume {self.path}: its config.json differs in {diff}; "
                             "use a new --out directory or the same options")
        atomic_write_json(self.file(self.CONFIG), cfg)

    def read_config(self) -> dict | None:
        p = self.file(self.CONFIG)
        return json.loads(p.read_text()) if p.exists() else None

    # logs --------------------------------------------------------------------------------
    def log(self, row: dict, name: str | None = None) -> None:
        append_jsonl(self.file(name or self.LOG), row)

    def rows(self, name: str | None = None) -> list[dict]:
        return read_jsonl(self.file(name or self.LOG))

    def truncate_log(self, keep: Iterable[dict], name: str | None = None) -> None:
        """Atomically replace the log with ``keep`` (used on resume)."""
        text = "".join(json.dumps(to_jsonable(r), sort_keys=True) + "\n" for r in keep)
        atomic_write_text(self.file(name or self.LOG), text)

    # checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.file(self.CHECKPOINT), buf.getvalue())

    def load_checkpoint(self) -> dict | None:
        p = self.file(self.CHECKPOINT)
        if not p.exists():
            return None
        return torch.load(p, map_location="cpu", weights_only=True)

    # results -----------------------------------------------------------------------------
    def write_result(self, result: dict) -> None:
        atomic_write_json(self.file(self.RESULT), result)
        err = self.file(self.ERROR)
        if err.exists():
            err.unlink()

    def read_result(self) -> dict | None:
        p = self.file(self.RESULT)
        return json.loads(p.read_text()) if p.exists() else None

    @property
    def done(self) -> bool:
        return self.file(self.RESULT).exists()

    def write_error(self, text: str) -> None:
        atomic_write_text(self.file(self.ERROR), text)

    def reset(self) -> None:
        """Remove the files of a previous (non-resumed) run in this directory."""
        for name in (self.LOG, self.CHECKPOINT, self.RESULT, self.ERROR):
            p = self.file(name)
            if p.exists():
                p.unlink()


# ---------------------------------------------------------------------------------- reader
def _bracket(name: str, kwargs: dict) -> str:
    inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(kwargs.items()))
    return f"{name}[{inner}]" if inner else name


def read_runs(folder: str | Path) -> list:
    """Curves (:class:`gnrev_plugin.results.Curve`) of every run directory under ``folder``
    written by :func:`~gnrev_plugin.engine.runner.train_run` (``config.json`` holding the
    resolved run spec, ``log.jsonl``). The optimizer is named by its registry name with its
    options, ``gnrev.exact_gn[lr=0.2,rank_policy=warn]``, like benchopt's solver names; the
    problem by the dataset, the model and the batch size (and the reproduction's setting).

    Args:
        folder: searched recursively for ``log.jsonl`` files.

    Returns:
        One curve per run directory with a training log.
    """
    from gnrev_plugin.results import Curve, Point, finite_or_none

    folder = Path(folder)
    curves = []
    for log in sorted(folder.rglob(RunDir.LOG)) if folder.is_dir() else []:
        run = RunDir(log.parent)
        cfg, rows = run.read_config() or {}, run.rows()
        spec = cfg.get("spec")
        if not spec or not rows or "train_loss" not in rows[0]:
            continue
        problem = f"{spec['dataset']}"
        if cfg.get("setting"):
            problem += f" {cfg['setting']}"
        problem += f" ({_bracket(spec['model'], spec['model_kwargs'])}, bs={spec['batch_size']})"
        curve = Curve("gnrev", problem, _bracket(spec["optimizer"], spec["optimizer_kwargs"]),
                      str(spec["seed"]))
        for r in rows:
            curve.points.append(Point(
                epoch=finite_or_none(r.get("epoch")), steps=finite_or_none(r.get("steps")),
                time=finite_or_none(r.get("time_s")),
                train_loss=finite_or_none(r.get("train_loss")),
                test_loss=finite_or_none(r.get("test_loss")),
                test_acc=finite_or_none(r.get("test_acc"))))
        curves.append(curve)
    return curves
