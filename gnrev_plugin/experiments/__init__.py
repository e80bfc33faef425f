"""The paper reproductions behind ``gnrev reproduce`` and ``gnrev report``.

One sub-package per reproduction, each with a ``run`` module (specs plus callbacks on the
training engine, :mod:`gnrev_plugin.engine`) and a ``report`` module (figures and ``report.md``
from the logs alone): :mod:`.exact_gn` (Buffelli et al.), :mod:`.conditioning` (Zhao, Singh &
Lucchi), :mod:`.nme` and :mod:`.sharpness` (Dauphin, Agarwala & Mobahi), and :mod:`.laziness` (is
exact GN lazy? a sweep over width, step, α, init and optimizer). :mod:`.catalog` maps their names
to them (``EXPERIMENTS = {name: Experiment(run, report)}``).

Shared by them: :mod:`.presets`, :mod:`.diagnostics` (NTK, CKA and weight change of a RevMLP
against init), :mod:`.whitening` (PCA-whitened inputs), :mod:`.plotting` and :mod:`.tables`.

Imports point one way: core ← registry/build ← ``engine``, ``hosts`` ← ``experiments`` ←
``commands``; inside, ``catalog`` → ``<experiment>.run`` → ``<experiment>.report`` →
``tables``/``plotting``.
"""
