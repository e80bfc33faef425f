"""The TFDS ``mnist`` dataset AlgoPerf's MNIST workload reads, prepared from MNIST's IDX files
(``gnrev algoperf data DIR``); nothing is downloaded. The TFDS writing itself is
:func:`gnrev_plugin.compat.algoperf.write_tfds_mnist`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gnrev_plugin.data import default_data_dir, find_idx_files, read_idx

__all__ = ["STANDIN_LAYOUT", "build_mnist_tfds"]

#: The stand-in layout of :func:`build_mnist_tfds` when only MNIST's 10,000-image test pair is
#: there: (first, last) image of the pair for AlgoPerf's training part of ``train``
#: (``train[:50000]``, cycled), its validation part (``train[50000:]``, repeated) and ``test``.
STANDIN_LAYOUT = {"train": (0, 8000), "validation": (8000, 9000), "test": (9000, 10000)}
_ALGOPERF_MNIST = {"train": 50_000, "validation": 10_000, "test": 10_000}  # workload.py sizes


def build_mnist_tfds(data_dir: str | Path, idx_dir: str | Path | None = None) -> dict:
    """Prepare the TFDS dataset ``mnist`` that AlgoPerf's MNIST workload reads with
    ``--data_dir=data_dir``, from MNIST's IDX files; nothing is downloaded.

    AlgoPerf takes ``train[:50000]`` for training, ``train[50000:]`` for validation and ``test``
    (10,000 each evaluated). With both IDX pairs (``train-*`` and ``t10k-*``) the dataset is
    MNIST itself: AlgoPerf's protocol. With only the test pair (10,000 images, as on this
    project's machines), a stand-in of the same sizes (:data:`STANDIN_LAYOUT`): images 0–7,999
    cycled to 50,000 for training, 8,000–8,999 ten times for validation, 9,000–9,999 ten times
    for test; the three parts share no image, and a repeated evaluation split scores exactly
    like its 1,000 images.

    Args:
        data_dir: the folder to pass as AlgoPerf's ``--data_dir`` (``mnist/3.0.1/`` is written).
        idx_dir: the IDX folder (default :func:`gnrev_plugin.data.default_data_dir`).

    Returns:
        ``{"source", "layout", "splits"}``: the IDX folder, ``"mnist"`` or ``"standin"``, and
        the size of each TFDS split; also written to ``data_dir/gnrev_mnist_layout.json``.

    Raises:
        FileNotFoundError: no IDX files (the message names the expected ones).
        FileExistsError: ``data_dir`` already holds a prepared ``mnist``.
    """
    from gnrev_plugin.compat.algoperf import write_tfds_mnist  # noqa: PLC0415 (TF is heavy)

    idx_dir = Path(idx_dir) if idx_dir is not None else default_data_dir()
    pairs = find_idx_files(idx_dir)
    if (Path(data_dir) / "mnist").exists():
        raise FileExistsError(f"{data_dir} already holds a prepared mnist dataset")
    read = {k: (read_idx(images), read_idx(labels).astype(np.int64))
            for k, (images, labels) in pairs.items()}
    if "train" in read and "t10k" in read:
        layout, splits = "mnist", {"train": read["train"], "test": read["t10k"]}
    else:
        (x, y), = read.values()
        if len(y) < STANDIN_LAYOUT["test"][1]:
            raise ValueError(f"the stand-in layout needs {STANDIN_LAYOUT['test'][1]} images, "
                             f"{idx_dir} has {len(y)}")
        part = {k: np.arange(*bounds) for k, bounds in STANDIN_LAYOUT.items()}
        order = {k: np.resize(v, _ALGOPERF_MNIST[k]) for k, v in part.items()}
        train = np.concatenate([order["train"], order["validation"]])
        layout = "standin"
        splits = {"train": (x[train], y[train]), "test": (x[order["test"]], y[order["test"]])}
    write_tfds_mnist(data_dir, splits)
    report = {"source": str(idx_dir), "layout": layout,
              "splits": {k: int(len(v[1])) for k, v in splits.items()}}
    (Path(data_dir) / "gnrev_mnist_layout.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
