"""gnrev-plugin's own plugin, found like any other through the ``gnrev.plugins`` entry point.

Every factory is a lazy ``"module:attribute"`` target, so registering never imports the optimizer,
metric or data modules: a missing or broken optional piece only affects its own entry, when used.
The runner defaults of each entry come from :mod:`gnrev_plugin.defaults`.

Registered names (see ``gnrev list``):

* models: ``gnrev.revmlp`` (:class:`~gnrev_plugin.nn.RevMLP`), ``gnrev.revmlp_preset``
  (:func:`~gnrev_plugin.nn.revmlp_preset_factory`, ``preset=`` a name of
  :data:`~gnrev_plugin.nn.PRESETS`), ``gnrev.mlp`` (:class:`~gnrev_plugin.nn.MLP`);
* optimizers: ``gnrev.exact_gn`` (:class:`~gnrev_plugin.optim.ExactGN`), ``gnrev.dense_gn``
  (:class:`~gnrev_plugin.optim.DenseGN`), both needing the model and the loss, and the
  baselines ``gnrev.sgd``/``gnrev.adam`` (``torch.optim``), and the sharpness regularisers
  ``gnrev.sam``, ``gnrev.psam``, ``gnrev.weight_noise``, ``gnrev.hessian_trace_penalty``,
  ``gnrev.gn_trace_penalty`` (:mod:`gnrev_plugin.optim.regularizers`, wrapping a base optimizer);
  the Gauss-Newton pair is tagged ``gauss_newton``, ``batch_step``, ``distributed``, the
  sharpness family ``sharpness``, ``batch_step``;
* run metrics (logged every epoch, :mod:`gnrev_plugin.metrics.run_metrics`):
  ``gnrev.ntk_similarity_to_init``, ``gnrev.cka_to_init``, ``gnrev.weight_cosine_to_init``,
  ``gnrev.weight_norm_ratio_to_init``, ``gnrev.gn_condition_number_on_batch``,
  ``gnrev.nme_trace``;
* function metrics: ``gnrev.decompose``, ``gnrev.empirical_ntk``, ``gnrev.linear_cka``,
  ``gnrev.gn_condition_number`` and the other functions of :mod:`gnrev_plugin.metrics`;
* datasets: ``gnrev.mnist``, ``gnrev.fashion_mnist``, ``gnrev.mnist1d``, ``gnrev.teacher_student``
  (:func:`gnrev_plugin.data.load_dataset`).
"""

from __future__ import annotations

from ..defaults import MODEL_DEFAULTS, OPTIMIZER_DEFAULTS
from .hookspecs import hookimpl
from .registry import LazyFactory

