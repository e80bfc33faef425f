"""Diagnostics of the seed papers: Hessian = GN + NME, empirical NTK, CKA, GN conditioning.

They work on any ``nn.Module`` and have fast paths for :class:`~gnrev_plugin.nn.RevMLP`. The metrics
never import :mod:`gnrev_plugin.optim`; curvature operators and estimators come from curvlinops.
"""

from .conditioning import (
    ConditionReport,
    condition_number_from_eigenvalues,
    deep_linear_condition_bounds,
    deep_linear_gn_rank,
    deep_linear_gn_spectrum,
    gn_condition_number,
    gn_gram_matrix,
    residual_layer_condition_bound,
    residual_layer_condition_number,
    residual_weights,
    spectrum_lemma_matrix,
    two_layer_relu_gram,
    whitened_two_layer_condition_number,
)
from .hessian import (
    HessianDecomposition,
    SurrogateNMELinearOperator,
    decompose,
    dense_matrix,
    nme_surrogate_dense,
)
from .ntk import (
    empirical_ntk,
    kernel_alignment,
    kernel_target_alignment,
    ntk_operator,
    ntk_similarity,
    ntk_velocity,
    random_probe_similarity,
    revmlp_ntk,
)
from .representation import (
    capture_representations,
    cka_by_layer,
    hsic,
    linear_cka,
    rbf_cka,
    revmlp_representations,
)
from .run_metrics import (
    cka_to_init,
    gn_condition_number_on_batch,
    nme_trace,
    ntk_similarity_to_init,
    weight_cosine_to_init,
    weight_norm_ratio_to_init,
)
from .training import (
    LossChangeTracker,
    percentage_loss_change,
    snapshot_parameters,
    weight_cosine_similarity,
    weight_norm_ratio,
)

__all__ = [
    "ConditionReport", "condition_number_from_eigenvalues", "deep_linear_condition_bounds",
    "deep_linear_gn_rank", "deep_linear_gn_spectrum", "gn_condition_number", "gn_gram_matrix",
    "residual_layer_condition_bound", "residual_layer_condition_number", "residual_weights",
    "spectrum_lemma_matrix", "two_layer_relu_gram", "whitened_two_layer_condition_number",
    "HessianDecomposition", "SurrogateNMELinearOperator", "decompose", "dense_matrix",
    "nme_surrogate_dense",
    "empirical_ntk", "kernel_alignment", "kernel_target_alignment", "ntk_operator",
    "ntk_similarity", "ntk_velocity", "random_probe_similarity", "revmlp_ntk",
    "capture_representations", "cka_by_layer", "hsic", "linear_cka", "rbf_cka",
    "revmlp_representations",
    "LossChangeTracker", "percentage_loss_change", "snapshot_parameters",
    "weight_cosine_similarity", "weight_norm_ratio",
    "ntk_similarity_to_init", "cka_to_init", "weight_cosine_to_init", "weight_norm_ratio_to_init",
    "gn_condition_number_on_batch", "nme_trace",
]
