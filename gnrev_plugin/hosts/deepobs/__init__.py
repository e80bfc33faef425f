"""DeepOBS adapter: registered optimizers on DeepOBS's runners and test problems, and its results.

DeepOBS (Schneider, Balles & Hennig, ICLR 2019) benchmarks optimizers on *test problems* through a
*runner* that writes one JSON file per run. This sub-package connects it to gnrev's registry:

* :mod:`.runner`: :func:`deepobs_optimizer_class` (any registered optimizer, by registry name, as
  a DeepOBS ``optimizer_class``), :func:`hyperparameter_names`, :func:`run_deepobs` (DeepOBS
  1.1.2's own ``StandardRunner``) and :class:`StandardRunner` (the same protocol without DeepOBS);
* :mod:`.problems`: gnrev's test problems ``mnist_revmlp``, ``fmnist_revmlp``, ``cifar10_revmlp``
  (registry models built by :func:`gnrev_plugin.build.build_model`), and DeepOBS's own MNIST
  problems on a local IDX folder (:func:`prepare_mnist_data_dir`, :func:`local_mnist_problem`);
* :mod:`.results`: DeepOBS's folder/JSON layout (writer) and :func:`read_deepobs` (reader);
* :mod:`gnrev_plugin.compat.deepobs`: the only module importing ``deepobs`` (TensorFlow import
  shim, the DeepOBS internals used, checked against 1.1.2), with the other hosts' private APIs.

Importing this package does not import DeepOBS.
"""

from .problems import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    LOCAL_MNIST_PROBLEMS,
    TEST_PROBLEMS,
    RegistryTestProblem,
    TensorDataSet,
    cifar10_revmlp,
    fmnist_revmlp,
    load_cifar10,
    local_mnist_problem,
    make_test_problem,
    mnist_revmlp,
    prepare_mnist_data_dir,
    register_local_mnist_problems,
    register_with_deepobs,
    set_data_dir,
    write_idx,
)
from .results import RESULT_KEYS, float2str, read_deepobs, result_path, run_folder_name, write_result
from .runner import StandardRunner, deepobs_optimizer_class, hyperparameter_names, run_deepobs

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "LOCAL_MNIST_PROBLEMS", "TEST_PROBLEMS", "RegistryTestProblem",
    "TensorDataSet", "cifar10_revmlp", "fmnist_revmlp", "load_cifar10", "local_mnist_problem",
    "make_test_problem", "mnist_revmlp", "prepare_mnist_data_dir",
    "register_local_mnist_problems", "register_with_deepobs", "set_data_dir", "write_idx",
    "RESULT_KEYS", "float2str", "read_deepobs", "result_path", "run_folder_name", "write_result",
    "StandardRunner", "deepobs_optimizer_class", "hyperparameter_names", "run_deepobs",
]
