"""DeepOBS compatibility: the only module that imports ``deepobs`` or touches its internals.

Checked against **deepobs 1.1.2** (the PyPI wheel of 2019-10; ``deepobs/version.py`` says
``1.2.0-beta0``) with its real dependencies installed (``torchvision``, ``six``, ``seaborn``,
``matplotlib2tikz``, ``pandas``, ``matplotlib``, the ``test`` extra). What is relied on, and why:

1. **TensorFlow import shim** (:func:`import_deepobs`). ``deepobs/__init__.py`` imports
   ``deepobs.tensorflow`` (the TF1 half), which does ``import tensorflow as tf`` in 47 files but,
   at import time, reads one attribute only: ``tf.float32`` (``deepobs/tensorflow/config.py``);
   every other use is inside functions that the PyTorch half never calls. Without TensorFlow, a
   stub module with that one attribute and a ``ModuleSpec`` (``torch._dynamo`` calls
   ``importlib.util.find_spec("tensorflow")`` and needs a spec) sits in ``sys.modules`` **only
   while** ``deepobs`` is imported; it is removed afterwards, so any later ``import tensorflow``
   elsewhere still fails normally. Nothing else is stubbed. The TF half of DeepOBS stays
   unusable; an installed TensorFlow is used as is.
2. ``deepobs.analyzer`` calls ``seaborn.set()`` at import, which rewrites matplotlib's global
   ``rcParams``; the import runs inside ``matplotlib.rc_context()`` so the process's settings are
   left alone.
3. **Arguments** (:func:`plain_argv`). ``Runner.parse_args`` calls ``argparse`` on ``sys.argv``
   even when every argument is passed to ``run()``; a foreign command line (pytest's, gnrev's)
   makes it exit, so runs happen with ``sys.argv`` reduced to the program name.
4. **Registering test problems** (:func:`register_test_problem`). DeepOBS looks problems up as
   attributes of ``deepobs.pytorch.testproblems`` and their defaults in
   ``deepobs.config.DEFAULT_TEST_PROBLEMS_SETTINGS``; ``deepobs.analyzer`` names them through
   ``deepobs.config.TP_NAMING`` (the part after the first ``_``).
5. **train_eval_size of the MNIST problems** (:func:`mnist_train_eval_size`). ``mnist_logreg`` and
   ``mnist_mlp`` call the module-global ``mnist(batch_size)`` of their own module in ``set_up``,
   always with DeepOBS's ``train_eval_size = 10,000``.
6. **The default device** (:func:`default_device`, :func:`set_default_device`). DeepOBS's
   PyTorch test problems take their device from ``deepobs.pytorch.config.get_default_device()``
   (``TestProblem.__init__``: ``self._device = torch.device(config.get_default_device())``),
   whose initial value is ``"cuda"`` if ``torch.cuda.is_available()`` else ``"cpu"`` and which
   ``config.set_default_device(device)`` changes. gnrev's problems read the same setting. Without
   DeepOBS installed, :func:`set_default_device` keeps the value here and the initial value is
   DeepOBS's rule.
7. **quadratic_deep's rotation** (:func:`fresh_quadratic_deep`). ``quadratic_deep.set_up`` draws
   its Hessian's eigenvectors from the module-level ``rng = np.random.RandomState(42)`` of
   ``deepobs/pytorch/testproblems/quadratic_deep.py``, which every ``set_up`` advances: in one
   process the second run would train on a different quadratic. The module's ``rng`` is reset
   before each run, so every run sees the problem a fresh DeepOBS process builds (the one of the
   published baselines).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator

__all__ = ["CHECKED_VERSION", "import_deepobs", "plain_argv", "register_test_problem",
           "mnist_train_eval_size", "default_device", "set_default_device",
           "fresh_quadratic_deep"]

#: The DeepOBS release this module was checked against.
CHECKED_VERSION = "1.1.2"


def _tensorflow_stub() -> types.ModuleType:
    stub = types.ModuleType("tensorflow", "gnrev's import-time stand-in for TensorFlow "
                                          "(deepobs/tensorflow/config.py reads tf.float32)")
    stub.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    stub.float32 = "float32"
    return stub


def import_deepobs() -> types.ModuleType:
    """``import deepobs`` (and ``deepobs.pytorch``) with the TensorFlow shim of item 1.

    Raises:
        ModuleNotFoundError: DeepOBS is not installed (the message says how to install it); any
            other missing module is DeepOBS's own dependency and propagates unchanged.

    Returns:
        The ``deepobs`` module.
    """
    if "deepobs.pytorch" in sys.modules:
        return sys.modules["deepobs"]
    if importlib.util.find_spec("deepobs") is None:
        raise ModuleNotFoundError(
            f"DeepOBS is not installed: pip install 'deepobs=={CHECKED_VERSION}' with its "
            "dependencies (gnrev-plugin's 'test' extra installs them)", name="deepobs")
    version = importlib.metadata.version("deepobs")
    if version != CHECKED_VERSION:
        warnings.warn(f"deepobs {version} is installed; gnrev's adapter was checked against "
                      f"{CHECKED_VERSION}", RuntimeWarning, stacklevel=2)
    stub = _tensorflow_stub() if importlib.util.find_spec("tensorflow") is None else None
    if stub is not None:
        sys.modules["tensorflow"] = stub
    try:
        import matplotlib  # noqa: PLC0415 - a gnrev dependency; only for rc_context

        with matplotlib.rc_context():
            deepobs = importlib.import_module("deepobs")
            importlib.import_module("deepobs.pytorch")
    finally:
        if stub is not None and sys.modules.get("tensorflow") is stub:
            del sys.modules["tensorflow"]
    return deepobs


@contextlib.contextmanager
def plain_argv() -> Iterator[None]:
    """Run with ``sys.argv = sys.argv[:1]`` (item 3), restoring it afterwards."""
    saved = sys.argv
    sys.argv = saved[:1] if saved else [""]
    try:
        yield
    finally:
        sys.argv = saved


def register_test_problem(name: str, cls: type, *, batch_size: int, num_epochs: int,
                          display_name: str) -> None:
    """Make ``cls`` DeepOBS's test problem ``name`` (item 4): its runners accept
    ``testproblem=name``, fall back to ``batch_size``/``num_epochs``, and ``deepobs.analyzer``
    shows ``display_name`` for the part of ``name`` after the data set.

    Args:
        name: Test-problem name (``"<dataset>_<model>"``).
        cls: The test-problem class.
        batch_size: Default batch size.
        num_epochs: Default number of epochs.
        display_name: Name shown by ``deepobs.analyzer``.
    """
    dob = import_deepobs()
    dataset, _, problem = name.partition("_")
    if not problem or dataset not in dob.config.DATA_SET_NAMING:
        raise ValueError(f"DeepOBS names problems <dataset>_<problem> with a known data set "
                         f"({', '.join(dob.config.DATA_SET_NAMING)}); got {name!r}")
    setattr(dob.pytorch.testproblems, name, cls)
    dob.config.DEFAULT_TEST_PROBLEMS_SETTINGS[name] = {"batch_size": int(batch_size),
                                                       "num_epochs": int(num_epochs)}
    dob.config.TP_NAMING[problem] = display_name


@contextlib.contextmanager
def mnist_train_eval_size(problem_cls: type, train_eval_size: int) -> Iterator[None]:
    """Within the context, ``problem_cls.set_up`` (a DeepOBS MNIST problem) builds its data set
    with ``train_eval_size`` (item 5).

    Args:
        problem_cls: A DeepOBS MNIST test-problem class.
        train_eval_size: Size of the train-eval set.
    """
    module = sys.modules[problem_cls.__module__]
    original = module.mnist
    module.mnist = functools.partial(original, train_eval_size=int(train_eval_size))
    try:
        yield
    finally:
        module.mnist = original


#: The default device when DeepOBS is not installed (:func:`set_default_device`; item 6).
_DEVICE_WITHOUT_DEEPOBS: str | None = None


def _deepobs_installed() -> bool:
    return "deepobs.pytorch" in sys.modules or importlib.util.find_spec("deepobs") is not None


def default_device() -> str:
    """DeepOBS's default device (item 6): ``deepobs.pytorch.config.get_default_device()`` when
    DeepOBS is installed, else the value :func:`set_default_device` kept, else DeepOBS's initial
    rule (``"cuda"`` if ``torch.cuda.is_available()`` else ``"cpu"``).

    Returns:
        The device name.
    """
    if _deepobs_installed():
        return str(import_deepobs().pytorch.config.get_default_device())
    if _DEVICE_WITHOUT_DEEPOBS is not None:
        return _DEVICE_WITHOUT_DEEPOBS
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_default_device(device: str) -> None:
    """Set DeepOBS's default device (``deepobs.pytorch.config.set_default_device``; item 6): the
    device of every test problem set up afterwards, DeepOBS's and gnrev's.

    Args:
        device: A device name (``"cpu"``, ``"cuda"``, ...).
    """
    global _DEVICE_WITHOUT_DEEPOBS
    if _deepobs_installed():
        import_deepobs().pytorch.config.set_default_device(str(device))
    else:
        _DEVICE_WITHOUT_DEEPOBS = str(device)


def fresh_quadratic_deep() -> None:
    """Reset ``quadratic_deep``'s module-level rotation RNG to DeepOBS's ``RandomState(42)``
    (item 7)."""
    import numpy as np  # noqa: PLC0415

    import_deepobs()
    sys.modules["deepobs.pytorch.testproblems.quadratic_deep"].rng = np.random.RandomState(42)
