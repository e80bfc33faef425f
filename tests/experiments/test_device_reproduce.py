"""Devices: ``gnrev reproduce`` puts the device in every run's spec, and every experiment's smoke
preset runs on a GPU (``@pytest.mark.cuda``)."""

from __future__ import annotations

import json

import pytest
from realdata import REAL_MNIST, needs_real_mnist


# ============================================================================ gnrev reproduce
def _experiment_specs(device: str) -> list:
    """The run specs of the conditioning, NME and sharpness reproductions (smoke presets)."""
    from gnrev_plugin.experiments.conditioning.run import training_spec
    from gnrev_plugin.experiments.nme.run import nme_spec
    from gnrev_plugin.experiments.presets import get_preset
    from gnrev_plugin.experiments.sharpness.run import sharpness_configs, sharpness_spec

    cond, nme, sharp = (get_preset(e, "smoke") for e in ("conditioning", "nme", "sharpness"))
    tr = cond["training"]
    return ([training_spec(tr, w, 0, cond["num_classes"], "mnist", device)
             for w in tr["widths"]]
            + [nme_spec(nme, a, 0, "mnist", device) for a in nme["activations"]]
            + [sharpness_spec(sharp, cfg, 0, ds, device) for ds in sharp["datasets"]
               for cfg in sharpness_configs(sharp)])


def test_reproduce_experiments_put_the_device_in_every_spec():
    """The device ``gnrev reproduce --device`` passes reaches every run's spec (which
    :func:`gnrev_plugin.build.build` builds the model on; the runs move their data to it)."""
    specs = _experiment_specs("cuda:1")
    assert specs and {s.device for s in specs} == {"cuda:1"}


@pytest.mark.cuda
@needs_real_mnist
@pytest.mark.parametrize("experiment", ["exact-gn", "conditioning", "nme", "sharpness",
                                        "laziness"])
def test_reproduce_smoke_on_cuda_every_experiment(experiment, tmp_path):
    """``gnrev reproduce EXPERIMENT --preset smoke --device cuda``: every run ends ``ok`` and
    records ``cuda`` in its spec."""
    from gnrev_plugin.cli import main
    from gnrev_plugin.experiments.catalog import EXPERIMENTS

    if experiment not in EXPERIMENTS:
        pytest.fail(f"{experiment} is not in the catalog: {sorted(EXPERIMENTS)}")
    out = tmp_path / "out"
    assert main(["reproduce", experiment, "--preset", "smoke", "--out", str(out),
                 "--data-dir", str(REAL_MNIST), "--device", "cuda", "--no-progress"]) == 0
    specs = [json.loads(p.read_text()).get("spec") for p in (out / "runs").rglob("config.json")]
    assert all(s["device"] == "cuda" for s in specs if s is not None)
