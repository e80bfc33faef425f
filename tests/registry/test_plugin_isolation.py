"""Plugin isolation (issue 22): whatever a plugin raises at import or registration, ``SystemExit``
included, is reported with the plugin's name and skipped (a Ctrl-C still propagates); what a
factory returns is checked before a run starts, with a :class:`PluginError` naming the entry.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from toy_plugin import write_dist

from gnrev_plugin.build import RunSpec, build, build_model, build_optimizer
from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.registry import PluginError, PluginWarning, Registry, discover, hookimpl

EXITING = {
    # distribution: (module, source)
    "gnrev-exit-at-import": ("exit_at_import", "import sys\nsys.exit(3)\n"),
    "gnrev-exit-in-hook": ("exit_in_hook", """
        import sys
        import pluggy
        hookimpl = pluggy.HookimplMarker("gnrev")

        @hookimpl
        def gnrev_register_models(registry):
            registry.add_model("exiting.model", lambda *, in_features, num_classes: None)
            sys.exit("bye")
    """),
}


@pytest.fixture
def exiting_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for dist, (module, src) in EXITING.items():
        write_dist(site, dist, "1.0", {dist.removeprefix("gnrev-"): module}, {f"{module}.py": src})
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module, _ in EXITING.values():
        sys.modules.pop(module, None)


def test_sys_exit_in_a_plugin_is_reported_by_name_and_skipped(exiting_site):
    with pytest.warns(PluginWarning, match="gnrev plugin skipped"):
        reg = discover()
    stages = {p.source.distribution: (p.stage, p.message) for p in reg.problems}
    assert stages["gnrev-exit-at-import"] == ("import", "SystemExit: 3")
    assert stages["gnrev-exit-in-hook"] == ("register", "SystemExit: bye")
    assert "exiting.model" not in reg                      # rolled back
    assert "gnrev.exact_gn" in reg.names("optimizer")       # the host keeps working


def test_gnrev_list_survives_a_plugin_calling_sys_exit(exiting_site, capsys):
    from gnrev_plugin.registry import get_registry

    try:
        with pytest.warns(PluginWarning):
            get_registry(refresh=True)
        assert gnrev_main(["list"]) == 0
        out = capsys.readouterr().out
        assert "gnrev-exit-at-import" in out and "gnrev.exact_gn" in out
    finally:
        sys.modules.pop("exit_at_import", None)
        sys.modules.pop("exit_in_hook", None)
        exiting_site.rename(exiting_site.with_name("gone"))
        get_registry(refresh=True)


def test_keyboard_interrupt_in_a_plugin_propagates():
    mod = types.ModuleType("interrupting")

    @hookimpl
    def gnrev_register_models(registry):
        raise KeyboardInterrupt

    mod.gnrev_register_models = gnrev_register_models
    with pytest.raises(KeyboardInterrupt):
        discover(extra_plugins=[("interrupting", mod)])


def test_lazy_target_calling_sys_exit_is_a_named_plugin_error(tmp_path, monkeypatch):
    (tmp_path / "exit_lazy.py").write_text("import sys\nsys.exit(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.add_model("lazy.exits", "exit_lazy:make")
    try:
        with pytest.raises(PluginError, match="model 'lazy.exits'.*SystemExit"):
            reg.get_model("lazy.exits", in_features=2, num_classes=2)
    finally:
        sys.modules.pop("exit_lazy", None)


# ---------------------------------------------------------------------------- factory results
def _registry_with(**optimizers) -> Registry:
    reg = Registry()
    reg.add_model("t.linear", lambda *, in_features, num_classes, width=None:
                  nn.Linear(in_features, width or num_classes))
    for name, factory in optimizers.items():
        reg.add_optimizer(f"t.{name}", factory)
    return reg


def _raises(params, **kw):
    raise RuntimeError("broken factory")


class _NotAnOptimizer:
    def __init__(self, params, **kw):
        self.params = list(params)

    def step(self):
        pass


@pytest.mark.parametrize("name, factory, match", [
    ("raises", _raises, r"optimizer 't.raises'.*failed to build: RuntimeError: broken factory"),
    ("none", lambda params, **kw: None, r"optimizer 't.none'.*returned None"),
    ("bare", _NotAnOptimizer, r"optimizer 't.bare'.*_NotAnOptimizer.*"
                              r"\['zero_grad', 'param_groups', 'state_dict'\]"),
])
def test_optimizer_factory_results_are_checked(name, factory, match):
    reg = _registry_with(**{name: factory})
    model = build_model("t.linear", in_features=3, num_classes=2, registry=reg)
    with pytest.raises(PluginError, match=match):
        build_optimizer(f"t.{name}", model, registry=reg)


def test_torch_optimizer_passes_the_result_check():
    reg = _registry_with(sgd=lambda params, lr=0.1: torch.optim.SGD(params, lr=lr))
    model = build_model("t.linear", in_features=3, num_classes=2, registry=reg)
    assert isinstance(build_optimizer("t.sgd", model, registry=reg), torch.optim.SGD)


def test_model_of_the_wrong_width_fails_before_the_run():
    reg = _registry_with(sgd=lambda params, lr=0.1: torch.optim.SGD(params, lr=lr))
    reg.add_metric("t.zero", lambda model, **kw: 0.0, protocol="run")
    with pytest.raises(PluginError, match=r"model 't.linear'.*shape \(1, 7\).*\(1, 3\)"):
        build_model("t.linear", {"width": 7}, in_features=4, num_classes=3, registry=reg)
    spec = RunSpec(model="t.linear", model_kwargs={"width": 7}, optimizer="t.sgd",
                   dataset="gnrev.teacher_student", metrics=["t.zero"])
    reg.add_dataset("gnrev.teacher_student", lambda **kw: None)
    with pytest.raises(PluginError, match="num_classes=3"):
        build(spec, in_features=4, num_classes=3, registry=reg)


def test_model_failing_its_dry_forward_is_named():
    reg = Registry()
    reg.add_model("t.wrong_in", lambda *, in_features, num_classes: nn.Linear(in_features + 1,
                                                                             num_classes))
    with pytest.raises(PluginError, match=r"model 't.wrong_in' failed a dry forward of one sample"
                                          r" of 4 features: RuntimeError"):
        build_model("t.wrong_in", in_features=4, num_classes=3, registry=reg)


def test_dry_forward_leaves_the_model_and_rng_untouched():
    reg = Registry()
    reg.add_model("t.drop", lambda *, in_features, num_classes: nn.Sequential(
        nn.Dropout(0.5), nn.Linear(in_features, num_classes)))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    model = build_model("t.drop", in_features=4, num_classes=3, seed=1, registry=reg)
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), state)
