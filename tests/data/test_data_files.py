"""IDX/gzip files are validated (issue 22): sizes against the header, images against labels,
labels against the declared classes, the official MNIST checksums (a mismatch warns), and a
truncated ``.gz`` is a :class:`DataError` naming the file and the remedy."""

from __future__ import annotations

import gzip
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin import data
from gnrev_plugin.data import DataError, DataWarning


def write_idx(path: Path, arr: np.ndarray, gz: bool = True, extra: bytes = b"") -> Path:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", s) for s in arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.astype(np.uint8).tobytes() + extra)
    return path


def pair(tmp: Path, n_images: int, labels: np.ndarray, hw=(2, 2)) -> Path:
    write_idx(tmp / "t10k-images-idx3-ubyte.gz", np.zeros((n_images, *hw), np.uint8))
    write_idx(tmp / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp


def test_truncated_gzip_names_the_file_and_the_remedy(tmp_path):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((50, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is a truncated or corrupt "
                                        r"gzip file.*gzip -t"):
        data.read_idx(path)


def test_data_bytes_must_match_the_header(tmp_path):
    long = write_idx(tmp_path / "long.gz", np.zeros((3, 2), np.uint8), extra=b"\x00" * 5)
    with pytest.raises(DataError, match=r"long.gz is too long: header says \(3, 2\)"):
        data.read_idx(long)
    head_only = tmp_path / "head.idx"
    head_only.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="head.idx is truncated: its header declares 3 dim"):
        data.read_idx(head_only)


def test_images_and_labels_must_agree(tmp_path):
    pair(tmp_path, 12, np.arange(10) % 10)
    with pytest.raises(DataError, match="has 12 images but t10k-labels-idx1-ubyte.gz has 10"):
        data.load_idx_dataset(tmp_path)


def test_a_label_outside_the_declared_classes_is_an_error(tmp_path):
    labels = np.arange(20) % 10
    labels[7] = 200
    pair(tmp_path, 20, labels)
    with pytest.raises(DataError, match=r"labels in \[0, 200\], outside \[0, 10\).*num_classes"):
        data.load_idx_dataset(tmp_path)
    ds = data.load_idx_dataset(tmp_path, num_classes=201)   # declared: accepted
    assert ds.num_classes == 201


def test_declared_classes_not_inferred_from_a_subset(tmp_path):
    pair(tmp_path, 20, np.arange(20) % 5)
    assert data.load_idx_dataset(tmp_path).num_classes == 10
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        data.load_idx_dataset(tmp_path, num_classes="ten")


@needs_real_mnist
def test_official_mnist_checksums_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = data.load_idx_dataset(REAL_MNIST)
    assert ds.num_classes == 10 and len(ds.y_train) == 8000


@needs_real_mnist
def test_checksum_mismatch_warns_naming_the_file(tmp_path):
    src = REAL_MNIST
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / name, tmp_path / name)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[-1] ^= 0xFF                                              # one pixel changed
    images.write_bytes(gzip.compress(bytes(raw)))
    with pytest.warns(DataWarning, match=r"t10k-images-idx3-ubyte.gz: MD5 .* differs from the "
                                         r"official file's 2646ac647ad5339dbf082846283269ea"):
        ds = data.load_idx_dataset(tmp_path)
    assert len(ds.y_test) == 2000                                # a warning, not an error
    with warnings.catch_warnings():                              # other datasets: not checked
        warnings.simplefilter("error", DataWarning)
        data.load_idx_dataset(tmp_path, name="fashion-mnist")
