"""Experiment runners behind ``gnrev train``, ``gnrev reproduce`` and ``gnrev report``.

Modules: :mod:`.rundir` (run directories, JSONL logs, atomic writes, checkpoints),
:mod:`.optimizers` (exact GN / Adam / SGD with the reference learning rates),
:mod:`.training` (the resumable RevMLP training loop), :mod:`.diagnostics` (NTK, CKA and weight
change against init), :mod:`.sweep` (crash-tolerant sweeps), :mod:`.presets`,
:mod:`.exact_gn_repro` / :mod:`.exact_gn_report`, :mod:`.conditioning_repro`, :mod:`.nme_repro`,
:mod:`.whitening`, :mod:`.plotting` and :mod:`.report`.

Imports point one way: ``nn``/``optim``/``metrics`` ← ``experiments`` ← ``commands``.
"""
