"""``gnrev reproduce exact-gn``: exact GN vs Adam vs SGD on a RevMLP (Buffelli et al., NeurIPS 2024).

Two settings, each with every optimizer and seed:

* ``full_batch``: the **first** ``subset`` (1024) training images as one batch (paper Fig. 1);
* ``mini_batch``: the training split in batches (paper Figs. 2–4).

Every run is a :class:`~gnrev_plugin.build.RunSpec` (model ``gnrev.revmlp``, optimizer
``gnrev.exact_gn`` / ``gnrev.adam`` / ``gnrev.sgd`` or any registered name, cross-entropy) trained
by :func:`~gnrev_plugin.engine.runner.train_run`, which builds it through the registry and
records the resolved spec (including the GN ``rank_policy``) in the run's ``config.json``.

**Step-size convention** (stated once, used everywhere): ``lr`` of ``gnrev.exact_gn`` is the
function-space step ``α`` of :class:`gnrev_plugin.optim.ExactGN`: the linearised logit change on
the batch is ``J Δθ = −α ε`` with ``ε = softmax(F) − onehot(y)`` (cross-entropy, the reference's
``use_identity`` target). The reference code applies every block's full right-inverse update and
steps with SGD, so its effective step is ``α = L · lr_ref`` (``L`` blocks); :func:`reference_lr`
translates its released learning rates this way (MNIST, ``L = 2``: full batch ``lr_ref = 0.5 → α =
1.0``; mini-batch ``0.1 → α = 0.2``). Adam and SGD use the reference values unchanged (Adam
``1e-4``, SGD ``0.1``; no momentum, no weight decay). A preset's ``lr`` table overrides them; an
optimizer outside the paper's three runs with its registered default ``lr``.

Layout of ``OUT``: ``config.json`` (the sweep), ``sweep.jsonl`` (status of every run),
``runs/<setting>/<optimizer>/seed<k>/{config.json, log.jsonl, checkpoint.pt, result.json}``,
``figures/*.png`` and ``report.md`` (rebuilt from the logs by ``gnrev report OUT``).

**Resources.** Next to each run's ``log.jsonl``, :func:`record_resources` appends one row per
logged epoch to ``resources.jsonl``: the run's training time so far (``time_s``, the log's clock,
summed over resumed sessions), the wall-clock time, the process's peak resident set size so far
(``getrusage(RUSAGE_SELF).ru_maxrss``; the sweep runs in one process, so it is the peak of this
run and of the runs before it in the same session), the CPU seconds the process spent since the
previous row, the 1/5/15-minute load averages of the machine (others' jobs included) and the
number of torch threads. The report sums and summarises them per setting.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, load_data, short_name
from gnrev_plugin.engine import BatchLossChange, Callback, Diagnostics, EpochEnd, WallTime, train_run
from gnrev_plugin.engine.rundir import RunDir, append_jsonl
from gnrev_plugin.engine.sweep import Job, run_jobs
from gnrev_plugin.registry import get_registry

from ..diagnostics import RevMLPDiagnostics
from ..presets import get_preset
from .report import build_exact_gn_report

__all__ = ["SETTINGS", "MODEL", "REFERENCE_LR", "RESOURCES_LOG", "reference_lr",
           "load_exact_gn_data", "exact_gn_run_specs", "record_resources", "run_exact_gn"]

SETTINGS = ("full_batch", "mini_batch")

#: The registered model of every run.
MODEL = "gnrev.revmlp"

#: Learning rates of the released MNIST configs, in the reference's convention (see the module
#: docstring), by setting and registered optimizer name.
REFERENCE_LR = {
    "full_batch": {"gnrev.exact_gn": 0.5, "gnrev.adam": 1e-4, "gnrev.sgd": 0.1},
    "mini_batch": {"gnrev.exact_gn": 0.1, "gnrev.adam": 1e-4, "gnrev.sgd": 0.1},
}


#: Per-epoch resource rows of a run (see the module docstring).
RESOURCES_LOG = "resources.jsonl"


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def record_resources(run: RunDir) -> EpochEnd:
    """A callback for :func:`~gnrev_plugin.engine.runner.train_run` that appends
    ``{epoch, time_s, wall_clock, maxrss_mib, cpu_s, load1, load5, load15, threads}`` to the
    run's ``resources.jsonl``; ``cpu_s`` is the process's user + system CPU time since the
    previous row of this session (since the call for the first one). On resume, rows past the
    resumed epoch are dropped first (as the training log is), so each epoch has one row."""
    last_cpu = [_cpu_seconds()]
    cut = [False]

    def on_epoch(row: dict) -> None:
        if not cut[0]:   # the first row of a session: drop rows of epochs being redone
            cut[0] = True
            keep = [r for r in run.rows(RESOURCES_LOG) if r["epoch"] < row["epoch"]]
            if len(keep) != len(run.rows(RESOURCES_LOG)):
                run.truncate_log(keep, RESOURCES_LOG)
        now = _cpu_seconds()
        load = os.getloadavg()
        append_jsonl(run.file(RESOURCES_LOG), dict(
            epoch=row["epoch"], time_s=row.get("time_s"), wall_clock=time.time(),
            maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            cpu_s=now - last_cpu[0], load1=load[0], load5=load[1], load15=load[2],
            threads=torch.get_num_threads()))
        last_cpu[0] = now
    return EpochEnd(on_epoch)


def reference_lr(optimizer: str, setting: str, num_blocks: int) -> float:
    """The reference learning rate of ``optimizer`` (a registered name; the ``gnrev.`` prefix is
    optional) in this package's convention: ``α = L · lr_ref`` for exact GN, ``lr_ref`` else."""
    if setting not in REFERENCE_LR:
        raise ValueError(f"setting must be one of {sorted(REFERENCE_LR)}, got {setting!r}")
    name = optimizer if "." in optimizer else f"gnrev.{optimizer}"
    if name not in REFERENCE_LR[setting]:
        raise ValueError(f"the reference configs have no learning rate for {optimizer!r}; they "
                         f"cover {', '.join(REFERENCE_LR[setting])}")
    lr = REFERENCE_LR[setting][name]
    return lr * num_blocks if name == "gnrev.exact_gn" else lr


