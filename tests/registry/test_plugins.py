"""Plugin discovery through ``importlib.metadata`` entry points, with real third-party distributions.

Third-party plugins are made real in two ways: (1) a hand-written installed ``*.dist-info``
(``METADATA`` + ``entry_points.txt``) next to the plugin's package in a temporary directory put on
``sys.path`` — exactly what ``pip install`` leaves in ``site-packages``; (2) a real
``pip install --target`` of ``tests/fixtures/gnrev_toy_plugin`` (no network, no build isolation),
then a fresh interpreter. Nothing imports a plugin module by name: everything goes through
``importlib.metadata.entry_points(group="gnrev.plugins")``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_plugin import forget_toy_modules, install_dist_info, pip_install, write_dist

from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.registry import (
    DuplicateNameError,
    LazyFactory,
    PluginError,
    PluginWarning,
    Registry,
    UnknownNameError,
    discover,
)

REQUIRED = {"model": ["gnrev.revmlp"], "optimizer": ["gnrev.exact_gn", "gnrev.dense_gn"],
            "metric": ["gnrev.decompose", "gnrev.empirical_ntk", "gnrev.linear_cka",
                       "gnrev.gn_condition_number"]}


@pytest.fixture
def toy_site(tmp_path, monkeypatch) -> Path:
    """The toy plugin installed as a dist-info on sys.path (removed after the test)."""
    site = install_dist_info(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    forget_toy_modules()


BAD_PLUGINS = {
    # distribution: (entry point value, module path, source)
    "gnrev-broken-import": ("broken_import_plugin", "broken_import_plugin.py",
                            "import a_module_that_does_not_exist\n"),
    "gnrev-conflicting": ("conflicting_plugin", "conflicting_plugin.py", """
        import pluggy
        hookimpl = pluggy.HookimplMarker("gnrev")

        @hookimpl
        def gnrev_register_models(registry):
            registry.add_model("conflict.fine_model", lambda *, in_features, num_classes: None)

        @hookimpl
        def gnrev_register_optimizers(registry):
            registry.add_optimizer("gnrev.exact_gn", lambda params: None)   # taken by gnrev-plugin
    """),
    "gnrev-typo-hook": ("typo_plugin", "typo_plugin.py", """
        import pluggy
        hookimpl = pluggy.HookimplMarker("gnrev")

        @hookimpl
        def gnrev_register_modles(registry):
            registry.add_model("typo.model", lambda: None)
    """),
    "gnrev-raising-hook": ("raising_plugin", "raising_plugin.py", """
        import pluggy
        hookimpl = pluggy.HookimplMarker("gnrev")

        @hookimpl
        def gnrev_register_metrics(registry):
            registry.add_metric("raising.first", lambda: 0.0)
            raise RuntimeError("plugin bug")
    """),
}


@pytest.fixture
def bad_site(toy_site, monkeypatch) -> Path:
    """Four broken or conflicting third-party plugins installed beside the toy one."""
    for dist, (module, path, src) in BAD_PLUGINS.items():
        write_dist(toy_site, dist, "1.0", {dist.split("-", 1)[1]: module}, {path: src})
    yield toy_site
    for _, (module, _, _) in BAD_PLUGINS.items():
        sys.modules.pop(module, None)


# ---------------------------------------------------------------------------------- built-ins
def test_own_entry_point_is_installed():
    eps = md.entry_points(group="gnrev.plugins")
    ours = [ep for ep in eps if ep.value == "gnrev_plugin.registry.builtin"]
    assert [ep.name for ep in ours] == ["gnrev"]
    assert ours[0].dist.metadata["Name"] == "gnrev-plugin"


def test_builtins_come_from_the_entry_point_not_a_hardcoded_import():
    reg = discover()
    for kind, names in REQUIRED.items():
        for name in names:
            e = reg.entry(kind, name)
            assert e.distribution == "gnrev-plugin"
            assert e.source.value == "gnrev_plugin.registry.builtin"
            assert e.version == md.version("gnrev-plugin")
    assert {"gnrev.mnist", "gnrev.mnist1d"} <= set(reg.names("dataset"))
    # with no entry points there is nothing: discovery is the only way in
    empty = discover(entry_points=[])
    assert empty.list() == [] and empty.sources == []


def test_get_model_and_optimizer_build_real_objects():
    reg = discover()
    model = reg.get_model("gnrev.revmlp", in_features=6, hidden=5, num_blocks=2, num_classes=3,
                          seed=0)
    from gnrev_plugin.nn import RevMLP

    assert isinstance(model, RevMLP) and model.config["hidden"] == 5
    opt = reg.get_optimizer("gnrev.sgd", model.parameters(), lr=0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5
    tiny = reg.get_model("gnrev.revmlp_preset", preset="tiny", in_features=8, num_classes=4)
    assert isinstance(tiny, RevMLP) and (tiny.in_features, tiny.num_classes) == (8, 4)
    assert tiny.hidden == 12 and tiny.num_blocks == 3  # the rest comes from the preset


def test_get_exact_gn_through_the_registry():
    reg = discover()
    cls = reg.entry("optimizer", "gnrev.exact_gn").resolve()
    model = reg.get_model("gnrev.revmlp_preset", preset="tiny", in_features=6, num_classes=3)
    opt = reg.get_optimizer("gnrev.exact_gn", model.parameters(), lr=1.0, loss="mse",
                            model=model)
    assert isinstance(opt, cls)


def test_every_builtin_target_resolves():
    """Lazy targets are strings; this catches a renamed or removed object in this checkout."""
    reg = discover()
    missing = []
    for e in reg.list():
        if e.distribution == "gnrev-plugin":
            try:
                assert callable(e.resolve())
            except PluginError as err:
                missing.append(str(err))
    assert not missing, "\n".join(missing)


def test_dense_gn_through_the_registry():
    reg = discover()
    reg.entry("optimizer", "gnrev.dense_gn").resolve()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = reg.get_optimizer("gnrev.dense_gn", net.parameters(), model=net, lr=1.0, loss="mse")
    assert type(opt).__name__ == "DenseGN"


def test_dataset_entries_are_lazy_partials_of_load_dataset():
    reg = discover()
    e = reg.entry("dataset", "gnrev.teacher_student")
    assert isinstance(e.factory, LazyFactory)
    assert e.factory.target == "gnrev_plugin.data:load_dataset"
    ds = reg.get_dataset("gnrev.teacher_student", **_small_teacher_student_kwargs())
    assert ds.name == "teacher-student" and ds.x_train.shape[0] > 0


def _small_teacher_student_kwargs() -> dict:
    import inspect

    from gnrev_plugin.data import teacher_student

    sig = inspect.signature(teacher_student).parameters
    small = {"n_train": 20, "n_test": 10, "in_features": 4, "num_classes": 3, "seed": 0}
    return {k: v for k, v in small.items() if k in sig}


# ---------------------------------------------------------------------------------- third party
def test_third_party_dist_info_is_discovered(toy_site):
    eps = md.entry_points(group="gnrev.plugins")
    toy = [ep for ep in eps if ep.name == "toy"]
    assert len(toy) == 1 and toy[0].value == "gnrev_toy.plugin"
    assert toy[0].dist.metadata["Name"] == "gnrev-toy-plugin"

    reg = discover()
    assert [s.plugin for s in reg.sources][:1] == ["gnrev"]  # own plugin first
    assert {"gnrev", "toy"} <= {s.plugin for s in reg.sources}
    e = reg.entry("model", "toy.tiny_mlp")
    assert (e.distribution, e.version, e.plugin) == ("gnrev-toy-plugin", "0.3.1", "toy")
    assert reg.entry("optimizer", "toy.sign_sgd").distribution == "gnrev-toy-plugin"

    torch.manual_seed(0)
    net = reg.get_model("toy.tiny_mlp", in_features=3, num_classes=2)
    opt = reg.get_optimizer("toy.sign_sgd", net.parameters(), lr=0.1)
    x = torch.randn(5, 3)
    before = [p.detach().clone() for p in net.parameters()]
    net(x).pow(2).sum().backward()
    opt.step()
    for b, p in zip(before, net.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad.sign())
    assert not reg.problems


def test_gnrev_list_shows_third_party_entries(toy_site, capsys):
    assert gnrev_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["toy.tiny_mlp", "toy.sign_sgd", "gnrev.revmlp", "gnrev.exact_gn",
                 "gnrev.dense_gn", "gnrev.linear_cka"]:
        assert name in out
    toy_lines = [line for line in out.splitlines() if line.split()[1:2] == ["toy.sign_sgd"]]
    assert len(toy_lines) == 1 and "gnrev-toy-plugin 0.3.1" in toy_lines[0]
    assert "gnrev_toy.plugin:SignSGD" in toy_lines[0]


def test_broken_and_conflicting_plugins_are_reported_and_skipped(bad_site):
    with pytest.warns(PluginWarning, match="gnrev plugin skipped") as record:
        reg = discover()
    assert len(record) == 4
    stages = {p.source.distribution: p.stage for p in reg.problems}
    assert stages == {"gnrev-broken-import": "import", "gnrev-conflicting": "conflict",
                      "gnrev-typo-hook": "validate", "gnrev-raising-hook": "register"}
    # the host keeps working: built-ins and the good third-party plugin are all there
    assert reg.entry("optimizer", "gnrev.exact_gn").distribution == "gnrev-plugin"
    assert reg.entry("model", "toy.tiny_mlp").distribution == "gnrev-toy-plugin"
    # skipped plugins are rolled back entirely
    for name in ["conflict.fine_model", "typo.model", "raising.first"]:
        assert name not in reg
    conflict = next(p for p in reg.problems if p.stage == "conflict")
    assert "gnrev-plugin" in conflict.message and "gnrev-conflicting" in conflict.message
    assert "'gnrev.exact_gn'" in conflict.message
    assert "a_module_that_does_not_exist" in str(
        next(p for p in reg.problems if p.stage == "import"))
    assert "gnrev_register_modles" in str(next(p for p in reg.problems if p.stage == "validate"))
    # the pluggy manager holds only the healthy plugins
    assert set(reg.plugin_manager.list_name_plugin()[i][0] for i in range(len(reg.sources))) \
        == {"gnrev", "toy"}


def test_strict_discovery_raises_naming_both_distributions(bad_site):
    for dist, _ in list(BAD_PLUGINS.items()):
        if dist != "gnrev-conflicting":
            shutil.rmtree(next(bad_site.glob(f"{dist.replace('-', '_')}-*.dist-info")))
    with pytest.raises(DuplicateNameError, match="gnrev-plugin.*gnrev-conflicting"):
        discover(strict=True)


def test_gnrev_list_reports_skipped_plugins(bad_site, capsys):
    assert gnrev_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "4 plugin(s) reported and skipped" in out and "toy.sign_sgd" in out
    assert gnrev_main(["list", "--strict"]) == 1


def test_third_party_plugin_cannot_take_the_builtin_plugin_name(toy_site):
    write_dist(toy_site, "gnrev-impostor", "9.9", {"gnrev": "impostor_plugin"},
               {"impostor_plugin.py": "x = 1\n"})
    with pytest.warns(PluginWarning, match="gnrev-impostor"):
        reg = discover()
    assert reg.entry("model", "gnrev.revmlp").distribution == "gnrev-plugin"
    [problem] = reg.problems
    assert problem.source.distribution == "gnrev-impostor" and problem.stage == "validate"
    sys.modules.pop("impostor_plugin", None)


# ---------------------------------------------------------------------------------- registry API
def test_registry_errors_are_clear():
    reg = Registry()
    reg.add_model("a.model", lambda *, in_features, num_classes: "built")
    assert reg.get_model("a.model", in_features=2, num_classes=2) == "built"
    with pytest.raises(UnknownNameError, match="no optimizer named 'nope'.*known optimizers: none"):
        reg.get_optimizer("nope", [])
    with pytest.raises(UnknownNameError, match="known models: a.model"):
        reg.get_model("b.model")
    with pytest.raises(DuplicateNameError, match="'a.model' is registered twice"):
        reg.add_model("a.model", lambda *, in_features, num_classes: None)
    with pytest.raises(TypeError, match="must be callable"):
        reg.add_metric("m", 3)
    with pytest.raises(ValueError, match="module:attribute"):
        reg.add_metric("m", "no_colon_here")
    reg.add_metric("missing", "gnrev_plugin.this_module_does_not_exist:fn")
    with pytest.raises(PluginError, match="metric 'missing'.*could not be loaded"):
        reg.get_metric("missing")


def test_factory_contracts_are_checked_at_registration_and_first_use():
    """hookspecs' contracts: a breach is a PluginError naming the entry and what is missing."""
    reg = Registry()
    with pytest.raises(PluginError, match=r"model 'm.bad'.*in_features= and num_classes=.*"
                                          r"\['num_classes'\]"):
        reg.add_model("m.bad", lambda *, in_features, hidden=3: None)
    reg.add_model("m.kwargs", lambda **kw: kw)  # **kwargs accepts the runner's keywords
    with pytest.raises(PluginError, match="optimizer 'o.bad'.*params as its first positional"):
        reg.add_optimizer("o.bad", lambda *, lr: None)
    with pytest.raises(PluginError, match=r"unknown needs \['data'\]"):
        reg.add_optimizer("o.needs", lambda params, **kw: None, needs=("model", "data"))
    with pytest.raises(PluginError, match=r"run metric must accept.*\['targets', 'loss_fn'"):
        reg.add_metric("r.bad", lambda model, *, inputs, initial_model: 0.0, protocol="run")
    reg.add_metric("f.ok", lambda X, Y: 0.0)  # a library function has its own signature
    with pytest.raises(PluginError, match="protocol must be one of"):
        reg.add_metric("r.proto", lambda model, **kw: 0.0, protocol="epoch")
    with pytest.raises(PluginError, match="defaults must be JSON values"):
        reg.add_model("m.defaults", lambda **kw: None, defaults={"act": object()})
    with pytest.raises(PluginError, match="only optimizers declare needs"):
        reg.add("model", "m.needs", lambda **kw: None, needs=("model",))
    # a lazy target is checked when first resolved
    reg.add_model("m.lazy", "gnrev_plugin.nn:make_activation")
    with pytest.raises(PluginError, match="model 'm.lazy'.*breaks the factory contract"):
        reg.get_model("m.lazy", in_features=2, num_classes=2)
    assert sorted(reg.names("model")) == ["m.kwargs", "m.lazy"]


