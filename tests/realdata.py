"""Where the tests find real data: the MNIST test split in IDX format.

``GNREV_MNIST_DIR`` overrides the default ``<checkout parent>/shared/data/mnist`` (CI clones the
repository next to a copy of ``shared/``; elsewhere point the variable at any folder holding
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``). A test marked
``needs_real_mnist`` skips without the files, and under ``CI`` that skip is a failure
(``tests/conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MNIST_ENV = "GNREV_MNIST_DIR"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def mnist_dir() -> Path:
    """The real MNIST folder: ``$GNREV_MNIST_DIR`` or ``<checkout parent>/shared/data/mnist``."""
    override = os.environ.get(MNIST_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


REAL_MNIST = mnist_dir()
HAS_REAL_MNIST = all((REAL_MNIST / f).exists() for f in MNIST_FILES)
needs_real_mnist = pytest.mark.skipif(
    not HAS_REAL_MNIST,
    reason=f"the real MNIST test split is not at {REAL_MNIST} (set {MNIST_ENV})")