def _truncate(ds: gdata.Dataset, train_size: int | None, test_size: int | None) -> gdata.Dataset:
    info = dict(ds.info)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if train_size is not None and train_size < len(y_tr):
        x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
        info["train_subset"] = f"first {train_size}"
    if test_size is not None and test_size < len(y_te):
        x_te, y_te = x_te[:test_size], y_te[:test_size]
        info["test_subset"] = f"first {test_size}"
    return gdata.Dataset(ds.name, x_tr, y_tr, x_te, y_te, ds.num_classes, info)


def load_exact_gn_data(preset: dict, data: str, data_dir: str | None
                       ) -> dict[str, gdata.Dataset]:
    """The full-batch and mini-batch datasets of a preset, loaded through the registry and padded
    to the RevMLP's input multiple."""
    multiple = get_registry().entry("model", MODEL).input_multiple
    ds = load_data(data, {} if data_dir is None else {"data_dir": str(data_dir)},
                   input_multiple=multiple)
    mb = preset["mini_batch"]
    out = {"mini_batch": _truncate(ds, mb.get("train_size"), mb.get("test_size"))}
    full = _truncate(ds, None, mb.get("test_size"))
    out["full_batch"] = gdata.full_batch_subset(full, preset["full_batch"]["subset"])
    return out


def exact_gn_run_specs(preset: dict, data: str, device: str = "cpu"
                       ) -> list[tuple[str, RunSpec, dict]]:
    """``[(run name, run spec, extra config)]`` for every setting × seed × optimizer, in the
    order the sweep runs them: full batch before mini-batch and, within a setting, every
    optimizer at the first seed before the next seed (a sweep stopped early compares the
    optimizers on the same seeds).

    The spec is resolved through the registry (registered names, every default filled in); the
    extra config records the ``setting`` and where the learning rate came from.
    """
    reg = get_registry()
    runs = []
    for setting in SETTINGS:
        s = preset[setting]
        batch = s["subset"] if setting == "full_batch" else s["batch_size"]
        lrs = {}
        for opt in preset["optimizers"]:
            name = reg.resolve_name("optimizer", opt)
            override = preset.get("lr", {}).get(setting, {}).get(short_name(name))
            if override is not None:
                lrs[name] = ("preset", {"lr": override})
            elif name in REFERENCE_LR[setting]:
                lrs[name] = ("reference",
                             {"lr": reference_lr(name, setting, preset["blocks"])})
            else:
                lrs[name] = ("registered default", {})
        # seed-major: a sweep stopped early has every optimizer at the same seeds
        for seed in preset["seeds"]:
            for name, (lr_from, opt_kwargs) in lrs.items():
                spec = RunSpec(
                    model=MODEL,
                    model_kwargs=dict(hidden=preset["hidden"], num_blocks=preset["blocks"],
                                      linear_first_block=preset["linear_first_block"]),
                    optimizer=name, optimizer_kwargs=opt_kwargs, loss="cross_entropy",
                    dataset=data, metrics=[], seed=seed, device=device, epochs=s["epochs"],
                    batch_size=batch, probe_size=preset["probe_size"]).resolve(reg)
                runs.append((f"{setting}/{short_name(name)}/seed{seed}", spec,
                             dict(setting=setting, lr_from=lr_from)))
    return runs


def run_exact_gn(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                 data_dir: str | None = None, resume: bool = False, progress: bool = True,
                 preset: dict | None = None, device: str = "cpu",
                 callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run (or resume) the whole sweep into ``out``, rebuild the report; returns the per-run
    statuses. ``callbacks`` join every training run's own (after them), e.g. to stop the
    sweep."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("exact-gn", preset_name)
    specs = exact_gn_run_specs(preset, data, device)   # unknown names fail before any work
    datasets = load_exact_gn_data(preset, data, data_dir)
    top = RunDir(out)
    top.write_config(dict(experiment="exact-gn", preset_name=preset_name, preset=preset,
                          data=data, data_info={k: v.info for k, v in datasets.items()},
                          data_describe={k: v.describe() for k, v in datasets.items()}),
                     resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    jobs = []
    for name, spec, extra in specs:
        run = RunDir(out / "runs" / name)
        ds = datasets[extra["setting"]]

        def fn(spec=spec, run=run, ds=ds, name=name, extra=extra):
            diagnostics = Diagnostics(RevMLPDiagnostics.factory(spec.probe_size))
            own = [BatchLossChange(), diagnostics, WallTime(), record_resources(run)]
            return train_run(spec, ds, run, [*own, *callbacks], resume=resume, progress=progress,
                             desc=name, extra_config={"data_info": ds.info, **extra})
        jobs.append(Job(name, run.path, fn))
    statuses = run_jobs(out, jobs, progress=progress, desc="exact-gn runs")
    build_exact_gn_report(out, top.read_config())
    return statuses
