"""``gnrev reproduce leaderboard``: every contestant on the same problems, tuned the same way.

Per problem and contestant (:mod:`.presets`): ``trials`` tuning runs (trial 0: the registry's
defaults; then seeded random draws from the contestant's search space), selected on the
validation split, then one final run per seed of the selected configuration. Every run is a
:class:`~gnrev_plugin.build.RunSpec` trained by :func:`~gnrev_plugin.engine.train_run` (built
through the registry; a diverging run ends at its last finite row,
:class:`~gnrev_plugin.engine.StopOnDivergence`, and counts as diverged), scheduled by
:func:`~gnrev_plugin.engine.run_jobs` (a crashing configuration never stops the others).
Then :func:`probe_step_costs` measures, with the
selected configurations, the time of one :func:`~gnrev_plugin.stepping.train_step` (median of
interleaved rounds over the contestants) and the memory (optimizer state bytes; the peak-RSS
increase on CPU via ``/proc/self/clear_refs``, ``torch.cuda.max_memory_allocated`` on CUDA).

Layout of ``OUT``: ``config.json`` (the preset), ``sweep.jsonl``, ``selection.jsonl``,
``probes.jsonl``, ``tuning/<problem>/<contestant>/trial<k>/`` and
``final/<problem>/<contestant>/seed<s>/`` (each a run directory: ``config.json``, ``log.jsonl``),
``figures/`` and ``report.md`` (:func:`~.report.build_leaderboard_study_report`, from the logs).
The test split is never read: each problem's "test" slot holds a validation split carved from the
training data (rows' ``test_acc`` / ``test_loss`` are validation values).
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, build, load_data, loss_targets
from gnrev_plugin.engine import BatchLossChange, Callback, StopOnDivergence, WallTime, train_run
from gnrev_plugin.engine.rundir import RunDir, append_jsonl, read_jsonl
from gnrev_plugin.engine.sweep import Job, run_jobs
from gnrev_plugin.registry import get_registry
from gnrev_plugin.stepping import train_step

from .presets import CONTESTANTS, MISSING_PROBLEMS, SEARCH_SPACES, get_leaderboard_preset

__all__ = ["run_leaderboard_study", "load_problem_data", "optimizer_of", "sample_trials",
           "select_trial", "probe_step_costs", "read_selection", "SELECTION_LOG", "PROBE_LOG"]

SELECTION_LOG = "selection.jsonl"
PROBE_LOG = "probes.jsonl"


def optimizer_of(contestant: str, problem: dict) -> str:
    """The registry name contestant ``contestant`` runs on ``problem`` (``gn``: the problem's)."""
    return CONTESTANTS[contestant] or problem["gn"]


def load_problem_data(problem: dict, data_dir: str | None = None) -> gdata.Dataset:
    """The problem's train and validation splits, both from its dataset's *training* data (the
    validation split is the last ``val_size`` training samples; the test split is not used).

    Args:
        problem: a preset's problem dict.
        data_dir: MNIST folder (``None``: the default).

    Returns:
        A :class:`~gnrev_plugin.data.Dataset` whose ``x_test``/``y_test`` are the validation split.
    """
    multiple = get_registry().entry("model", problem["model"]).input_multiple
    kwargs = {"data_dir": str(data_dir)} if data_dir and problem["dataset"] == "gnrev.mnist" else {}
    ds = load_data(problem["dataset"], kwargs, input_multiple=multiple)
    n_val = problem["val_size"]
    if n_val >= len(ds.y_train):
        raise ValueError(f"val_size {n_val} leaves no training data ({len(ds.y_train)} samples)")
    x_tr, y_tr = ds.x_train[:-n_val], ds.y_train[:-n_val]
    if problem.get("train_size"):
        x_tr, y_tr = x_tr[:problem["train_size"]], y_tr[:problem["train_size"]]
    info = {**ds.info, "train": f"first {len(y_tr)} training samples",
            "validation": f"last {n_val} training samples (in the test slot)", "test": "not used"}
    return gdata.Dataset(ds.name, x_tr, y_tr, ds.x_train[-n_val:], ds.y_train[-n_val:],
                         ds.num_classes, info)


def sample_trials(contestant: str, problem_name: str, trials: int, seed: int) -> list[dict]:
    """Trial 0 = ``{}`` (the registry defaults), then ``trials − 1`` draws from the search space,
    seeded by ``(seed, problem, contestant)``.

    Args:
        contestant: a key of :data:`~.presets.SEARCH_SPACES`.
        problem_name: the problem (part of the seed).
        trials: the budget.
        seed: the tuning seed.

    Returns:
        One options dict per trial.
    """
    rng = np.random.default_rng([seed, zlib.crc32(problem_name.encode()),
                                 zlib.crc32(contestant.encode())])
    out: list[dict] = [{}]
    for _ in range(trials - 1):
        draw = {}
        for key, (kind, *args) in SEARCH_SPACES[contestant].items():
            if kind == "log":
                draw[key] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
            else:
                draw[key] = args[0][int(rng.integers(len(args[0])))]
        out.append(draw)
    return out


def select_trial(trial_dirs: list[Path]) -> int | None:
    """Index of the trial with the best final validation accuracy (ties: lower final train loss);
    diverged trials never win; ``None`` when no trial finished without diverging."""
    best, best_key = None, None
    for k, path in enumerate(trial_dirs):
        rows = RunDir(path).rows() if RunDir(path).done else []
        if (not rows or rows[-1].get("diverged") or rows[-1].get("test_acc") is None
                or rows[-1].get("train_loss") is None):
            continue
        key = (-rows[-1]["test_acc"], rows[-1]["train_loss"])
        if best_key is None or key < best_key:
            best, best_key = k, key
    return best


def _spec(problem: dict, optimizer: str, options: dict, seed: int, device: str, n_train: int) -> RunSpec:
    batch = n_train if problem.get("full_batch") else problem["batch_size"]
    return RunSpec(model=problem["model"], model_kwargs=dict(problem.get("model_kwargs", {})),
                   optimizer=optimizer, optimizer_kwargs=dict(options), loss="cross_entropy",
                   dataset=problem["dataset"], seed=seed, device=device, epochs=problem["epochs"],
                   batch_size=batch, probe_size=min(8, n_train), metrics=[])


def _job(out: Path, kind: str, pname: str, contestant: str, tag: str, spec: RunSpec,
         ds: gdata.Dataset, resume: bool, progress: bool, callbacks: Sequence[Callback]) -> Job:
    path = out / kind / pname / contestant / tag
    setting = f"{pname} {kind}"

    def fn() -> None:
        run = RunDir(path)
        own = [BatchLossChange(), StopOnDivergence(), WallTime()]
        train_run(spec, ds, run, [*own, *callbacks], resume=resume and run.read_config() is not None,
                  progress=progress, desc=f"{pname}/{contestant}/{tag}",
                  extra_config={"setting": setting, "problem": pname, "contestant": contestant,
                                "data_info": ds.info})
    return Job(f"{kind}/{pname}/{contestant}/{tag}", path, fn)


def _available(contestants: list[str], problems: dict) -> tuple[list[str], dict[str, str]]:
    reg = get_registry()
    ok, missing = [], {}
    for c in contestants:
        names = {optimizer_of(c, p) for p in problems.values()}
        absent = [n for n in sorted(names) if n not in reg]
        unavailable = [n for n in sorted(names) if n in reg
                       and reg.entry("optimizer", n).description.startswith("UNAVAILABLE")]
        if absent or unavailable:
            missing[c] = f"not registered: {absent}" if absent else reg.entry(
                "optimizer", unavailable[0]).description
        else:
            ok.append(c)
    return ok, missing


def run_leaderboard_study(out: Path, preset_name: str = "smoke", data: str = "mnist",
                          data_dir: str | None = None, resume: bool = False, progress: bool = True,
                          device: str = "cpu", callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Run the study of preset ``preset_name`` into ``out`` and write its report.

    Args:
        out: the study directory.
        preset_name: ``smoke``, ``quick`` or ``paper``.
        data: unused (each problem names its dataset); kept for ``gnrev reproduce``'s interface.
        data_dir: MNIST folder.
        resume: continue an interrupted study.
        progress: show progress bars.
        device: torch device of every run.
        callbacks: engine callbacks joining every run's own (after them).

    Returns:
        One status dict per run.
    """
    from .report import build_leaderboard_study_report

    out = Path(out)
    preset = get_leaderboard_preset(preset_name)
    contestants, missing = _available(preset["contestants"], preset["problems"])
    config = dict(experiment="leaderboard", preset_name=preset_name, preset=preset, device=device,
                  contestants=contestants, missing_contestants=missing,
                  missing_problems=MISSING_PROBLEMS)
    RunDir(out).write_config(config, resume=resume)
    datasets = {p: load_problem_data(spec, data_dir) for p, spec in preset["problems"].items()}
    jobs, trial_dirs = [], {}
    for pname, problem in preset["problems"].items():
        ds = datasets[pname]
        for c in contestants:
            trials = sample_trials(c, pname, preset["trials"], preset["tuning_seed"])
            trial_dirs[pname, c] = [out / "tuning" / pname / c / f"trial{k}" for k in range(len(trials))]
            for k, options in enumerate(trials):
                spec = _spec(problem, optimizer_of(c, problem), options, preset["tuning_seed"], device,
                             len(ds.y_train))
                jobs.append(_job(out, "tuning", pname, c, f"trial{k}", spec, ds, resume, progress,
                                 callbacks))
    statuses = run_jobs(out, jobs, progress=progress, desc="leaderboard tuning")
    jobs, selected = [], {}
    for (pname, c), dirs in trial_dirs.items():
        k = select_trial(dirs)
        options = None if k is None else RunDir(dirs[k]).read_config()["spec"]["optimizer_kwargs"]
        append_jsonl(out / SELECTION_LOG, dict(problem=pname, contestant=c, trial=k, options=options))
        if k is None:
            continue
        selected[pname, c] = options
        problem, ds = preset["problems"][pname], datasets[pname]
        for seed in preset["seeds"]:
            spec = _spec(problem, optimizer_of(c, problem), options, seed, device, len(ds.y_train))
            jobs.append(_job(out, "final", pname, c, f"seed{seed}", spec, ds, resume, progress,
                                 callbacks))
    statuses += run_jobs(out, jobs, progress=progress, desc="leaderboard final seeds")
    probe_step_costs(out, preset, datasets, selected, device)
    build_leaderboard_study_report(out, RunDir(out).read_config())
    return statuses


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def _built(problem: dict, optimizer: str, options: dict, ds: gdata.Dataset, device: str):
    spec = _spec(problem, optimizer, options, 0, device, len(ds.y_train))
    b = build(spec, in_features=ds.in_features, num_classes=ds.num_classes, initial_model=False)
    n = spec.batch_size
    x = ds.x_train[:n].to(device)
    t = loss_targets("cross_entropy", ds.y_train[:n].to(device), ds.num_classes)
    return b, x, t


def probe_step_costs(out: Path, preset: dict, datasets: dict, selected: dict, device: str) -> None:
    """Append one row per (problem, contestant) to ``OUT/probes.jsonl``: the median seconds of one
    training step over interleaved rounds, the optimizer state bytes after the steps, and the peak
    memory increase of building the run and stepping it."""
    rounds = preset["probe_rounds"]
    for pname, problem in preset["problems"].items():
        ds = datasets[pname]
        chosen = [c for (p, c) in selected if p == pname]
        built = {}
        for c in chosen:
            cuda = torch.device(device).type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if cuda else _rss_kib("VmRSS")
            reset = cuda or _reset_peak_rss()
            b, x, t = _built(problem, optimizer_of(c, problem), selected[pname, c], ds, device)
            for _ in range(2):                                   # warm-up, creates the state
                train_step(b.optimizer, b.model, b.loss_fn, x, t, reevaluate=False)
            if cuda:
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                hwm = _rss_kib("VmHWM")
                peak = (hwm - base) / 1024 if reset and hwm is not None and base is not None else None
            built[c] = (b, x, t, peak)
        times: dict[str, list[float]] = {c: [] for c in chosen}
        for _ in range(rounds):
            for c in chosen:
                b, x, t, _ = built[c]
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                train_step(b.optimizer, b.model, b.loss_fn, x, t, reevaluate=False)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                times[c].append(time.perf_counter() - t0)
        for c in chosen:
            b, _, _, peak = built[c]
            append_jsonl(out / PROBE_LOG, dict(
                problem=pname, contestant=c, optimizer=optimizer_of(c, problem), rounds=rounds,
                step_s=statistics.median(times[c]), state_mib=_state_bytes(b.optimizer) / 2**20,
                peak_mib=peak, memory=("cuda max_memory_allocated" if torch.device(device).type == "cuda"
                                       else "VmHWM − VmRSS (clear_refs)")))


def read_selection(out: Path) -> list[dict]:
    """The latest selection row per (problem, contestant)."""
    latest = {(r["problem"], r["contestant"]): r for r in read_jsonl(Path(out) / SELECTION_LOG)}
    return list(latest.values())

