"""Provenance of a run: what code, libraries, threads and device made its numbers.

:func:`train_run <gnrev_plugin.engine.runner.train_run>` appends one :func:`provenance` row to
the run directory's ``provenance.jsonl`` per session (a resumed run gets one row per session, so
a run continued under another commit says so), next to ``config.json``. It is a separate file
because ``config.json`` must stay equal on resume (it describes *what* is run; the provenance
describes *what ran it*).

A row holds:

* ``package`` / ``package_version``: ``gnrev_plugin.__version__``;
* ``git_commit``: ``git rev-parse HEAD`` of the checkout the package was imported from, with
  ``+dirty`` when tracked files differ from it, or ``"unknown"`` (an installed wheel, no git);
* ``torch``, ``numpy``, ``curvlinops``, ``python``: versions (``"not installed"`` if absent);
* ``threads`` (``torch.get_num_threads()``), ``interop_threads``, ``device`` (the run's),
  ``cuda`` (``torch.version.cuda``);
* ``deterministic``: ``torch.are_deterministic_algorithms_enabled()`` (see
  :func:`enable_determinism`).

No absolute path of the machine is recorded.

**Determinism.** :func:`enable_determinism` (``gnrev train|reproduce --deterministic``) calls
``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises), sets
``torch.backends.cudnn.deterministic = True``, ``benchmark = False`` and
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by cuBLAS on CUDA ≥ 10.2). Seeds are already fixed:
every run seeds torch's global RNG with its spec's ``seed`` and batches are shuffled by
``(seed, epoch)``. Caveats: the same numbers are guaranteed only for the same thread count,
library versions and hardware: a CPU reduction (matmul, sum) split over a different number of
threads, another BLAS build or another CPU's vector width adds in another order, so float32
results may differ in the last bits and drift over training; ``--threads 1`` is the most
portable setting.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .rundir import append_jsonl

__all__ = ["PROVENANCE_LOG", "provenance", "record_provenance", "git_commit", "enable_determinism"]

#: The file of a run directory holding one provenance row per session.
PROVENANCE_LOG = "provenance.jsonl"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the git checkout holding ``path`` (default: this package's source).

    Args:
        path: a file or directory inside the checkout.

    Returns:
        the 40-hex commit, with ``+dirty`` when tracked files differ from it; ``"unknown"`` when
        ``path`` is not in a git checkout or git is missing.
    """
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    here = here if here.is_dir() else here.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(device: str | torch.device = "cpu") -> dict:
    """One provenance row (see the module docstring).

    Args:
        device: the device the run trains on.

    Returns:
        a JSON-able dict of versions, git commit, threads, device and determinism.
    """
    import gnrev_plugin

    return dict(
        package="gnrev-plugin", package_version=gnrev_plugin.__version__,
        git_commit=git_commit(Path(gnrev_plugin.__file__).parent),
        torch=torch.__version__, numpy=_version("numpy"), curvlinops=_version("curvlinops-for-pytorch"),
        python=platform.python_version(), threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(), device=str(device),
        cuda=torch.version.cuda, deterministic=torch.are_deterministic_algorithms_enabled())


def record_provenance(run_dir: str | Path, device: str | torch.device, fresh: bool) -> dict:
    """Append this session's :func:`provenance` row to ``run_dir/provenance.jsonl``.

    Args:
        run_dir: the run directory.
        device: the device the run trains on.
        fresh: a new (not resumed) run: the rows of an earlier run in ``run_dir`` are dropped.

    Returns:
        the row written.
    """
    path = Path(run_dir) / PROVENANCE_LOG
    if fresh:
        path.unlink(missing_ok=True)
    row = provenance(device)
    append_jsonl(path, row)
    return row


def enable_determinism() -> None:
    """Ask torch for deterministic kernels (``--deterministic``; caveats in the module
    docstring).

    Returns:
        None. Afterwards ``torch.are_deterministic_algorithms_enabled()`` is ``True``.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
