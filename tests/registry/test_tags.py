"""Capabilities as data: registry entries carry ``tags``, and every runner decision reads them.

The built-in tags are checked against what the optimizer classes actually do (a class tagged
``batch_step`` has ``step_on_batch``, one tagged ``distributed`` takes ``process_group``), so the
data cannot drift from the code. A third-party plugin's tags reach the AlgoPerf batch-size rule,
the leaderboard's GN filter and the distributed-run guard; a plugin registering without tags keeps
working with none.
"""

from __future__ import annotations

import types

import pytest
import torch

from gnrev_plugin import engine
from gnrev_plugin.build import RunSpec, load_data
from gnrev_plugin.engine import rundir
from gnrev_plugin.engine import runner as engine_runner
from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.hosts import leaderboard as lb
from gnrev_plugin.optim.protocols import CAPABILITIES, capabilities_of
from gnrev_plugin.registry import (
    TAGS,
    PluginError,
    PluginWarning,
    UnknownNameError,
    discover,
    get_registry,
    hookimpl,
)

GN = {"gnrev.exact_gn", "gnrev.dense_gn"}
SHARPNESS = {"gnrev.sam", "gnrev.psam", "gnrev.weight_noise", "gnrev.hessian_trace_penalty",
             "gnrev.gn_trace_penalty"}


def _plugin(**optimizers) -> types.ModuleType:
    """An embedded plugin registering ``name → tags`` (``None``: the old call, no ``tags=``)."""
    mod = types.ModuleType("tagged_plugin")

    @hookimpl
    def gnrev_register_optimizers(registry):
        for name, tags in optimizers.items():
            if tags is None:
                registry.add_optimizer(name, torch.optim.SGD, "no tags declared")
            else:
                registry.add_optimizer(name, torch.optim.SGD, "tagged", tags=tags)

    mod.gnrev_register_optimizers = gnrev_register_optimizers
    return mod


def _registry(**optimizers):
    return discover(extra_plugins=[("tagged", _plugin(**optimizers))], strict=True)


def test_builtin_tags():
    reg = get_registry()
    for name in GN:
        assert set(reg.optimizer_tags(name)) == {"gauss_newton", "batch_step", "distributed"}
    for name in SHARPNESS:
        assert set(reg.optimizer_tags(name)) == {"sharpness", "batch_step"}
    assert reg.optimizer_tags("sgd") == reg.optimizer_tags("gnrev.adam") == ()
    assert {e.name for e in reg.list("optimizer") if "gauss_newton" in e.tags} == GN
    for e in reg.list("optimizer"):
        assert set(e.tags) <= set(TAGS), e.name


@pytest.mark.parametrize("name", sorted(GN | SHARPNESS | {"gnrev.sgd", "gnrev.adam"}))
def test_builtin_tags_match_the_classes(name):
    """The entry's tags (data, read without importing the optimizer) agree with the capabilities
    the class declares (:mod:`gnrev_plugin.optim.protocols`) and with what it implements."""
    e = get_registry().entry("optimizer", name)
    target = e.resolve()
    assert set(e.tags) & CAPABILITIES == capabilities_of(target)


def test_plugin_tags_old_and_new_registrations():
    reg = _registry(**{"third.old": None, "third.gn": ("gauss_newton", "my_own_tag")})
    assert reg.entry("optimizer", "third.old").tags == ()
    assert reg.optimizer_tags("third.gn") == ("gauss_newton", "my_own_tag")
    assert reg.tags("optimizer", "exact_gn") == reg.optimizer_tags("gnrev.exact_gn")
    with pytest.raises(UnknownNameError, match="third.gn"):
        reg.optimizer_tags("third.missing")


@pytest.mark.parametrize("bad", [("two words",), ("",), (3,)])
def test_malformed_tags_skip_the_plugin(bad):
    with pytest.warns(PluginWarning, match="tags must be"):
        reg = discover(extra_plugins=[("tagged", _plugin(**{"third.bad": bad}))])
    assert "third.bad" not in reg and reg.problems[0].stage == "register"
    with pytest.raises(PluginError, match="tags must be"):
        _registry(**{"third.bad": bad})


def test_runner_decisions_read_the_tags():
    """A plugin's name says nothing; its tag decides (and a GN-sounding name without it does not)."""
    reg = _registry(**{"third.fancy": ("gauss_newton",), "third.exact_gn_like": None})
    assert ap.is_gauss_newton("third.fancy", reg)
    assert not ap.is_gauss_newton("third.exact_gn_like", reg)
    assert ap.get_batch_size("mnist", optimizer="third.fancy", registry=reg) == ap.GN_BATCH_SIZES["mnist"]
    assert lb.is_gn_optimizer("third.fancy[lr=0.1]", reg)
    assert not lb.is_gn_optimizer("third.exact_gn_like", reg)
    assert lb.is_gn_optimizer("ExactGN[lr=0.2]", reg) and not lb.is_gn_optimizer("SGD", reg)


class _Passed(Exception):
    """Raised by the patched batching check: the distributed guard let the optimizer through."""


def _shared_batch_run(tmp_path, monkeypatch, optimizer, reg):
    monkeypatch.setattr(engine_runner, "rank_and_world", lambda: (0, 2))

    def passed(*_):
        raise _Passed

    monkeypatch.setattr(engine_runner, "check_batching", passed)
    ds = load_data("teacher_student", dict(n_train=16, n_test=8, in_features=4, num_classes=3,
                                           teacher_hidden=8, seed=0), input_multiple=2)
    spec = RunSpec(model="mlp", model_kwargs=dict(hidden=[4]), optimizer=optimizer,
                   dataset="teacher_student", metrics=[], epochs=1, batch_size=8, probe_size=4)
    engine.train_run(spec, ds, rundir.RunDir(tmp_path / optimizer), progress=False, registry=reg)


def test_distributed_guard_reads_the_tag(tmp_path, monkeypatch):
    reg = _registry(**{"third.shared": ("distributed",), "third.local": None})
    with pytest.raises(ValueError, match="cannot step on a batch shared by 2 processes"):
        _shared_batch_run(tmp_path, monkeypatch, "third.local", reg)
    with pytest.raises(_Passed):
        _shared_batch_run(tmp_path, monkeypatch, "third.shared", reg)