#: name → (target, description, input_multiple)
MODELS = {
    "gnrev.revmlp": ("gnrev_plugin.nn:RevMLP", "reversible MLP of additive coupling blocks", 2),
    "gnrev.revmlp_preset": ("gnrev_plugin.nn:revmlp_preset_factory",
                            "RevMLP from a named preset (preset=mnist_paper, tiny, ...)", 2),
    "gnrev.mlp": ("gnrev_plugin.nn:MLP", "plain MLP d → h₁ → … → C (any activation)", 1),
}
_GN = ("gauss_newton", "batch_step", "distributed")
_SHARPNESS = ("sharpness", "batch_step")
#: name → (target, description, needs, tags: capabilities as data, see
#: :data:`gnrev_plugin.registry.contracts.TAGS`)
OPTIMIZERS = {
    "gnrev.exact_gn": ("gnrev_plugin.optim:ExactGN",
                       "exact Gauss-Newton for RevMLP (per-block right inverse)", ("model", "loss"),
                       _GN),
    "gnrev.dense_gn": ("gnrev_plugin.optim:DenseGN",
                       "dense-Jacobian (damped) Gauss-Newton for any nn.Module", ("model", "loss"),
                       _GN),
    "gnrev.sgd": ("torch.optim:SGD", "baseline: torch.optim.SGD", (), ()),
    "gnrev.adam": ("torch.optim:Adam", "baseline: torch.optim.Adam", (), ()),
    "gnrev.sam": ("gnrev_plugin.registry.regularizer_entries:SAM", "SAM: base step on ∇L(θ + ρĝ)",
                  ("model", "loss"), _SHARPNESS),
    "gnrev.psam": ("gnrev_plugin.registry.regularizer_entries:PSAM",
                   "penalty SAM: ∇L + ρHĝ (one HVP)",
                   ("model", "loss"), _SHARPNESS),
    "gnrev.weight_noise": ("gnrev_plugin.registry.regularizer_entries:WeightNoise",
                           "weight noise: ∇L(θ + ε), ε ~ N(0, σ²I)", ("model", "loss"),
                           _SHARPNESS),
    "gnrev.hessian_trace_penalty": ("gnrev_plugin.registry.regularizer_entries:HessianTracePenalty",
                                    "L + (σ²/2) tr H, Hutchinson", ("model", "loss"),
                                    _SHARPNESS),
    "gnrev.gn_trace_penalty": ("gnrev_plugin.registry.regularizer_entries:GNTracePenalty",
                               "L + (σ²/2) tr G, sampled labels", ("model", "loss"),
                               _SHARPNESS),
}
RUN_METRICS = {
    "gnrev.ntk_similarity_to_init": ("gnrev_plugin.metrics:ntk_similarity_to_init",
                                     "NTK similarity A(Θ₀, Θ_t) on the probe batch"),
    "gnrev.cka_to_init": ("gnrev_plugin.metrics:cka_to_init",
                          "linear CKA to init per half-layer / leaf module"),
    "gnrev.weight_cosine_to_init": ("gnrev_plugin.metrics:weight_cosine_to_init",
                                    "cos(θ₀, θ_t) over all parameters"),
    "gnrev.weight_norm_ratio_to_init": ("gnrev_plugin.metrics:weight_norm_ratio_to_init",
                                        "‖θ_t‖ / ‖θ₀‖ over all parameters"),
    "gnrev.gn_condition_number_on_batch": ("gnrev_plugin.metrics:gn_condition_number_on_batch",
                                           "κ(G) and rank of the probe batch's GN matrix"),
    "gnrev.nme_trace": ("gnrev_plugin.metrics:nme_trace", "tr(NME) = tr(H − G) on the probe batch"),
}
METRICS = {
    "gnrev.decompose": ("gnrev_plugin.metrics:decompose",
                        "Hessian = GN + NME decomposition (curvlinops operators + summary)"),
    "gnrev.empirical_ntk": ("gnrev_plugin.metrics:empirical_ntk",
                            "empirical NTK Gram J Jᵀ (n·C × n·C)"),
    "gnrev.linear_cka": ("gnrev_plugin.metrics:linear_cka", "linear CKA similarity"),
    "gnrev.gn_condition_number": ("gnrev_plugin.metrics:gn_condition_number",
                                  "κ(G) on the column space, with the rank used"),
    "gnrev.rbf_cka": ("gnrev_plugin.metrics:rbf_cka", "RBF-kernel CKA similarity"),
    "gnrev.cka_by_layer": ("gnrev_plugin.metrics:cka_by_layer",
                           "CKA between two models' per-layer representations"),
    "gnrev.ntk_similarity": ("gnrev_plugin.metrics:ntk_similarity",
                             "alignment between two empirical NTKs"),
    "gnrev.ntk_velocity": ("gnrev_plugin.metrics:ntk_velocity",
                           "NTK change between checkpoints"),
    "gnrev.kernel_target_alignment": ("gnrev_plugin.metrics:kernel_target_alignment",
                                      "kernel-target alignment"),
    "gnrev.percentage_loss_change": ("gnrev_plugin.metrics:percentage_loss_change",
                                     "per-batch loss change of one step, in percent"),
    "gnrev.weight_cosine_similarity": ("gnrev_plugin.metrics:weight_cosine_similarity",
                                       "cosine similarity of the weights to initialisation"),
    "gnrev.weight_norm_ratio": ("gnrev_plugin.metrics:weight_norm_ratio",
                                "weight norm ratio to initialisation"),
}
DATASETS = {
    "gnrev.mnist": ("mnist", "MNIST IDX files (no download; $GNREV_DATA_DIR or ../shared)"),
    "gnrev.fashion_mnist": ("fashion-mnist", "Fashion-MNIST IDX files (data_dir=...)"),
    "gnrev.mnist1d": ("mnist1d", "MNIST-1D (generated locally)"),
    "gnrev.teacher_student": ("teacher-student", "synthetic teacher-student classification"),
}


@hookimpl
def gnrev_register_models(registry) -> None:
    for name, (target, doc, multiple) in MODELS.items():
        registry.add_model(name, LazyFactory(target), doc, defaults=MODEL_DEFAULTS.get(name),
                           input_multiple=multiple)


@hookimpl
def gnrev_register_optimizers(registry) -> None:
    for name, (target, doc, needs, tags) in OPTIMIZERS.items():
        registry.add_optimizer(name, LazyFactory(target), doc,
                               defaults=OPTIMIZER_DEFAULTS.get(name), needs=needs, tags=tags)


@hookimpl
def gnrev_register_metrics(registry) -> None:
    for name, (target, doc) in RUN_METRICS.items():
        registry.add_metric(name, LazyFactory(target), doc, protocol="run")
    for name, (target, doc) in METRICS.items():
        registry.add_metric(name, LazyFactory(target), doc)


@hookimpl
def gnrev_register_datasets(registry) -> None:
    for name, (dataset, doc) in DATASETS.items():
        registry.add_dataset(name, LazyFactory("gnrev_plugin.data:load_dataset", dataset), doc)
