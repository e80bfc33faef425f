"""Train one RevMLP with one optimizer and log every epoch; resumable exactly.

Per epoch (epoch 0 = the initial model) one row goes to ``log.jsonl``: train/test loss and
accuracy on the whole train and test sets, the epoch's mean per-batch percentage loss change
``100 (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)``, the fraction of exact GN steps, wall time, and the
diagnostics (NTK, CKA, weight change; :mod:`gnrev_plugin.experiments.diagnostics`).

Resume is exact: the batch order of an epoch depends only on ``(seed, epoch)``
(:func:`gnrev_plugin.data.epoch_permutation`), the model, optimizer and diagnostic states are
checkpointed after every epoch (after its log row), and on resume the log is cut back to the
checkpoint's epoch. Timings (``time_s``) naturally differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gnrev_plugin import data as gdata
from gnrev_plugin.nn import RevMLP

from .optimizers import make_optimizer, train_step
from .rundir import RunDir

__all__ = ["build_model", "evaluate", "train_run", "RunInterrupted"]


class RunInterrupted(BaseException):
    """Raised by test hooks to simulate a killed run (a ``BaseException``, like
    ``KeyboardInterrupt``, so sweeps do not record it as a crashed config)."""


def build_model(cfg: dict, in_features: int, num_classes: int) -> RevMLP:
    """The RevMLP of a run config (deterministic given ``cfg['seed']``)."""
    return RevMLP(in_features=in_features, hidden=cfg["hidden"], num_blocks=cfg["blocks"],
                  num_classes=num_classes, activation=cfg.get("activation", "relu"),
                  linear_first_block=cfg.get("linear_first_block", False),
                  init_std=cfg.get("init_std", 1e-3), seed=cfg["seed"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             chunk: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (argmax of the logits) over ``(x, y)``."""
    total_loss, correct = 0.0, 0
    for s in range(0, len(y), chunk):
        out = model(x[s:s + chunk])
        total_loss += float(F.cross_entropy(out, y[s:s + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[s:s + chunk]).sum())
    return total_loss / len(y), correct / len(y)


#: Called after each epoch's log row and checkpoint: ``hook(run, epoch, row)``. Tests replace it
#: to simulate a crash at a given epoch.
_after_epoch_hook: Callable[[RunDir, int, dict], None] | None = None


def train_run(
    cfg: dict,
    dataset: gdata.Dataset,
    run: RunDir,
    resume: bool = False,
    progress: bool = True,
    diagnostics_factory: Callable | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "",
) -> dict:
    """Train per ``cfg`` and return the result (the final log row plus bookkeeping).

    ``cfg`` keys: ``optimizer``, ``lr``, ``epochs``, ``batch_size``, ``hidden``, ``blocks``,
    ``seed`` (and optionally ``activation``, ``linear_first_block``, ``init_std``,
    ``rank_policy``). ``diagnostics_factory(model_init, dataset, cfg)`` returns an object with
    ``measure(model, epoch) -> dict``, ``state_dict()`` and ``load_state_dict(state)``.
    """
    from tqdm.auto import tqdm

    run.write_config(cfg, resume=resume)
    if resume and run.done:
        return run.read_result()
    torch.manual_seed(cfg["seed"])
    d, C = dataset.in_features, dataset.num_classes
    model = build_model(cfg, d, C)
    opt = make_optimizer(cfg["optimizer"], model, cfg["lr"], cfg.get("rank_policy", "warn"))
    diag = (diagnostics_factory(build_model(cfg, d, C), dataset, cfg)
            if diagnostics_factory else None)

    ckpt = run.load_checkpoint() if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if diag is not None and ckpt.get("diagnostics") is not None:
            diag.load_state_dict(ckpt["diagnostics"])
        start = ckpt["epoch"] + 1
        run.truncate_log([r for r in run.rows() if r["epoch"] <= ckpt["epoch"]])
        elapsed = ckpt.get("elapsed", 0.0)
    else:
        run.reset()
        start, elapsed = 0, 0.0

    def log_epoch(epoch: int, stats: dict) -> dict:
        tr_loss, tr_acc = evaluate(model, dataset.x_train, dataset.y_train)
        te_loss, te_acc = evaluate(model, dataset.x_test, dataset.y_test)
        row = dict(epoch=epoch, train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss,
                   test_acc=te_acc, **stats)
        if diag is not None:
            row.update(diag.measure(model, epoch))
        row["time_s"] = elapsed + (time.perf_counter() - t0)
        run.log(row)
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
    n = len(dataset.y_train)
    steps_per_epoch = -(-n // cfg["batch_size"])
    bar = tqdm(total=(cfg["epochs"] - start + 1) * steps_per_epoch, desc=desc or cfg["optimizer"],
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for epoch in range(start, cfg["epochs"] + 1):
            pcts, exacts = [], []
            for xb, yb in gdata.minibatches(dataset.x_train, dataset.y_train, cfg["batch_size"],
                                            seed=cfg["seed"], epoch=epoch):
                res = train_step(opt, model, xb, yb)
                if not (torch.isfinite(torch.tensor(res.loss_after))):
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
    rows = run.rows()
    final = rows[-1] if rows else row
    result = dict(final=final, epochs=cfg["epochs"], config=cfg)
    run.write_result(result)
    return result
