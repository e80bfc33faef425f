"""``gnrev reproduce exact-gn``: exact GN vs Adam vs SGD on a RevMLP (Buffelli et al., NeurIPS 2024).

Two settings, each with every optimizer and seed:

* ``full_batch``: the **first** ``subset`` (1024) training images as one batch (paper Fig. 1);
* ``mini_batch``: the training split in batches (paper Figs. 2–4).

Layout of ``OUT``: ``config.json`` (the sweep), ``sweep.jsonl`` (status of every run),
``runs/<setting>/<optimizer>/seed<k>/{config.json, log.jsonl, checkpoint.pt, result.json}``,
``figures/*.png`` and ``report.md`` (rebuilt from the logs by ``gnrev report OUT``).
"""

from __future__ import annotations

from pathlib import Path

from gnrev_plugin import data as gdata

from .diagnostics import RevMLPDiagnostics
from .optimizers import reference_lr
from .presets import get_preset
from .rundir import RunDir
from .sweep import Job, run_jobs
from .training import train_run

__all__ = ["load_exact_gn_data", "exact_gn_run_configs", "run_exact_gn"]

SETTINGS = ("full_batch", "mini_batch")


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
    """The full-batch and mini-batch datasets of a preset."""
    ds = gdata.pad_to_even(gdata.load_dataset(data, data_dir=data_dir))
    mb = preset["mini_batch"]
    out = {"mini_batch": _truncate(ds, mb.get("train_size"), mb.get("test_size"))}
    full = _truncate(ds, None, mb.get("test_size"))
    out["full_batch"] = gdata.full_batch_subset(full, preset["full_batch"]["subset"])
    return out


def exact_gn_run_configs(preset: dict, data: str) -> list[tuple[str, dict]]:
    """``[(run name, run config)]`` for every setting × optimizer × seed."""
    runs = []
    for setting in SETTINGS:
        s = preset[setting]
        batch = s["subset"] if setting == "full_batch" else s["batch_size"]
        for opt in preset["optimizers"]:
            for seed in preset["seeds"]:
                cfg = dict(setting=setting, optimizer=opt,
                           lr=preset.get("lr", {}).get(setting, {}).get(opt)
                           or reference_lr(opt, setting, preset["blocks"]),
                           epochs=s["epochs"], batch_size=batch, hidden=preset["hidden"],
                           blocks=preset["blocks"],
                           linear_first_block=preset["linear_first_block"], seed=seed,
                           data=data, probe_size=preset["probe_size"], rank_policy="warn")
                runs.append((f"{setting}/{opt}/seed{seed}", cfg))
    return runs


def run_exact_gn(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                 data_dir: str | None = None, resume: bool = False, progress: bool = True,
                 preset: dict | None = None) -> list[dict]:
    """Run (or resume) the whole sweep into ``out``; returns the per-run statuses."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("exact-gn", preset_name)
    datasets = load_exact_gn_data(preset, data, data_dir)
    top = RunDir(out)
    top.write_config(dict(experiment="exact-gn", preset_name=preset_name, preset=preset,
                          data=data, data_info={k: v.info for k, v in datasets.items()},
                          data_describe={k: v.describe() for k, v in datasets.items()}),
                     resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    jobs = []
    for name, cfg in exact_gn_run_configs(preset, data):
        run = RunDir(out / "runs" / name)
        ds = datasets[cfg["setting"]]

        def fn(cfg=cfg, run=run, ds=ds, name=name):
            return train_run(cfg, ds, run, resume=resume, progress=progress,
                             diagnostics_factory=RevMLPDiagnostics.factory(cfg["probe_size"]),
                             desc=name)
        jobs.append(Job(name, run.path, fn))
    statuses = run_jobs(out, jobs, progress=progress, desc="exact-gn runs")
    from .report import build_report

    build_report(out)
    return statuses
