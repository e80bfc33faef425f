"""AlgoPerf adapter: the PyTorch submission API around any registered optimizer
(:mod:`.submission`), the export of a submission folder (:mod:`.export`) and the local TFDS MNIST
dataset that AlgoPerf's MNIST workload reads (:mod:`.data`). ``docs/runners/algoperf.md`` shows
AlgoPerf's own runner running an exported submission.

An exported ``submission.py`` imports this package (``from gnrev_plugin.hosts import algoperf``)
and binds its five functions; every public name of the three modules is available here.
"""

from __future__ import annotations

from .data import STANDIN_LAYOUT, build_mnist_tfds
from .export import default_submission_name, export_submission
from .submission import (
    DEFAULT_LOG_EVERY,
    DEFAULT_OPTIMIZER,
    GAUSS_NEWTON_TAG,
    GN_BATCH_SIZES,
    GN_UNSUPPORTED,
    NEEDS_REVMLP,
    REFERENCE_BATCH_SIZES,
    WORKLOAD_MODELS,
    WORKLOADS,
    ForwardPassMode,
    RevMLPRequiredError,
    SubmissionState,
    data_selection,
    get_batch_size,
    init_optimizer_state,
    is_gauss_newton,
    loss_kind,
    needs_revmlp,
    prepare_for_eval,
    tuning_search_space,
    unwrap_model,
    update_params,
)

__all__ = [
    "DEFAULT_OPTIMIZER", "GAUSS_NEWTON_TAG", "NEEDS_REVMLP", "WORKLOADS", "WORKLOAD_MODELS",
    "REFERENCE_BATCH_SIZES", "GN_BATCH_SIZES", "GN_UNSUPPORTED", "RevMLPRequiredError",
    "DEFAULT_LOG_EVERY", "STANDIN_LAYOUT", "build_mnist_tfds", "get_batch_size", "needs_revmlp",
    "default_submission_name", "is_gauss_newton", "tuning_search_space", "init_optimizer_state",
    "update_params", "prepare_for_eval", "data_selection", "export_submission", "ForwardPassMode",
    "loss_kind", "unwrap_model", "SubmissionState",
]
