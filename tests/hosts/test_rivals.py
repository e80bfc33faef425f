"""The rivals bridge (``gnrev_plugin.hosts.rivals``): pytorch-optimizer's SOAP, Shampoo, PSGD-Kron,
Muon and AdamW in the registry, built by ``gnrev_plugin.build``, listed by ``gnrev list``, run by
``gnrev train``; a missing package is reported with the install hint. Under ``CI`` a missing
pytorch-optimizer fails these tests (conftest turns the skip into a failure)."""

from __future__ import annotations

import sys

import pytest
import rivals_site
import torch
from rivals_site import needs_package
from torch import nn

from gnrev_plugin.build import build_optimizer
from gnrev_plugin.cli import main
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.hosts import rivals
from gnrev_plugin.registry import PluginError, Registry

NAMES = sorted(rivals.RIVALS)
rival_registry = rivals_site.rival_registry   # the fixture: the registry with the rivals plugin


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    return x, (x[:, :3].argmax(1))


#: learning rates for 30 full-batch steps on the toy problem where the package default is too
#: small to show a decrease in 30 steps (the defaults are checked to apply below)
TEST_LR = {"pytorch_optimizer.shampoo": 3e-2, "pytorch_optimizer.kron": 1e-2,
           "pytorch_optimizer.adamw": 1e-2}


@pytest.mark.parametrize("name", NAMES)
def test_each_rival_trains_a_small_mlp_through_build(rival_registry, name):
    model, (x, y) = _mlp(), _data()
    default = build_optimizer(name, model, loss="cross_entropy", registry=rival_registry)
    assert default.param_groups[0]["lr"] == rival_registry.entry("optimizer", name).defaults["lr"]
    options = {"lr": TEST_LR[name]} if name in TEST_LR else {}
    opt = build_optimizer(name, model, options, loss="cross_entropy", registry=rival_registry)
    assert type(opt).__module__.startswith(("pytorch_optimizer", "torch.optim"))
    entry = rival_registry.entry("optimizer", name)
    assert entry.defaults and entry.distribution != "<unknown>"
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.95 * losses[0], losses


def test_muon_orthogonalises_only_hidden_matrices():
    needs_package()
    model = _mlp()
    groups = rivals.muon_param_groups(model.parameters(), model)
    hidden = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert hidden == {id(model[2].weight)}           # not the first/last layer, not biases
    rest = {id(p) for g in groups if not g["use_muon"] for p in g["params"]}
    assert rest == {id(p) for p in model.parameters()} - hidden


def test_unknown_option_is_an_error_not_swallowed():
    needs_package()
    model = _mlp()
    with pytest.raises(TypeError, match="does not take \\['precondition_frequncy'\\]"):
        rivals.build_rival("pytorch_optimizer.soap", model.parameters(), precondition_frequncy=3)
    assert "precondition_frequency" in rivals.accepted_options("pytorch_optimizer.soap")


def test_rivals_appear_in_gnrev_list(rival_registry, capsys):
    assert main(["list", "--kind", "optimizer", "--check"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        line = next(ln for ln in out.splitlines() if f" {name} " in ln)
        assert line.rstrip().endswith("ok"), line


@pytest.mark.parametrize("name", NAMES)
def test_gnrev_train_runs_each_rival_for_one_epoch(rival_registry, tmp_path, name):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", name, "--model", "mlp", "--model-opt", "hidden=[32,32]",
                 "--data", "mnist1d", "--data-opt", "num_samples=160", "--epochs", "1", "--batch-size", "32",
                 "--out", str(out), "--no-progress"]) == 0
    rows = read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)


def test_missing_package_is_reported_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)     # import raises ImportError
    monkeypatch.setattr(rivals, "available", lambda: False)
    reg = Registry()
    rivals.gnrev_register_optimizers(registry=reg)
    for name in NAMES:
        entry = reg.entry("optimizer", name)
        assert entry.description.startswith("UNAVAILABLE") and rivals.INSTALL_HINT in entry.description
        with pytest.raises(PluginError, match="pip install 'gnrev-plugin\\[rivals\\]'"):
            entry.resolve()
    with pytest.raises(PluginError, match="not installed"):
        reg.get_optimizer("pytorch_optimizer.adamw", _mlp().parameters())


#: PSGD-Kron draws random probe vectors (``torch.randn`` on the parameter's device), so its CPU and
#: CUDA runs differ by construction; it is checked to train on CUDA only
RANDOMIZED = {"pytorch_optimizer.kron"}


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_each_rival_steps_the_same_on_cuda(name):
    """No compiler needed: float64 steps on CUDA train, and (deterministic rivals) match the CPU's
    (``rtol = 1e-6``)."""
    needs_package()
    (x, y), cpu = _data(), _mlp().double()
    gpu = _mlp().double().cuda()
    losses = {}
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = rivals.build_rival(name, model.parameters(), model=model,
                                 **({"lr": TEST_LR[name]} if name in TEST_LR else {}))
        losses[dev] = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.double().to(dev)), y.to(dev))
            loss.backward()
            opt.step()
            losses[dev].append(float(loss))
    assert losses["cuda"][-1] < 0.95 * losses["cuda"][0]
    if name not in RANDOMIZED:
        for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
            torch.testing.assert_close(q.cpu(), p, rtol=1e-6, atol=1e-9)
