"""Adapters that make gnrev-plugin's models and curvature objects work inside host libraries.

Each adapter lives in its own module and is the only place that imports its host, so importing
``gnrev_plugin.hosts`` (or any other adapter) never requires a host to be installed:

* :mod:`gnrev_plugin.hosts.curvlinops`: ``NMELinearOperator``, ``NTKLinearOperator`` and
  ``GaussNewtonStepOperator`` as ``curvlinops`` ``PyTorchLinearOperator`` subclasses;
* :mod:`gnrev_plugin.hosts.backpack`: BackPACK module extensions that make the additive coupling
  block (and the RevMLP) a BackPACK leaf, enabled with ``register(*extensions)``;
* :mod:`gnrev_plugin.hosts.benchopt`: benchopt solvers and a shipped benchmark.
"""
