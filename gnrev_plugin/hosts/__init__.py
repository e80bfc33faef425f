"""Adapters that make gnrev-plugin's models and curvature objects work inside host libraries.

Each adapter lives in its own module and is the only place that imports its host, so importing
``gnrev_plugin.hosts`` (or any other adapter) never requires a host to be installed:

* :mod:`gnrev_plugin.hosts.curvlinops`: ``NMELinearOperator``, ``NTKLinearOperator`` and
  ``GaussNewtonStepOperator`` as ``curvlinops`` ``PyTorchLinearOperator`` subclasses;
* :mod:`gnrev_plugin.hosts.backpack`: BackPACK module extensions that make the additive coupling
  block (and the RevMLP) a BackPACK leaf, for every extension instance after ``enable()`` (or
  for given ones with ``register(*extensions)``);
* :mod:`gnrev_plugin.hosts.cockpit`: gnrev's curvature quantities as Cockpit instruments;
* :mod:`gnrev_plugin.hosts.benchopt`: a benchopt solver for every registered optimizer and a
  shipped benchmark;
* :mod:`gnrev_plugin.hosts.deepobs`: DeepOBS test problems, any registered optimizer on DeepOBS's
  own runner, and its result reader;
* :mod:`gnrev_plugin.hosts.algoperf`: an AlgoPerf submission around any registered optimizer.

Runners build everything they run through the registry (:mod:`gnrev_plugin.build`).
"""
