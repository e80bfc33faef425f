"""gnrev-plugin's own plugin, found like any other through the ``gnrev.plugins`` entry point.

Every factory is a lazy ``"module:attribute"`` target, so registering never imports the optimizer,
metric or data modules: a missing or broken optional piece only affects its own entry, when used.

Registered names (see ``gnrev list``):

* models: ``gnrev.revmlp`` (:class:`~gnrev_plugin.nn.RevMLP`), ``gnrev.revmlp_preset``
  (:func:`~gnrev_plugin.nn.revmlp_from_preset`, first argument the preset name);
* optimizers: ``gnrev.exact_gn`` (:class:`~gnrev_plugin.optim.ExactGN`), ``gnrev.dense_gn``
  (:class:`~gnrev_plugin.optim.DenseGN`), and the baselines ``gnrev.sgd``/``gnrev.adam``
  (``torch.optim``) so runners can name every competitor through one registry;
* metrics: ``gnrev.decompose``, ``gnrev.empirical_ntk``, ``gnrev.linear_cka``,
  ``gnrev.gn_condition_number`` and the other diagnostics of :mod:`gnrev_plugin.metrics`
  (CKA variants, NTK similarity/velocity, kernel-target alignment, loss change, weight drift);
* datasets: ``gnrev.mnist``, ``gnrev.fashion_mnist``, ``gnrev.mnist1d``, ``gnrev.teacher_student``
  (:func:`gnrev_plugin.data.load_dataset`).
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .plugins import LazyFactory

MODELS = {
    "gnrev.revmlp": ("gnrev_plugin.nn:RevMLP", "reversible MLP of additive coupling blocks"),
    "gnrev.revmlp_preset": ("gnrev_plugin.nn:revmlp_from_preset",
                            "RevMLP from a named preset (mnist_paper, cifar10_paper, tiny, ...)"),
}
OPTIMIZERS = {
    "gnrev.exact_gn": ("gnrev_plugin.optim:ExactGN",
                       "exact Gauss-Newton for RevMLP (per-block right inverse)"),
    "gnrev.dense_gn": ("gnrev_plugin.optim:DenseGN",
                       "dense-Jacobian (damped) Gauss-Newton for any nn.Module"),
    "gnrev.sgd": ("torch.optim:SGD", "baseline: torch.optim.SGD"),
    "gnrev.adam": ("torch.optim:Adam", "baseline: torch.optim.Adam"),
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
    for name, (target, doc) in MODELS.items():
        registry.add_model(name, LazyFactory(target), doc)


@hookimpl
def gnrev_register_optimizers(registry) -> None:
    for name, (target, doc) in OPTIMIZERS.items():
        registry.add_optimizer(name, LazyFactory(target), doc)


@hookimpl
def gnrev_register_metrics(registry) -> None:
    for name, (target, doc) in METRICS.items():
        registry.add_metric(name, LazyFactory(target), doc)


@hookimpl
def gnrev_register_datasets(registry) -> None:
    for name, (dataset, doc) in DATASETS.items():
        registry.add_dataset(name, LazyFactory("gnrev_plugin.data:load_dataset", dataset), doc)
