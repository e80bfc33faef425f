"""Train one registry-built model with one registry-built optimizer; log every epoch; resume exactly.

A run is a :class:`~gnrev_plugin.build.RunSpec`: :func:`train_run` resolves it through the registry
(:func:`gnrev_plugin.build.build`), records the resolved spec in ``config.json`` and trains. Per
epoch (epoch 0 = the initial model) one row goes to ``log.jsonl``: the loss and accuracy on the
whole train and test sets, the epoch's mean per-batch percentage loss change
``100 (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)``, the fraction of exact Gauss-Newton steps (for an
optimizer that reports ``last_step_exact``), the run metrics of the spec (under their registry
names, on the first ``probe_size`` training samples), any extra diagnostics, and the wall time.

Resume is exact: the batch order of an epoch depends only on ``(seed, epoch)``
(:func:`gnrev_plugin.data.epoch_permutation`); the model, optimizer and diagnostic states are
checkpointed after every epoch's log row; on resume the log is cut back to the checkpoint's
epoch, so a crash between the log write and the checkpoint write (or anywhere else) loses at most
the epoch in flight. Timings (``time_s``) naturally differ.

On ``N`` processes (``gnrev train --nproc N``, :mod:`gnrev_plugin.experiments.distributed_run`)
every rank builds the same model and walks the same batch order, steps on its contiguous shard of
each batch (the Gauss-Newton step is that of the whole batch), and only rank 0 evaluates, logs
and checkpoints; the per-batch losses are reduced to the global batch's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, build, evaluate_run_metrics, loss_targets, short_name
from gnrev_plugin.optim.distributed import mean_over_ranks
from gnrev_plugin.registry import Registry, get_registry
from gnrev_plugin.stepping import evaluate, train_step

from .distributed_run import check_batching, local_rows, rank_and_world
from .rundir import RunDir

__all__ = ["train_run", "RunInterrupted"]


class RunInterrupted(BaseException):
    """Raised by test hooks to simulate a killed run (a ``BaseException``, like
    ``KeyboardInterrupt``, so sweeps do not record it as a crashed config)."""


#: Test hooks to simulate a crash: ``hook(run, epoch, row)`` after each epoch's log row is
#: written (before the checkpoint), and after its checkpoint is written.
_after_log_hook: Callable[[RunDir, int, dict], None] | None = None
_after_epoch_hook: Callable[[RunDir, int, dict], None] | None = None


def train_run(
    spec: RunSpec,
    dataset: gdata.Dataset,
    run: RunDir,
    resume: bool = False,
    progress: bool = True,
    diagnostics_factory: Callable | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "",
    extra_config: dict | None = None,
    registry: Registry | None = None,
) -> dict:
    """Train per ``spec`` on ``dataset`` into ``run`` and return the result (final row, spec).

    ``config.json`` holds ``{"spec": <resolved spec>, "data_info": ..., **extra_config}``.
    ``diagnostics_factory(initial_model, dataset, spec)`` may return an object with
    ``measure(model, epoch) -> dict``, ``state_dict()`` and ``load_state_dict(state)`` whose
    values join each row (stateful diagnostics such as the NTK velocity).
    """
    from tqdm.auto import tqdm

    built = build(spec, in_features=dataset.in_features, num_classes=dataset.num_classes,
                  registry=registry)
    spec = built.spec
    rank, world = rank_and_world()
    root = rank == 0
    model, opt, loss_fn = built.model, built.optimizer, built.loss_fn
    dev = next(model.parameters()).device
    reduce = None
    if world > 1:
        if "distributed" not in (registry or get_registry()).optimizer_tags(spec.optimizer):
            raise ValueError(f"{spec.optimizer} cannot step on a batch shared by {world} "
                             "processes; --nproc > 1 needs a Gauss-Newton optimizer "
                             "(gnrev.exact_gn, gnrev.dense_gn)")
        check_batching(len(dataset.y_train), spec.batch_size, world)

        def reduce(value: float, n: int) -> float:
            return mean_over_ranks(value, n, dev)
    if root:
        run.write_config({"spec": spec.to_dict(), "data_info": dataset.info,
                          **(extra_config or {})}, resume=resume)
    if resume and run.done:
        return run.read_result()
    dtype = next(model.parameters()).dtype
    C = dataset.num_classes

    def prepared(x: torch.Tensor, y: torch.Tensor):
        x, y = x.to(dev, dtype), y.to(dev)
        return x, y, loss_targets(spec.loss, y, C, dtype)

    x_tr, y_tr, t_tr = prepared(dataset.x_train, dataset.y_train)
    x_te, y_te, t_te = prepared(dataset.x_test, dataset.y_test)
    probe = dict(inputs=x_tr[:spec.probe_size], targets=t_tr[:spec.probe_size], loss_fn=loss_fn,
                 initial_model=built.initial_model)
    diag = (diagnostics_factory(built.initial_model, dataset, spec)
            if diagnostics_factory else None)

    ckpt = run.load_checkpoint() if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if diag is not None and ckpt.get("diagnostics") is not None:
            diag.load_state_dict(ckpt["diagnostics"])
        start = ckpt["epoch"] + 1
        if root:
            run.truncate_log([r for r in run.rows() if r["epoch"] <= ckpt["epoch"]])
        elapsed = ckpt.get("elapsed", 0.0)
    else:
        if root:
            run.reset()
        start, elapsed = 0, 0.0

    def log_epoch(epoch: int, stats: dict) -> dict | None:
        if not root:             # other ranks hold the same model; rank 0 evaluates and logs
            return None
        tr_loss, tr_acc = evaluate(model, loss_fn, x_tr, y_tr, t_tr)
        te_loss, te_acc = evaluate(model, loss_fn, x_te, y_te, t_te)
        row = dict(epoch=epoch, train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss,
                   test_acc=te_acc, **stats)
        row.update(evaluate_run_metrics(built.metrics, model, **probe))
        if diag is not None:
            row.update(diag.measure(model, epoch))
        row["time_s"] = elapsed + (time.perf_counter() - t0)
        run.log(row)
        if _after_log_hook is not None:
            _after_log_hook(run, epoch, row)
        run.save_checkpoint(dict(epoch=epoch, model=model.state_dict(),
                                 optimizer=opt.state_dict(),
                                 diagnostics=None if diag is None else diag.state_dict(),
                                 elapsed=row["time_s"]))
        if on_epoch is not None:
            on_epoch(row)
        if _after_epoch_hook is not None:
            _after_epoch_hook(run, epoch, row)
        return row

    t0 = time.perf_counter()
    row = None
    if start == 0:
        row = log_epoch(0, dict(batch_loss_change_pct=None, exact_frac=None, steps=0))
        start = 1
    n = len(y_tr)
    steps_per_epoch = -(-n // spec.batch_size)
    bar = tqdm(total=max(0, spec.epochs - start + 1) * steps_per_epoch,
               desc=desc or short_name(spec.optimizer), disable=not (progress and root),
               leave=False,
               dynamic_ncols=True)
    try:
        for epoch in range(start, spec.epochs + 1):
            pcts, exacts = [], []
            order = gdata.epoch_permutation(n, spec.seed, epoch).to(dev)
            for s in range(0, n, spec.batch_size):
                idx = order[s:s + spec.batch_size]
                if world > 1:
                    idx = local_rows(idx)
                res = train_step(opt, model, loss_fn, x_tr[idx], t_tr[idx], reduce=reduce)
                if not math.isfinite(res.loss_after):
                    raise FloatingPointError(f"non-finite loss after a step at epoch {epoch}")
                pcts.append(res.pct_change)
                if res.exact is not None:
                    exacts.append(res.exact)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss_after:.3g}")
            row = log_epoch(epoch, dict(
                batch_loss_change_pct=sum(pcts) / len(pcts),
                batch_loss_change_pct_first=pcts[0],
                exact_frac=(sum(exacts) / len(exacts)) if exacts else None,
                steps=epoch * steps_per_epoch))
    finally:
        bar.close()
    if not root:
        return dict(final=None, epochs=spec.epochs, spec=spec.to_dict())
    rows = run.rows()
    final = rows[-1] if rows else row
    result = dict(final=final, epochs=spec.epochs, spec=spec.to_dict())
    run.write_result(result)
    return result
