"""``gnrev reproduce laziness``: is exact Gauss-Newton lazy? (Buffelli et al., NeurIPS 2024, Fig. 4)

The paper says GN trains in the lazy regime: the NTK and the representations barely move. This
experiment maps *where* that holds, one factor at a time around a base configuration
``(M = base.width, init = base.init, α = base.alpha)``:

* **width** axis: every ``M`` in ``widths`` × {exact GN, truncated GN, Adam, SGD};
* **step** (in every axis): ``exact`` = ExactGN's exact minimum-norm step (the registered
  defaults), ``truncated`` = the reference code's truncated-SVD pseudo-inverse, as optimizer
  options (``solver="eigh", rtol=1e-2, atol=1e-5``: singular values ``s < rtol·s_max`` or
  ``s < atol`` dropped; :mod:`gnrev_plugin.optim.solvers`);
* **α** axis: GN (both steps) at every function-space step ``α`` in ``alphas``;
* **init** axis: every optimizer at each init in ``inits``: ``paper`` = ``W ~ N(0, (1e-3)²)``
  (the paper and the reference code), ``fan_in`` = ``W ~ N(0, 1/M)``, i.e. std ``1/√fan-in``
  (``W ∈ R^{d/2×M}`` acts on ``σ(h) ∈ R^M``). Both are ``gnrev.revmlp``'s ``init_std`` option.

Runs shared by several axes (the base configuration) run once; each run's ``config.json`` records
its ``axes``. GN's ``α`` defaults to the reference full-batch value translated to this package's
convention (:func:`~gnrev_plugin.experiments.exact_gn.reference_lr`: ``α = L·lr_ref``), Adam's and
SGD's learning rates are the reference ones. Data: the first ``subset`` training images as one
full batch (``batch_size = None``) or in batches, the first ``test_size`` test images.

Diagnostics (:class:`~gnrev_plugin.experiments.diagnostics.RevMLPDiagnostics`, every ``every``
epochs and at the last one) on the first ``probe_size`` training images: ``ntk_sim_probe`` (the
reference code's random-probe cosine on ``X^(L)``), ``ntk_sim`` (the full logit-NTK Frobenius
alignment, ``ntk_alignment`` in the CSV), the NTK velocity, CKA to init per half-layer, weight
cosine and norm ratio. Layout of ``OUT``: like ``exact-gn``; ``laziness.csv``, ``figures/`` and
``report.md`` are rebuilt from the logs by ``gnrev report OUT``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, short_name
from gnrev_plugin.engine import BatchLossChange, Callback, Diagnostics, WallTime, train_run
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.engine.sweep import Job, run_jobs
from gnrev_plugin.registry import get_registry

from ..diagnostics import RevMLPDiagnostics
from ..exact_gn import reference_lr
from ..exact_gn.run import load_exact_gn_data
from ..presets import get_preset
from .report import build_laziness_report

__all__ = ["MODEL", "INITS", "init_std", "laziness_configs", "laziness_run_specs",
           "load_laziness_data", "run_laziness"]

#: The registered model of every run.
MODEL = "gnrev.revmlp"

#: Initialisations by name: ``init_std`` of ``gnrev.revmlp`` as a function of the width ``M``.
INITS = {"paper": lambda M: 1e-3, "fan_in": lambda M: 1.0 / math.sqrt(M)}


def init_std(init: str, width: int) -> float:
    """The std of ``W`` at init for ``init`` ∈ :data:`INITS` (``fan_in``: ``1/√M``)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {sorted(INITS)}")
    return INITS[init](width)


def _setting(preset: dict) -> str:
    return "full_batch" if preset.get("batch_size") is None else "mini_batch"


def _lr(preset: dict, opt: str) -> float:
    """The learning rate of ``opt`` (short name): the preset's ``lr`` table, else the
    reference's (GN: the base ``α``)."""
    if opt == "exact_gn":
        alpha = preset["base"].get("alpha")
        return alpha if alpha is not None else reference_lr(opt, _setting(preset),
                                                            preset["blocks"])
    table = preset.get("lr", {})
    return table[opt] if opt in table else reference_lr(opt, _setting(preset), preset["blocks"])


def laziness_configs(preset: dict) -> list[dict]:
    """The one-factor-at-a-time configurations of a preset (without seeds), deduplicated:
    ``{optimizer, step, width, init, lr, axes}``; ``step`` is ``"-"`` for non-GN optimizers."""
    base = preset["base"]
    steps = list(preset["steps"])
    combos = [(o, s) for o in preset["optimizers"] for s in (steps if o == "exact_gn" else ["-"])]
    configs: dict[tuple, dict] = {}

    def add(axis, opt, step, width, init, lr):
        key = (opt, step, width, init, float(lr))
        c = configs.setdefault(key, dict(optimizer=opt, step=step, width=width, init=init,
                                         lr=float(lr), axes=[]))
        if axis not in c["axes"]:
            c["axes"].append(axis)

    for M in preset["widths"]:
        for o, s in combos:
            add("width", o, s, M, base["init"], _lr(preset, o))
    for a in sorted({*preset.get("alphas", []), _lr(preset, "exact_gn")}):
        for s in steps:
            if "exact_gn" in preset["optimizers"]:
                add("alpha", "exact_gn", s, base["width"], base["init"], a)
    for init in [base["init"], *[i for i in preset.get("inits", []) if i != base["init"]]]:
        init_std(init, base["width"])     # unknown names fail before any work
        for o, s in combos:
            add("init", o, s, base["width"], init, _lr(preset, o))
    return list(configs.values())


