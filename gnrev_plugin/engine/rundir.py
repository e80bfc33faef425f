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
           "read_jsonl", "read_json", "load_tensor_file", "RunDir", "RunFileError",
           "config_diff", "to_jsonable"]


class RunFileError(ValueError):
    """A run directory's file is corrupt, truncated, foreign or unsafe to load; the message
    names the file and the remedy."""


def read_json(path: str | Path) -> Any:
    """One JSON file of a run directory, read safely (JSON never executes code).

    Args:
        path: the file.

    Returns:
        Its value.

    Raises:
        RunFileError: the file is not valid UTF-8 JSON (truncated, corrupt or not JSON).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path} is not a valid JSON file ({err}); it is truncated, corrupt "
                           "or not written by gnrev: restore it, or start the run again in a new "
                           "--out directory (or with --overwrite)") from None


def load_tensor_file(path: str | Path, required: Iterable[str] = ()) -> dict:
    """A checkpoint (``torch.save`` of a dict), loaded with ``weights_only=True``: only
    tensors and plain containers are unpickled, a pickle that would run code (``__reduce__``
    of ``os.system``, ...) is refused before it runs.

    Args:
        path: the file.
        required: keys the dict must hold.

    Returns:
        The dict, its tensors on the CPU.

    Raises:
        RunFileError: the file is truncated, corrupt, not a ``torch.save`` file, holds objects
            other than tensors and containers, is not a dict, or misses a required key.
    """
    path = Path(path)
    remedy = ("delete it to restart the run from epoch 0 (or use a new --out directory); never "
              "load a checkpoint from an untrusted source with weights_only=False")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every load failure is a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFileError(f"cannot load the checkpoint {path}: it is truncated, corrupt, not a "
                           f"torch.save file or holds objects other than tensors "
                           f"({type(err).__name__}: {first}); {remedy}") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"the checkpoint {path} holds a {type(obj).__name__}, not a gnrev "
                           f"checkpoint dict; {remedy}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise RunFileError(f"the checkpoint {path} lacks the entries {missing} (it holds "
                           f"{sorted(map(str, obj))}): it was not written by this version of "
                           f"gnrev; {remedy}")
    return obj


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The fields in which two configs differ, as ``"a.b: <old> -> <new>"`` lines.

    Args:
        old: the stored config.
        new: the requested config.
        prefix: the dotted path of ``old`` / ``new`` (for recursion).

    Returns:
        One line per differing leaf field, sorted by path.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out.extend(config_diff(old[k], new[k], key))
        return out
    return [] if old == new else [f"{prefix or '(config)'}: {old!r} -> {new!r}"]


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
            diff = "; ".join(config_diff(old, cfg))
            raise ValueError(f"cannot resume {self.path}: its config.json differs (stored -> "
                             f"requested) in {diff}; use a new --out directory or the same "
                             "options")
        atomic_write_json(self.file(self.CONFIG), cfg)

    def read_config(self) -> dict | None:
        p = self.file(self.CONFIG)
        return read_json(p) if p.exists() else None

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
    def save_checkpoint(self, state: dict, keep_as: str | None = None) -> None:
        """Write ``checkpoint.pt`` (atomically, replacing the previous one); ``keep_as``: also
        write the same bytes to that file name (a kept checkpoint, :meth:`epoch_checkpoint`)."""
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.file(self.CHECKPOINT), buf.getvalue())
        if keep_as is not None:
            atomic_write_bytes(self.file(keep_as), buf.getvalue())

    @staticmethod
    def epoch_checkpoint(epoch: int) -> str:
        """The file name of the kept checkpoint of ``epoch``: ``checkpoint-epoch0012.pt``."""
        return f"checkpoint-epoch{epoch:04d}.pt"

    def kept_checkpoints(self) -> list[Path]:
        """The kept per-epoch checkpoints, oldest first."""
        return sorted(self.path.glob("checkpoint-epoch*.pt"))

    def load_checkpoint(self, required: Iterable[str] = ()) -> dict | None:
        """The checkpoint (:func:`load_tensor_file`: ``weights_only=True``, clear errors), or
        ``None`` when there is none."""
        p = self.file(self.CHECKPOINT)
        if not p.exists():
            return None
        return load_tensor_file(p, required)

    # results -----------------------------------------------------------------------------
    def write_result(self, result: dict) -> None:
        atomic_write_json(self.file(self.RESULT), result)
        err = self.file(self.ERROR)
        if err.exists():
            err.unlink()

    def read_result(self) -> dict | None:
        p = self.file(self.RESULT)
        return read_json(p) if p.exists() else None

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
        for p in self.kept_checkpoints():
            p.unlink()


# ---------------------------------------------------------------------------------- reader
def _bracket(name: str, kwargs: dict) -> str:
    inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(kwargs.items()))
    return f"{name}[{inner}]" if inner else name


#: Dataset options that say where the data lives, not which data: left out of the problem key.
_LOCATION_KEYS = frozenset({"data_dir", "root", "path", "cache_dir"})


def read_runs(folder: str | Path) -> list:
    """Curves (:class:`gnrev_plugin.results.Curve`) of every run directory under ``folder``
    written by :func:`~gnrev_plugin.engine.runner.train_run` (``config.json`` holding the
    resolved run spec, ``log.jsonl``). The optimizer is named by its registry name with its
    options, ``gnrev.exact_gn[lr=0.2,rank_policy=warn]``, like benchopt's solver names; the
    problem by the dataset with its options (``gnrev.mnist[train_size=2048]``: runs on 2,048 and
    8,000 images never share a row or a target; the data's location is left out), the model and
    the batch size (and the reproduction's setting).

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
        # the dataset's options (train_size, ...) define the problem; where the files live does not
        data_kwargs = {k: v for k, v in (spec.get("dataset_kwargs") or {}).items()
                       if k not in _LOCATION_KEYS and v is not None}
        problem = _bracket(spec["dataset"], data_kwargs)
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
