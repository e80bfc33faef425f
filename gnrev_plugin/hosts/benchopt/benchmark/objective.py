"""Classification objective of the gnrev benchmark: any registered optimizer on a registry model.

Each solver trains the same initial model (``model_init_fn``, built through gnrev's registry and
seeded per repetition) on the training split with the cross-entropy loss. Every epoch benchopt
records (``evaluate_result``):

* ``value`` = ``train_loss``: mean cross-entropy on the whole training split (monitored by the
  stopping criterion), and ``train_accuracy``;
* ``test_loss``, ``test_accuracy`` on the held-out split;
* ``batch_loss_change``: the epoch's mean of ``100·(ℓ_B(θ_{t+1}) − ℓ_B(θ_t))/ℓ_B(θ_t)``, the
  change of a mini-batch's loss caused by the step on that batch (Buffelli et al. 2024, Fig. 3;
  GN overfits each batch);
* ``exact_step_fraction``: for GN solvers, the fraction of the epoch's steps that were exact
  (``J Δθ = −α ε`` held); NaN for first-order solvers.

Devices: the data stay where the dataset made them (CPU); ``evaluate_result`` evaluates a
solver's model on the device its parameters live on (the solvers' ``device`` parameter,
``-s "gnrev.exact_gn[device=cuda]"``), with the splits moved there once.

Parameters: ``model`` is a registry model name (``gnrev list``); ``hidden`` its width option
(here a CPU-sized 256; ``None`` leaves the registry default, for a model without that option),
and ``model_options`` any further options as ``'k=v k=v'`` (values read as JSON), e.g.
``-o "*[model=gnrev.mlp,model_options='activation=gelu']"``.
"""

from benchopt import BaseObjective, safe_import_context

with safe_import_context() as import_ctx:
    import math

    import torch

    from gnrev_plugin.build import build_loss, parse_options
    from gnrev_plugin.hosts.benchopt.problem import as_tensor, model_factory
    from gnrev_plugin.stepping import evaluate


class Objective(BaseObjective):
    name = "gnrev classification"
    url = "https://github.com/gnrev-plugin/gnrev-plugin"
    min_benchopt_version = "1.10"
    requirements = ["pip::torch", "pip::gnrev-plugin"]

    parameters = {"model": ["gnrev.revmlp"], "hidden": [256], "model_options": [""]}
    test_config = {"dataset": {"name": "simulated"}}

    def skip(self, X_train, y_train, X_test, y_test, num_classes, unavailable=None):
        if unavailable:
            return True, unavailable
        return False, None

    def set_data(self, X_train, y_train, X_test, y_test, num_classes, unavailable=None):
        self.X_train, self.y_train = X_train, y_train
        self.X_test, self.y_test = X_test, y_test
        self._on_device = {}
        self.num_classes = int(num_classes)
        self.loss_fn = build_loss("cross_entropy")
        try:
            seed = self.get_seed(use_repetition=True)
        except ValueError:  # outside a benchopt run
            seed = 0
        options = {} if self.hidden is None else {"hidden": self.hidden}
        options.update(parse_options(str(self.model_options or "").split()))
        self.model_init_fn = model_factory(self.model, options, int(X_train.shape[1]),
                                           self.num_classes, seed=int(seed) % 2**31)

    def get_objective(self):
        return dict(X=self.X_train, y=self.y_train, model_init_fn=self.model_init_fn,
                    loss="cross_entropy", framework="pytorch", track_batch_loss_change=True)

    def _data_on(self, device):
        """The four splits on ``device`` (a solver's ``device`` parameter puts its model there),
        moved once per device."""
        if device not in self._on_device:
            self._on_device[device] = [as_tensor(a).to(device) for a in
                                       (self.X_train, self.y_train, self.X_test, self.y_test)]
        return self._on_device[device]

    def evaluate_result(self, model, batch_loss_change=math.nan, exact_step_fraction=math.nan):
        p = next(model.parameters(), None)
        X_train, y_train, X_test, y_test = self._data_on(
            p.device if p is not None else torch.device("cpu"))
        train_loss, train_acc = evaluate(model, self.loss_fn, X_train, y_train)
        test_loss, test_acc = evaluate(model, self.loss_fn, X_test, y_test)
        return dict(value=train_loss, train_loss=train_loss, train_accuracy=train_acc,
                    test_loss=test_loss, test_accuracy=test_acc,
                    batch_loss_change=batch_loss_change,
                    exact_step_fraction=exact_step_fraction)

    def get_one_result(self):
        return dict(model=self.model_init_fn())