def laziness_run_specs(preset: dict, data: str, device: str = "cpu"
                       ) -> list[tuple[str, RunSpec, dict]]:
    """``[(run name, resolved run spec, extra config)]`` for every seed × configuration (all
    configurations of the first seed first)."""
    reg = get_registry()
    n_train = preset["subset"]
    batch = preset.get("batch_size") or n_train
    runs = []
    configs = laziness_configs(preset)
    for seed in preset["seeds"]:        # seed-major: a partial sweep holds whole seeds first
        for c in configs:
            opt = reg.resolve_name("optimizer", c["optimizer"])
            opt_kwargs = {"lr": c["lr"]}
            if c["step"] != "-":
                if c["step"] not in preset["steps"]:
                    raise ValueError(f"unknown step {c['step']!r}")
                opt_kwargs.update(preset["steps"][c["step"]])
            std = init_std(c["init"], c["width"])
            spec = RunSpec(
                model=MODEL,
                model_kwargs=dict(hidden=c["width"], num_blocks=preset["blocks"],
                                  linear_first_block=preset["linear_first_block"],
                                  init_std=std),
                optimizer=opt, optimizer_kwargs=opt_kwargs, loss="cross_entropy", dataset=data,
                metrics=[], seed=seed, device=device, epochs=preset["epochs"], batch_size=batch,
                probe_size=preset["probe_size"]).resolve(reg)
            o = short_name(opt)
            head = f"{o}-{c['step']}" if c["step"] != "-" else o
            name = f"{head}/M{c['width']}/{c['init']}/lr{c['lr']:g}/seed{seed}"
            runs.append((name, spec, dict(
                experiment_run="laziness", optimizer=o, step=c["step"], width=c["width"],
                init=c["init"], init_std=std, lr=c["lr"], seed=seed, data=data,
                axes=list(c["axes"]))))
    return runs


def load_laziness_data(preset: dict, data: str, data_dir: str | None) -> gdata.Dataset:
    """The training subset (first ``subset`` images) and test subset (first ``test_size``),
    loaded through the registry by :func:`~gnrev_plugin.experiments.exact_gn.run.load_exact_gn_data`
    (padded to the RevMLP's input multiple)."""
    sets = load_exact_gn_data(dict(full_batch=dict(subset=preset["subset"]),
                                   mini_batch=dict(train_size=preset["subset"],
                                                   test_size=preset.get("test_size"))),
                              data, data_dir)
    return sets["full_batch"]


def run_laziness(out: str | Path, preset_name: str = "quick", data: str = "mnist",
                 data_dir: str | None = None, resume: bool = False, progress: bool = True,
                 preset: dict | None = None, device: str = "cpu",
                 callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run (or resume) the laziness sweep into ``out`` and rebuild the report; returns the
    per-run statuses. ``callbacks`` join every training run's own (after them), e.g. to stop the
    sweep."""
    out = Path(out)
    preset = preset if preset is not None else get_preset("laziness", preset_name)
    specs = laziness_run_specs(preset, data, device)   # unknown names fail before any work
    ds = load_laziness_data(preset, data, data_dir)
    top = RunDir(out)
    top.write_config(dict(experiment="laziness", preset_name=preset_name, preset=preset,
                          data=data, data_info=ds.info, data_describe=ds.describe()),
                     resume=resume)
    if not resume:
        (out / "sweep.jsonl").unlink(missing_ok=True)
    factory = RevMLPDiagnostics.factory(preset["probe_size"], probe_ntk=True,
                                        num_probes=preset.get("num_probes", 100),
                                        every=preset.get("every", 1))
    jobs = []
    for name, spec, extra in specs:
        run = RunDir(out / "runs" / name)

        def fn(spec=spec, run=run, name=name, extra=extra):
            own = [BatchLossChange(), Diagnostics(factory), WallTime()]
            return train_run(spec, ds, run, [*own, *callbacks],
                             resume=resume, progress=progress, desc=name,
                             extra_config={"data_info": ds.info, **extra})
        jobs.append(Job(name, run.path, fn))
    statuses = run_jobs(out, jobs, progress=progress, desc="laziness runs")
    build_laziness_report(out, top.read_config())
    return statuses
