"""The pluggy hook specifications of the ``gnrev`` plugin system.

A plugin is any importable module (or object) listed under the entry-point group
``gnrev.plugins`` that implements some of these hooks, marked with
``pluggy.HookimplMarker("gnrev")`` (re-exported as :data:`gnrev_plugin.registry.hookimpl`)::

    # pyproject.toml of a third-party distribution
    [project.entry-points."gnrev.plugins"]
    myplugin = "my_package.gnrev_plugin"

    # my_package/gnrev_plugin.py
    import pluggy
    hookimpl = pluggy.HookimplMarker("gnrev")

    @hookimpl
    def gnrev_register_models(registry):
        registry.add_model("my.net", "my_package.models:build_net", description="...")

Hooks only *register* names; nothing is built or imported until a host asks for it
(:meth:`~gnrev_plugin.registry.Registry.get_model` and friends). Every hook receives the same
:class:`~gnrev_plugin.registry.Registry`, which records the plugin and distribution behind every
entry.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT", "ENTRY_POINT_GROUP", "hookspec", "hookimpl", "GnrevHookSpecs"]

#: The pluggy project name (the marker name plugins use).
PROJECT = "gnrev"
#: The entry-point group scanned for plugins (``[project.entry-points."gnrev.plugins"]``).
ENTRY_POINT_GROUP = "gnrev.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GnrevHookSpecs:
    """Registration hooks. Each is called once per plugin with the host's registry.

    The **factory contracts** below are what every runner (``gnrev train``/``reproduce``, the
    benchopt solvers, the DeepOBS runner, the AlgoPerf submission) relies on; the registry checks
    them when an entry is added (a callable) or first used (a lazy ``"module:attr"``) and reports
    a breach as a :class:`~gnrev_plugin.registry.PluginError` naming the entry.
    """

    @hookspec
    def gnrev_register_models(self, registry) -> None:
        """Add model factories: ``registry.add_model(name, factory, defaults={...},
        input_multiple=1)``.

        Contract: ``factory(*, in_features: int, num_classes: int, **kwargs) -> nn.Module``
        mapping inputs ``(n, in_features)`` to logits ``(n, num_classes)``. The runner passes the
        dataset's shape; ``kwargs`` are the entry's ``defaults`` updated by the user's options.
        The runner seeds torch's global RNG with the run's seed around the call (in a forked RNG
        state), so a factory that draws from the global RNG is deterministic per seed.
        ``input_multiple`` > 1 asks runners to pad the inputs with zero features to a multiple.
        """

    @hookspec
    def gnrev_register_optimizers(self, registry) -> None:
        """Add optimizer factories: ``registry.add_optimizer(name, factory, defaults={...},
        needs=())``.

        Contract (torch.optim style): ``factory(params, **kwargs)`` returns an object with
        ``zero_grad()``, ``step(closure=None)``, ``state_dict()`` and ``load_state_dict()``;
        every hyperparameter is a keyword (and, for a ``torch.optim.Optimizer``, lives in
        ``param_groups``). An optimizer that also needs the model and the loss (the Gauss-Newton
        family) declares it as data, ``needs=("model", "loss")``: runners then pass
        ``model=<nn.Module>`` and ``loss="cross_entropy" | "mse"``. An optional
        ``step_on_batch(x, y) -> loss`` is used by runners as a fast path when present.
        Capabilities are declared as data, ``tags=(...)`` (``"gauss_newton"``, ``"batch_step"``,
        ``"distributed"``: :data:`gnrev_plugin.registry.contracts.TAGS`); they default to
        none, so older registrations keep working.
        """

    @hookspec
    def gnrev_register_metrics(self, registry) -> None:
        """Add metrics: ``registry.add_metric(name, fn, protocol="run" | "function")``.

        A **run metric** (``protocol="run"``) is called by runners at every logged epoch as
        ``fn(model, *, inputs, targets, loss_fn, initial_model, **_) -> float | dict[str, float]``
        on a fixed probe batch (``inputs``, ``targets`` in the loss's form, ``loss_fn`` an
        ``nn.Module`` loss, ``initial_model`` a frozen copy of the model at epoch 0). Its value
        is logged under the metric's registry name, a dict's keys as ``name.key``. A
        ``"function"`` metric is a library function with its own signature.
        """

    @hookspec
    def gnrev_register_datasets(self, registry) -> None:
        """Add dataset loaders: ``registry.add_dataset(name, loader)``.

        Contract: ``loader(**kwargs) ->`` :class:`gnrev_plugin.data.Dataset` (flattened float
        inputs ``x_train``/``x_test``, integer labels ``y_train``/``y_test``, ``num_classes``).
        """
