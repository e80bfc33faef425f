"""Train one registry-built run: spec → :func:`gnrev_plugin.build.build` → the epoch loop.

:func:`train_run` resolves a :class:`~gnrev_plugin.build.RunSpec` through the registry, records
it in ``config.json`` (``{"spec": <resolved spec>, **extra_config}``), restores a checkpoint when
resuming (:mod:`gnrev_plugin.engine.checkpoint`), walks the epochs
(:func:`gnrev_plugin.engine.loop.run_epochs`) with the given callbacks and writes
``result.json`` = ``{"final": <last row>, "epochs", "spec", "diverged": <reason or None>}``.

On ``N`` processes (``gnrev train --nproc N``, :mod:`gnrev_plugin.engine.launch`) every rank
builds the same model and walks the same batch order, steps on its contiguous shard of each
batch (the Gauss-Newton step is that of the whole batch), and only rank 0 evaluates, logs and
checkpoints; the per-batch losses are reduced to the global batch's.
"""

from __future__ import annotations

from collections.abc import Sequence

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, build, loss_targets, short_name
from gnrev_plugin.optim.distributed import mean_over_ranks
from gnrev_plugin.registry import Registry, get_registry

from .checkpoint import restore_checkpoint, save_checkpoint
from .launch import check_batching, rank_and_world
from .loop import EpochPlan, TrainState, run_epochs
from .rundir import RunDir

__all__ = ["train_run"]


def _state(spec: RunSpec, dataset: gdata.Dataset, run: RunDir, registry: Registry | None
           ) -> TrainState:
    """Build the run and put its data on the model's device and dtype."""
    built = build(spec, in_features=dataset.in_features, num_classes=dataset.num_classes,
                  registry=registry)
    spec, model = built.spec, built.model
    rank, world = rank_and_world()
    p = next(model.parameters())
    dev, dtype, C = p.device, p.dtype, dataset.num_classes
    state = TrainState(spec=spec, model=model, optimizer=built.optimizer,
                       loss_fn=built.loss_fn, initial_model=built.initial_model,
                       metrics=built.metrics, dataset=dataset, run=run,
                       x_train=dataset.x_train.to(dev, dtype), y_train=dataset.y_train.to(dev),
                       t_train=None, root=rank == 0, world=world)
    state.t_train = loss_targets(spec.loss, state.y_train, C, dtype)
    if dataset.x_test is not None:
        state.x_test, state.y_test = dataset.x_test.to(dev, dtype), dataset.y_test.to(dev)
        state.t_test = loss_targets(spec.loss, state.y_test, C, dtype)
    if world > 1:
        if "distributed" not in (registry or get_registry()).optimizer_tags(spec.optimizer):
            raise ValueError(f"{spec.optimizer} cannot step on a batch shared by {world} "
                             "processes; --nproc > 1 needs a Gauss-Newton optimizer "
                             "(gnrev.exact_gn, gnrev.dense_gn)")
        check_batching(len(dataset.y_train), spec.batch_size, world)

        def reduce(value: float, n: int) -> float:
            return mean_over_ranks(value, n, dev)
        state.reduce = reduce
    return state


def train_run(
    spec: RunSpec,
    dataset: gdata.Dataset,
    run: RunDir,
    callbacks: Sequence = (),
    plan: EpochPlan | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "",
    extra_config: dict | None = None,
    registry: Registry | None = None,
) -> dict:
    """Train per ``spec`` on ``dataset`` into ``run``; on ``resume`` continue exactly.

    Args:
        spec: the run (resolved through the registry here).
        dataset: the training and test data (``x_test=None``: no test set, no ``test_*`` fields).
        run: the run directory.
        callbacks: :class:`~gnrev_plugin.engine.callbacks.Callback` objects, in the order they
            measure (e.g. ``[BatchLossChange(), Diagnostics(factory), WallTime()]``).
        plan: rows every k epochs, re-evaluation, batch order (default :class:`EpochPlan()`:
            a row every epoch, re-evaluated batches, shuffled by ``(seed, epoch)``).
        resume: continue from the run's checkpoint (a finished run is returned as it is); the
            config must equal the stored one.
        progress: show a tqdm bar.
        desc: the bar's label (default: the optimizer's short name).
        extra_config: more entries of ``config.json`` beside ``spec``.
        registry: the plugin registry (default: the global one).

    Returns:
        ``{"final": <last row>, "epochs", "spec", "diverged"}`` (``final`` is ``None`` on
        non-root processes).

    Raises:
        FloatingPointError: a step diverged and no callback handled it.
    """
    plan = plan or EpochPlan()
    state = _state(spec, dataset, run, registry)
    spec = state.spec
    if state.root:
        run.write_config({"spec": spec.to_dict(), **(extra_config or {})}, resume=resume)
    if resume and run.done:
        return run.read_result()
    if resume:
        start = restore_checkpoint(state, callbacks)
    else:
        if state.root:
            run.reset()
        start = 0
    row = None
    if state.stop_reason is None:
        row = run_epochs(state, plan, callbacks, start,
                         lambda epoch: save_checkpoint(state, epoch, callbacks),
                         progress=progress, desc=desc or short_name(spec.optimizer))
    if callable(getattr(state.optimizer, "close", None)):
        state.optimizer.close()
    result = dict(epochs=spec.epochs, spec=spec.to_dict(), diverged=state.stop_reason)
    if not state.root:
        return dict(final=None, **result)
    rows = run.rows()
    result = dict(final=rows[-1] if rows else row, **result)
    run.write_result(result)
    return result
