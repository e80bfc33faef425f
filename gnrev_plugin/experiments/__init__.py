"""Experiment runners behind ``gnrev train``, ``gnrev reproduce`` and ``gnrev report``.

Shared modules: :mod:`.rundir` (run directories, JSONL logs, atomic writes, checkpoints),
:mod:`.training` (the resumable training loop of one :class:`~gnrev_plugin.build.RunSpec`, built
through the registry), :mod:`.diagnostics` (NTK, CKA and weight change of a RevMLP against init),
:mod:`.sweep` (crash-tolerant sweeps), :mod:`.presets`, :mod:`.whitening`, :mod:`.plotting` and
:mod:`.tables` (the reports' shared table helpers), and :mod:`.leaderboard`.

One sub-package per reproduction, each with a ``run`` and a ``report`` module:
:mod:`.exact_gn` (Buffelli et al.), :mod:`.conditioning` (Zhao, Singh & Lucchi), :mod:`.nme` and
:mod:`.sharpness` (Dauphin, Agarwala & Mobahi), and :mod:`.laziness` (is exact GN lazy? a sweep
over width, step, α, init and optimizer). :mod:`.catalog` maps their names to them
(``EXPERIMENTS = {name: Experiment(run, report)}``) for ``gnrev reproduce`` and ``gnrev report``.
:mod:`.distributed_run` launches ``gnrev train --nproc N``.

Imports point one way: ``nn``/``optim``/``metrics`` ← ``hosts`` ← ``experiments`` ← ``commands``;
inside, ``catalog`` → ``<experiment>.run`` → ``<experiment>.report`` → ``tables``/``plotting``.
"""