def test_extra_plugins_embed_without_installing():
    import types

    from gnrev_plugin.registry import hookimpl

    mod = types.ModuleType("embedded")

    @hookimpl
    def gnrev_register_datasets(registry):
        registry.add_dataset("embedded.ones", lambda n=3: torch.ones(n))

    mod.gnrev_register_datasets = gnrev_register_datasets
    reg = discover(extra_plugins=[("embedded", mod)])
    assert reg.entry("dataset", "embedded.ones").distribution == "<not installed>"
    assert reg.get_dataset("embedded.ones", n=2).tolist() == [1.0, 1.0]


def test_unusable_embedded_plugin_objects_are_reported():
    import types

    from gnrev_plugin.registry import hookimpl

    @hookimpl
    def gnrev_register_models(registry):
        registry.add_model("ns.model", lambda: None)

    unhashable = types.SimpleNamespace(gnrev_register_models=gnrev_register_models)
    with pytest.warns(PluginWarning, match="unhashable"):
        reg = discover(extra_plugins=[("unhashable", unhashable)])
    assert "ns.model" not in reg
    [problem] = reg.problems
    assert problem.stage == "validate" and "unhashable" in problem.message
    with pytest.raises(PluginError, match="unhashable"):
        discover(extra_plugins=[("unhashable", unhashable)], strict=True)


# ---------------------------------------------------------------------------------- pip install
@pytest.mark.slow
def test_pip_installed_plugin_in_a_fresh_interpreter(tmp_path):
    """Build and install the toy plugin with pip, then run ``gnrev list`` in a new process."""
    pytest.importorskip("setuptools", reason="building the toy plugin needs setuptools")
    target = pip_install(tmp_path)
    assert list(target.glob("gnrev_toy_plugin-0.3.1.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as md; "
         "print(sorted((e.name, e.value) for e in md.entry_points(group='gnrev.plugins')))"],
        capture_output=True, text=True, env=env, timeout=120)
    assert "('toy', 'gnrev_toy.plugin')" in probe.stdout, probe.stderr
    listing = subprocess.run([sys.executable, "-m", "gnrev_plugin.cli", "list", "--strict"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "toy.sign_sgd" in listing.stdout and "gnrev-toy-plugin 0.3.1" in listing.stdout
