"""What running AlgoPerf's own code beside gnrev-plugin needs that no host exports: the
TensorFlow-Datasets builder internals behind AlgoPerf's MNIST input pipeline
(:func:`write_tfds_mnist`, for :func:`gnrev_plugin.hosts.algoperf.build_mnist_tfds`) and the
start-up order of two native libraries (:func:`submission_runner_command`).

Checked against ``tensorflow-datasets`` 4.9.10, ``tensorflow-cpu`` 2.21.0 (2.20.0 too), torch
2.14.1 with its Triton, and AlgoPerf at commit 2c90454 (``submission_runner.py``,
``algoperf/workloads/mnist/workload.py``).

**Start-up order.** AlgoPerf's ``submission_runner.py`` imports TensorFlow before torch. A CUDA
build of torch brings Triton, which ``torch._dynamo`` imports (``torch.compile``, and every
``torch.optim.Optimizer.__init__``). Loading Triton's native library *after* TensorFlow's crashes
the process (segmentation fault in ``triton/knobs.py``, seen with TF 2.20 and 2.21); loading it
first does not. :func:`submission_runner_command` therefore starts AlgoPerf's unmodified
``submission_runner`` module through ``python -c`` after importing ``triton._C.libtriton``
(when Triton is installed), exactly as ``python -m submission_runner`` would run it otherwise.

AlgoPerf's MNIST workload (both frameworks) reads its data with
``tfds.load("mnist", split=..., data_dir=DATA_DIR)``: splits ``train[:50000]`` (training and
``eval_train``), ``train[50000:]`` (validation) and ``test``, each example
``{"image": uint8 (28, 28, 1), "label": int64}``. ``tfds.load`` reads a *prepared* dataset —
``DATA_DIR/mnist/3.0.1/`` with ``dataset_info.json``, ``features.json`` and TFRecord shards —
and downloads only when that folder is missing. :func:`write_tfds_mnist` writes that folder from
arrays already in memory, through TFDS' own MNIST builder (so the features, the version and the
file layout are TFDS', not a copy): a subclass that keeps the builder's name ``mnist`` and
replaces the builder-author hooks of ``GeneratorBasedBuilder`` (``_split_generators``, which
downloads, and ``_generate_examples``) by ones that yield the given arrays, each distinct image
PNG-encoded once by TFDS' own ``Image`` feature (repeated images are common in the stand-in
layout of :func:`gnrev_plugin.hosts.algoperf.build_mnist_tfds`). Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CHECKED_TFDS_VERSION = "4.9.10"
#: The commit of github.com/mlcommons/algorithmic-efficiency whose MNIST pipeline this targets.
CHECKED_ALGOPERF_COMMIT = "2c90454"

__all__ = ["CHECKED_TFDS_VERSION", "CHECKED_ALGOPERF_COMMIT", "RUNNER_BOOTSTRAP",
           "submission_runner_command", "write_tfds_mnist"]

#: The ``python -c`` program of :func:`submission_runner_command`: Triton's native library first
#: (module docstring), then AlgoPerf's installed ``submission_runner`` as ``__main__``.
RUNNER_BOOTSTRAP = (
    "import importlib.util, runpy\n"
    "if importlib.util.find_spec('triton') is not None:\n"
    "    import triton._C.libtriton  # before TensorFlow: see gnrev_plugin.compat.algoperf\n"
    "runpy.run_module('submission_runner', run_name='__main__', alter_sys=True)\n"
)


def submission_runner_command(flags: list[str], python: str | None = None) -> list[str]:
    """The command line that runs AlgoPerf's installed ``submission_runner`` with ``flags``.

    Run it in the folder that ``--submission_path`` is relative to: AlgoPerf imports the
    submission as a module path (``DIR/submission.py`` → ``DIR.submission``) from there.

    Args:
        flags: AlgoPerf's flags, e.g. ``["--framework=pytorch", "--workload=mnist", ...]``.
        python: the interpreter (default: this one).

    Returns:
        ``[python, "-c", RUNNER_BOOTSTRAP, *flags]``.
    """
    return [python or sys.executable, "-c", RUNNER_BOOTSTRAP, *flags]


def _local_mnist_builder(splits: dict[str, tuple[np.ndarray, np.ndarray]]):
    """TFDS' MNIST builder class with its download replaced by ``splits`` (name → images,
    labels)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415
    from tensorflow_datasets.image_classification.mnist import MNIST  # noqa: PLC0415

    encoded: dict[bytes, bytes] = {}

    class LocalMNIST(MNIST, skip_registration=True):
        """``mnist`` 3.0.1 (TFDS' features and layout) prepared from local arrays."""

        name = "mnist"

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return [tfds.core.SplitGenerator(name=split, gen_kwargs={"split": split})
                    for split in splits]

        def _generate_examples(self, split):
            images, labels = splits[split]
            encode = self.info.features["image"].encode_example  # TFDS' PNG encoder
            for index in range(len(labels)):
                key = images[index].tobytes()
                if key not in encoded:  # a repeated image is encoded once
                    encoded[key] = encode(images[index][..., None])
                yield index, {"image": encoded[key], "label": int(labels[index])}

    return LocalMNIST


def write_tfds_mnist(data_dir: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]
                     ) -> Path:
    """Write the prepared TFDS dataset ``mnist`` into ``data_dir`` from in-memory splits.

    Args:
        data_dir: the folder AlgoPerf gets as ``--data_dir`` (``mnist/3.0.1/`` is created in it).
        splits: split name (``"train"``, ``"test"``) → ``(images, labels)``: ``uint8`` images of
            shape ``(n, 28, 28)`` and integer labels in ``[0, 10)`` of shape ``(n,)``.

    Returns:
        The dataset's version folder, ``data_dir/mnist/3.0.1``.

    Raises:
        ValueError: an image array of another shape or dtype, or labels that do not match it.
    """
    for split, (images, labels) in splits.items():
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise ValueError(f"split {split!r}: images must be uint8 (n, 28, 28), got "
                             f"{images.dtype} {images.shape}")
        if labels.shape != (len(images),) or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"split {split!r}: labels must be (n,) = ({len(images)},) in [0, 10)")
    builder = _local_mnist_builder(splits)(data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)
