"""Exact resume of the reproductions that train on the engine (conditioning, NME, sharpness):
each sweep is killed by a callback at some point of a run, resumed with ``resume=True``, and its
logs and final checkpoints must equal those of an uninterrupted sweep bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gnrev_plugin.engine import Callback, Interrupted, RunDir
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.experiments.conditioning import run_conditioning
from gnrev_plugin.experiments.nme import run_nme
from gnrev_plugin.experiments.sharpness import run_sharpness

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONDITIONING = dict(
    input_dim=8, num_classes=4, num_samples=64, seeds=[0], depths=[2, 3], widths=[16],
    width_factors=[4], residual=dict(depth=3, width=8, betas=[0.0, 1.0]),
    training=dict(widths=[6, 9], num_samples=24, epochs=7, lr=0.1, batch_size=None, every=2,
                  input_dim=6),
)
NME = dict(activations=["gelu"], input_dim=5, hidden=[4, 4], num_samples=40, probe_samples=8,
           epochs=5, lr=0.1, batch_size=16, every=2, seeds=[0, 1], loss="cross_entropy",
           exact_max_dim=1500)
SHARPNESS = dict(
    datasets=["mnist1d"], num_train=40, num_test=16, input_dim=5, hidden=[4],
    activations=["gelu"], ablate=[], methods=["gnrev.sam", "gnrev.weight_noise"],
    rhos=[0.5], sigma2s=[0.05], samples=1, seeds=[0], epochs=4, lr=0.5, batch_size=16,
    every=2, probe_size=8, curvature_seeds=[0], curvature_methods=["gnrev.weight_noise"],
    exact_max_dim=2000, trace_matvecs=30,
)


class Kill(Callback):
    """Raise :class:`Interrupted` at ``hook`` of ``epoch`` in the ``nth`` run that gets there
    (one instance is shared by every run of a sweep)."""

    def __init__(self, hook: str, epoch: int, nth: int = 1) -> None:
        self.hook, self.epoch, self.nth, self.seen = hook, epoch, nth, 0

    def _maybe(self, hook: str, epoch: int) -> None:
        if hook == self.hook and epoch == self.epoch:
            self.seen += 1
            if self.seen == self.nth:
                raise Interrupted(f"killed at {hook} of epoch {epoch}")

    def on_epoch_start(self, state, epoch):
        self._maybe("epoch_start", epoch)

    def on_step(self, state, epoch, result):
        self._maybe("step", epoch)

    def on_checkpoint(self, state, row):
        self._maybe("checkpoint", row["epoch"])


def _logs(out: Path) -> dict[str, list[dict]]:
    """Every run's log (no row holds a wall time in these experiments)."""
    return {str(p.relative_to(out)): read_jsonl(p) for p in sorted((out / "runs").rglob("log.jsonl"))}


def _assert_same_runs(cut: Path, full: Path) -> None:
    logs = _logs(full)
    assert logs and _logs(cut) == logs
    for log in logs:
        a, b = RunDir((cut / log).parent), RunDir((full / log).parent)
        assert a.done and b.done
        ca, cb = a.load_checkpoint(), b.load_checkpoint()
        if cb is None:          # the conditioning spectra have no model
            continue
        assert ca["epoch"] == cb["epoch"]
        for k, v in cb["model"].items():
            assert torch.equal(ca["model"][k], v), (log, k)
        assert str(ca["optimizer"]) == str(cb["optimizer"]), log


def _kill_and_resume(run, preset: dict, tmp_path: Path, kill: Kill, **kw) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(full, preset_name="tiny", preset=preset, progress=False, **kw)
    with pytest.raises(Interrupted):
        run(cut, preset_name="tiny", preset=preset, progress=False, callbacks=[kill], **kw)
    assert kill.seen == kill.nth           # the kill happened where the test says
    run(cut, preset_name="tiny", preset=preset, progress=False, resume=True, **kw)
    _assert_same_runs(cut, full)


def test_conditioning_resumes_exactly_between_logged_epochs(tmp_path):
    """Killed before the steps of epoch 4 of the second width (rows every 2 epochs, so the
    resume redoes epoch 3 from the checkpoint of epoch 2)."""
    _kill_and_resume(run_conditioning, CONDITIONING, tmp_path, Kill("epoch_start", 4, nth=2),
                     data="mnist1d")


def test_nme_resumes_exactly_after_a_checkpoint(tmp_path):
    """Killed right after the checkpoint of epoch 2 of the first seed's run."""
    _kill_and_resume(run_nme, NME, tmp_path, Kill("checkpoint", 2), data="mnist1d")


def test_sharpness_resumes_exactly_mid_epoch(tmp_path):
    """Killed after a step in the middle of epoch 3 of the weight-noise run (its generator
    state is part of the optimizer's checkpointed state)."""
    # runs in order: SGD, SAM, weight noise, 3 steps per epoch: the 8th step of an epoch 3 is
    # the second one of the weight-noise run
    _kill_and_resume(run_sharpness, SHARPNESS, tmp_path, Kill("step", 3, nth=8))
