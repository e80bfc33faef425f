"""DeepOBS: registered optimizers by registry name on DeepOBS 1.1.2's own runner and test
problems (``quadratic_deep``, ``mnist_logreg`` on local IDX files, gnrev's ``mnist_revmlp``), gnrev's
DeepOBS-protocol runner, and DeepOBS's result layout.

DeepOBS and its dependencies come with the ``test`` extra. Without DeepOBS the tests that need it
skip with the reason (:func:`require_deepobs`), and under ``CI`` they fail instead; any other
missing module (gnrev's own, or a DeepOBS dependency) is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.build import build_model
from gnrev_plugin.compat import deepobs as compat
from gnrev_plugin.defaults import MODEL_DEFAULTS, OPTIMIZER_DEFAULTS
from gnrev_plugin.hosts import deepobs as dob
from gnrev_plugin.optim import DenseGN, ExactGN
from gnrev_plugin.optim.errors import LossCaptureError, RankDeficiencyError
from gnrev_plugin.registry import UnknownNameError

TOY = Path(__file__).resolve().parents[1] / "fixtures" / "gnrev_toy_plugin"


def require_deepobs():
    """``deepobs`` imported through the adapter's shim. Only DeepOBS itself missing skips (and
    under ``CI`` fails): a missing gnrev module or DeepOBS dependency propagates."""
    try:
        return compat.import_deepobs()
    except ModuleNotFoundError as err:
        if err.name != "deepobs":
            raise
        reason = f"DeepOBS is not installed ({err}); pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(f"under CI every host must be installed: {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def one_thread():
    """DeepOBS's loops are many tiny ops; on a shared 2-core machine one intra-op thread is
    several times faster (and deterministic across runners)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fake_idx_dir(root: Path, n_train=300, n_test=100, seed=0, t10k_only=False) -> Path:
    """MNIST-format files whose labels follow a fixed random linear teacher of the pixels."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((784, 10))
    root.mkdir(parents=True, exist_ok=True)
    splits = [("t10k", n_train + n_test)] if t10k_only else [("train", n_train), ("t10k", n_test)]
    for prefix, n in splits:
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (x.reshape(n, -1) / 255.0 @ teacher).argmax(1).astype(np.uint8)
        dob.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        dob.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    dob.set_data_dir("mnist", _fake_idx_dir(tmp_path / "mnist"))
    yield dob.make_test_problem("mnist_revmlp", {"hidden": 64}, train_eval_size=60)
    dob.set_data_dir("mnist", None)


def _json_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json"))


def _runner(name: str, **kwargs) -> dob.StandardRunner:
    """gnrev's DeepOBS-protocol runner for registered optimizer ``name``."""
    cls = dob.deepobs_optimizer_class(name, **kwargs)
    return dob.StandardRunner(cls, dob.hyperparameter_names(cls.registry_name))


# ------------------------------------------------------------------ the optimizer_class bridge
def test_optimizer_class_is_named_and_built_by_the_registry(toy_registry, tiny_mnist):
    """Any registered optimizer reaches DeepOBS by registry name: the class is named by it and
    builds the registered object with the registry's defaults; GN gets the network and loss."""
    torch.manual_seed(0)
    tp = tiny_mnist(30)
    tp.set_up()
    toy_cls = dob.deepobs_optimizer_class("toy.sign_sgd")
    assert toy_cls.__name__ == "toy.sign_sgd"
    toy = toy_cls(tp.net.parameters())
    assert type(toy).__name__ == "SignSGD" and toy.param_groups[0]["lr"] == 1e-2
    assert dob.hyperparameter_names("toy.sign_sgd") == {"lr": {"type": float, "default": 1e-2}}
    gn_cls = dob.deepobs_optimizer_class("dense_gn")
    assert gn_cls.__name__ == "gnrev.dense_gn"
    gn = gn_cls(tp.net.parameters(), lr=0.5)
    assert isinstance(gn, DenseGN) and gn.model is tp.net
    assert (gn.defaults["lr"], gn.defaults["loss"], gn.defaults["rank_policy"]) == \
        (0.5, "cross_entropy", OPTIMIZER_DEFAULTS["gnrev.dense_gn"]["rank_policy"])
    gn.close()
    exact = dob.deepobs_optimizer_class("gnrev.exact_gn", loss="mse")(tp.net.parameters())
    assert isinstance(exact, ExactGN) and exact.model is tp.net
    assert exact.defaults["loss"] == "mse" and exact.defaults["rank_policy"] == "warn"
    with pytest.raises(UnknownNameError, match="known optimizers: .*toy.sign_sgd"):
        dob.deepobs_optimizer_class("toy.nope")
    with pytest.raises(ValueError, match="parameter groups"):
        toy_cls([{"params": list(tp.net.parameters())}])


def test_runner_writes_deepobs_layout_with_every_key(tiny_mnist, tmp_path):
    out = tmp_path / "results"
    result = _runner("exact_gn").run(tiny_mnist, hyperparams={"lr": 0.5}, batch_size=30,
                                     num_epochs=2, random_seed=7, output_dir=out,
                                     train_log_interval=2)
    files = _json_files(out)
    assert len(files) == 1
    rel = files[0].relative_to(out).as_posix()
    assert re.fullmatch(r"mnist_revmlp/gnrev\.exact_gn/num_epochs__2__batch_size__30__lr__5\.e-01"
                        r"__rank_policy__warn/random_seed__7__\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d\.json",
                        rel), rel
    data = json.loads(files[0].read_text())
    assert list(data) == list(dob.RESULT_KEYS)
    assert data == json.loads(json.dumps(result))
    assert (data["testproblem"], data["optimizer_name"], data["batch_size"],
            data["num_epochs"], data["random_seed"], data["weight_decay"]) == \
        ("mnist_revmlp", "gnrev.exact_gn", 30, 2, 7, None)
    assert data["optimizer_hyperparams"] == {"lr": 0.5, "rank_policy": "warn"}
    assert data["training_params"] == {}
    for key in ("train_losses", "valid_losses", "test_losses", "train_accuracies",
                "valid_accuracies", "test_accuracies"):
        assert len(data[key]) == 2 + 1, key
        assert all(math.isfinite(v) for v in data[key]), key
    # 300 train images, 60 held out for validation: 240 → 8 batches of 30 per epoch, every 2nd
    assert len(data["minibatch_train_losses"]) == 2 * 4
    assert data["train_losses"][-1] < data["train_losses"][0]
    assert data["test_accuracies"][-1] > data["test_accuracies"][0]


def test_exact_gn_is_drop_in_and_matches_its_explicit_step(tiny_mnist):
    """In the unmodified DeepOBS loop (loss_function(reduction=...) + regulariser, backward,
    step) the registry-built ExactGN takes the same step as its explicit path on the batch."""
    torch.manual_seed(0)
    tp = tiny_mnist(30)
    tp.set_up()
    twin = copy.deepcopy(tp.net)
    opt = dob.deepobs_optimizer_class("exact_gn")(tp.net.parameters(), lr=0.7,
                                                  rank_policy="raise")
    ref = ExactGN(twin.parameters(), lr=0.7, model=twin, loss="cross_entropy",
                  rank_policy="raise")
    seen = []
    draw = tp._get_next_batch

    def recording_draw():
        seen.append(draw())
        return seen[-1]

    tp._get_next_batch = recording_draw
    tp.train_init_op()
    for _ in range(3):
        opt.zero_grad()
        batch_loss, _ = tp.get_batch_loss_and_accuracy()
        batch_loss.backward()
        opt.step()
        assert opt.last_step_exact is True
        ref.step_on_batch(*seen[-1])
    for p, q in zip(tp.net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gnrev's test problems
def test_problem_network_is_build_model_with_the_registry_defaults(tiny_mnist):
    """The problem's RevMLP is gnrev.revmlp from build_model with the registered defaults (only
    the problem's own overrides on top), seeded by the runner's seed."""
    torch.manual_seed(11)
    tp = dob.mnist_revmlp(32)
    tp.set_up()
    expected = build_model("gnrev.revmlp", {}, in_features=784, num_classes=10, seed=11)
    defaults = MODEL_DEFAULTS["gnrev.revmlp"]
    assert (tp.net.hidden, tp.net.num_blocks) == (defaults["hidden"], defaults["num_blocks"])
    for (n, p), (m, q) in zip(tp.net.named_parameters(), expected.named_parameters(),
                              strict=True):
        assert n == m and torch.equal(p, q), n
    for (n, b), (_, c) in zip(tp.net.named_buffers(), expected.named_buffers(), strict=True):
        assert torch.equal(b, c), n
    assert dob.cifar10_revmlp.model_kwargs == {"num_blocks": 6}  # the only override
    assert dob.mnist_revmlp.model_kwargs == {} and dob.fmnist_revmlp.model_kwargs == {}
    small = tiny_mnist(30)
    small.set_up()
    assert small.net.hidden == 64 and small.net.num_blocks == defaults["num_blocks"]


def test_test_problem_interface(tiny_mnist):
    torch.manual_seed(0)
    tp = tiny_mnist(batch_size=25)
    tp.set_up()
    assert tp.loss_function is torch.nn.CrossEntropyLoss
    assert tp.get_regularization_loss() == 0
    tp.train_init_op()
    assert tp.phase == "train" and tp.net.training
    losses = 0
    while True:
        try:
            loss, acc = tp.get_batch_loss_and_accuracy()
        except StopIteration:
            break
        assert loss.requires_grad and 0.0 <= acc <= 1.0
        losses += 1
    assert losses == (300 - 60) // 25  # drop_last, validation held out
    tp.test_init_op()
    assert tp.phase == "test" and not tp.net.training
    f = tp.get_batch_loss_and_accuracy_func(reduction="none")
    (l1, a1), (l2, a2) = f(), f()  # a closure on one fixed batch
    assert l1.shape == (25,) and torch.equal(l1, l2) and a1 == a2
    assert not l1.requires_grad
    for phase in (tp.train_eval_init_op, tp.valid_init_op):
        phase()
        n = 0
        while True:
            try:
                tp.get_batch_loss_and_accuracy()
            except StopIteration:
                break
            n += 1
        assert n == 60 // 25


def test_runner_with_sgd_writes_beside_exact_gn(tiny_mnist, tmp_path):
    out = tmp_path / "results"
    _runner("sgd").run(tiny_mnist, hyperparams={"lr": 0.01}, batch_size=30, num_epochs=1,
                       random_seed=1, output_dir=out)
    _runner("exact_gn").run(tiny_mnist, hyperparams={"lr": 0.1}, batch_size=30, num_epochs=1,
                            random_seed=1, output_dir=out)
    names = sorted(p.relative_to(out).parts[1:3] for p in _json_files(out))
    assert names == [("gnrev.exact_gn", "num_epochs__1__batch_size__30__lr__1.e-01"
                                        "__rank_policy__warn"),
                     ("gnrev.sgd", "num_epochs__1__batch_size__30__lr__1.e-02")]
    for f in _json_files(out):
        assert all(math.isfinite(v) for v in json.loads(f.read_text())["train_losses"])


def test_skip_if_exists_does_not_repeat_a_run(tiny_mnist, tmp_path):
    runner = _runner("exact_gn")
    kwargs = dict(hyperparams={"lr": 0.1}, batch_size=30, num_epochs=1, random_seed=5,
                  output_dir=tmp_path)
    assert runner.run(tiny_mnist, skip_if_exists=True, **kwargs) is not None
    assert runner.run(tiny_mnist, skip_if_exists=True, **kwargs) is None
    assert len(_json_files(tmp_path)) == 1


def test_runner_rejects_undeclared_or_missing_hyperparameters(tiny_mnist, tmp_path):
    runner = _runner("exact_gn")
    with pytest.raises(ValueError, match="not declared"):
        runner.run(tiny_mnist, hyperparams={"lr": 0.1, "beta": 2.0}, output_dir=tmp_path)
    bare = dob.StandardRunner(dob.deepobs_optimizer_class("exact_gn"), {"lr": {"type": float}})
    with pytest.raises(ValueError, match="no default"):
        bare.run(tiny_mnist, hyperparams={}, output_dir=tmp_path)


def test_fmnist_and_cifar10_problems_read_local_files(tmp_path, monkeypatch):
    dob.set_data_dir("fmnist", _fake_idx_dir(tmp_path / "fmnist", seed=1))
    try:
        tp = dob.make_test_problem("fmnist_revmlp", {"hidden": 32}, train_eval_size=50)(25)
        tp.set_up()
        x, _ = next(iter(tp.data._train_dataloader))
        assert x.shape == (25, 784)
    finally:
        dob.set_data_dir("fmnist", None)
    # CIFAR-10 python pickles: five training batches and one test batch
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, size=(20, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, size=20))}
        (root / name).write_bytes(pickle.dumps(batch))
    ds = dob.load_cifar10(tmp_path)
    assert ds.x_train.shape == (100, 3072) and ds.x_test.shape == (20, 3072)
    raw = np.concatenate([pickle.loads((root / n).read_bytes())[b"data"] for n in names[:5]])
    red = (raw[:, :1024] / 255.0 - dob.CIFAR10_MEAN[0]) / dob.CIFAR10_STD[0]
    np.testing.assert_allclose(ds.x_train[:, :1024].numpy(), red, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("GNREV_CIFAR10_DIR", str(tmp_path))
    tp = dob.make_test_problem("cifar10_revmlp", {"hidden": 32, "num_blocks": 2},
                               train_eval_size=20)(10)
    tp.set_up()
    assert tp.net.in_features == 3072 and tp.net.num_blocks == 2
    with pytest.raises(ValueError, match="model_kwargs"):
        dob.make_test_problem("mnist_revmlp", hidden=32)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GNREV_FMNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set_data_dir"):
        dob.fmnist_revmlp(32).set_up()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        dob.load_cifar10(tmp_path)


# ------------------------------------------------------------------ local IDX data for DeepOBS
def test_mnist_data_dir_is_gnrevs_split_in_torchvisions_layout(tmp_path):
    """Train files = the first 8000 t10k images, test files = the last 2000 (gnrev's split),
    uncompressed under MNIST/raw/, and torchvision's MNIST (DeepOBS's reader) reads them back."""
    from torchvision.datasets import MNIST  # noqa: PLC0415 - a DeepOBS dependency (test extra)

    from gnrev_plugin.data import read_idx  # noqa: PLC0415

    src = _fake_idx_dir(tmp_path / "src", n_train=8000, n_test=2000, t10k_only=True)
    root = dob.prepare_mnist_data_dir(tmp_path / "deepobs_data", src)
    x_all = read_idx(src / "t10k-images-idx3-ubyte.gz")
    y_all = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte"]
    np.testing.assert_array_equal(read_idx(raw / "train-images-idx3-ubyte"), x_all[:8000])
    np.testing.assert_array_equal(read_idx(raw / "train-labels-idx1-ubyte"), y_all[:8000])
    np.testing.assert_array_equal(read_idx(raw / "t10k-images-idx3-ubyte"), x_all[8000:])
    np.testing.assert_array_equal(read_idx(raw / "t10k-labels-idx1-ubyte"), y_all[8000:])
    train = MNIST(root=str(root), train=True, download=False)
    test = MNIST(root=str(root), train=False, download=False)
    assert (len(train), len(test)) == (8000, 2000)
    assert torch.equal(train.data, torch.from_numpy(x_all[:8000].copy()))
    assert torch.equal(test.targets, torch.from_numpy(y_all[8000:].astype(np.int64)))


# ------------------------------------------------------------------ DeepOBS 1.1.2 itself
def test_missing_deepobs_fails_under_ci_and_other_missing_modules_are_errors(monkeypatch):
    """The guard every DeepOBS test goes through: DeepOBS missing → skip, or fail under CI; a
    ModuleNotFoundError for anything else (gnrev's own modules) is never turned into a skip."""
    require_deepobs()  # installed with the test extra
    for name in [m for m in sys.modules if m == "deepobs" or m.startswith("deepobs.")]:
        monkeypatch.delitem(sys.modules, name)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepobs" else real_find_spec(name, *a))
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="under CI"):
        require_deepobs()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_deepobs()

    def gnrev_bug():
        raise ModuleNotFoundError("No module named 'gnrev_plugin.nope'",
                                  name="gnrev_plugin.nope")

    monkeypatch.setattr(compat, "import_deepobs", gnrev_bug)
    try:
        require_deepobs()
    except ModuleNotFoundError as err:
        assert err.name == "gnrev_plugin.nope"
    except pytest.skip.Exception:
        pytest.fail("a ModuleNotFoundError of gnrev's own was turned into a skip")
    else:
        pytest.fail("the ModuleNotFoundError vanished")


_FRESH_IMPORT = """
import importlib.util, sys
import matplotlib
had_tf = importlib.util.find_spec("tensorflow") is not None
before = dict(matplotlib.rcParams)
from gnrev_plugin.compat import deepobs as compat
deepobs = compat.import_deepobs()
assert deepobs.pytorch.runners.StandardRunner.__module__ == "deepobs.pytorch.runners.runner"
for real in ("torchvision", "six", "seaborn", "matplotlib2tikz"):
    assert getattr(sys.modules[real], "__file__", None), real + " is not a real module"
assert dict(matplotlib.rcParams) == before, "importing DeepOBS changed matplotlib's rcParams"
if not had_tf:
    assert "tensorflow" not in sys.modules, "the TensorFlow stub outlived the import"
    try:
        import tensorflow
    except ImportError:
        pass
    else:
        raise AssertionError("import tensorflow succeeded after the shim")
print("FRESH-IMPORT-OK")
"""


def test_import_shim_stubs_tensorflow_only_while_importing():
    """In a fresh interpreter: DeepOBS imports with its real dependencies; TensorFlow (absent
    here) is stubbed during the import only, so a later ``import tensorflow`` fails as it should,
    and matplotlib's global settings survive ``deepobs.analyzer``'s ``seaborn.set()``."""
    require_deepobs()
    proc = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "FRESH-IMPORT-OK" in proc.stdout, proc.stderr[-3000:]


def _deepobs_float2str(x: float) -> str:
    from deepobs.abstract_runner.abstract_runner_utils import float2str  # noqa: PLC0415

    return float2str(x)


def test_float2str_matches_deepobs():
    require_deepobs()
    for x in (0.01, 0.125, 1.0, 3e-7, 0.2, 123.456):
        assert dob.float2str(x) == _deepobs_float2str(x)
    assert dob.run_folder_name(2, 128, None, {"lr": 0.01, "momentum": 0.0}) == \
        "num_epochs__2__batch_size__128__lr__1.e-02__momentum__0.e+00"
    assert dob.run_folder_name(3, 64, 5e-4, {"lr": 1.0}) == \
        "num_epochs__3__batch_size__64__weight_decay__5.e-04__lr__1.e+00"


def test_deepobs_standard_runner_gives_the_same_json_as_ours(tmp_path):
    """DeepOBS 1.1.2's own StandardRunner runs gnrev.exact_gn (by registry name) on gnrev's
    problem; its JSON equals gnrev's runner's key by key and value by value, and DeepOBS's
    analyzer reads the folder gnrev's runner wrote."""
    deepobs = require_deepobs()
    from deepobs.analyzer import shared_utils  # noqa: PLC0415

    dob.set_data_dir("mnist", _fake_idx_dir(tmp_path / "mnist"))
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    try:
        tiny = dob.make_test_problem("mnist_revmlp", {"hidden": 64}, train_eval_size=60)
        dob.register_with_deepobs({"mnist_revmlp": tiny})
        with one_thread():
            _runner("exact_gn").run(tiny, hyperparams={"lr": 0.5}, batch_size=30, num_epochs=2,
                                    random_seed=3, output_dir=ours, train_log_interval=2)
            dob.run_deepobs("exact_gn", "mnist_revmlp", {"lr": 0.5}, batch_size=30,
                            num_epochs=2, random_seed=3, output_dir=theirs,
                            train_log_interval=2)
    finally:
        dob.set_data_dir("mnist", None)
        dob.register_with_deepobs()
    assert deepobs.config.get_testproblem_default_setting("mnist_revmlp")["batch_size"] == 128
    (f_theirs,), (f_ours,) = _json_files(theirs), _json_files(ours)
    assert f_theirs.relative_to(theirs).parent == f_ours.relative_to(ours).parent
    assert f_ours.relative_to(ours).parts[:2] == ("mnist_revmlp", "gnrev.exact_gn")
    assert f_theirs.name.rsplit("__", 1)[0] == f_ours.name.rsplit("__", 1)[0]
    a, b = json.loads(f_theirs.read_text()), json.loads(f_ours.read_text())
    assert list(a) == list(b) == list(dob.RESULT_KEYS)
    for key in a:
        if isinstance(a[key], list):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            assert a[key] == b[key], key
    assert a["optimizer_hyperparams"] == {"lr": 0.5, "rank_policy": "warn"}
    best = shared_utils.create_setting_analyzer_ranking(
        str(ours / "mnist_revmlp" / "gnrev.exact_gn"), "final", "valid_accuracies")[0]
    assert best.n_runs == 1
    assert best.get_final_value("valid_accuracies") == pytest.approx(b["valid_accuracies"][-1])
    assert best.get_best_value("test_losses") == pytest.approx(min(b["test_losses"]))


def test_rank_deficient_batches_do_not_end_a_deepobs_run(tmp_path):
    """Every batch of 30 exceeds what a RevMLP with hidden = 8 can fit exactly; with the
    runners' registered rank policy DeepOBS's own runner completes the run (least-squares steps,
    warned) and records the policy."""
    require_deepobs()
    dob.set_data_dir("mnist", _fake_idx_dir(tmp_path / "mnist"))
    try:
        narrow = dob.make_test_problem("mnist_revmlp", {"hidden": 8}, train_eval_size=60)
        dob.register_with_deepobs({"mnist_revmlp": narrow})
        with one_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = dob.run_deepobs("exact_gn", "mnist_revmlp", {"lr": 0.3}, batch_size=30,
                                  num_epochs=1, random_seed=0, output_dir=tmp_path / "res")
    finally:
        dob.set_data_dir("mnist", None)
        dob.register_with_deepobs()
    assert out["optimizer_hyperparams"] == {"lr": 0.3, "rank_policy": "warn"}
    assert len(out["train_losses"]) == 2 and all(map(math.isfinite, out["train_losses"]))
    assert any("not exact" in str(w.message) for w in caught)
    # the same run with the optimizer's own default policy ("raise") would have ended it
    with pytest.raises(RankDeficiencyError):
        torch.manual_seed(0)
        tp = narrow(30)
        tp.set_up()
        opt = dob.deepobs_optimizer_class("exact_gn")(tp.net.parameters(), rank_policy="raise")
        tp.train_init_op()
        loss, _ = tp.get_batch_loss_and_accuracy()
        loss.backward()
        opt.step()


def test_registered_optimizers_on_quadratic_deep(toy_registry, tmp_path):
    """DeepOBS's synthetic quadratic_deep (no data) with SGD, Adam and the toy plugin's
    optimizer, by registry name, on DeepOBS's own runner; DenseGN's drop-in step refuses it
    clearly: the network outputs the per-sample loss itself, no MSE / cross-entropy is applied
    to an output, so there is no Gauss-Newton target."""
    require_deepobs()
    out_dir = tmp_path / "res"
    results = {}
    with one_thread():
        for name, hps in (("sgd", {"lr": 0.01}), ("adam", {"lr": 0.01}),
                          ("toy.sign_sgd", {"lr": 0.01})):
            results[name] = dob.run_deepobs(name, "quadratic_deep", hps, batch_size=128,
                                            num_epochs=1, random_seed=42, output_dir=out_dir)
        with pytest.raises(LossCaptureError, match="no nn.MSELoss / nn.CrossEntropyLoss"):
            dob.run_deepobs("dense_gn", "quadratic_deep", batch_size=128, num_epochs=1,
                            output_dir=out_dir)
    folders = sorted(p.relative_to(out_dir).parts[:2] for p in _json_files(out_dir))
    assert folders == [("quadratic_deep", "gnrev.adam"), ("quadratic_deep", "gnrev.sgd"),
                       ("quadratic_deep", "toy.sign_sgd")]
    # one problem for all: DeepOBS draws its rotation from a module-level RNG that each set_up
    # advances; the adapter resets it, so every run starts from the same loss
    assert len({out["train_losses"][0] for out in results.values()}) == 1
    for name, out in results.items():
        assert out["optimizer_name"] == dob.deepobs_optimizer_class(name).registry_name
        assert "test_accuracies" not in out  # DeepOBS drops them for quadratic_deep
        assert out["train_losses"][1] < out["train_losses"][0], name
    assert results["toy.sign_sgd"]["optimizer_hyperparams"] == {"lr": 0.01}
    from gnrev_plugin.hosts import leaderboard  # noqa: PLC0415

    assert leaderboard.read_deepobs is dob.read_deepobs  # one reader, next to the writer
    curves = dob.read_deepobs(out_dir)
    assert sorted(c.optimizer for c in curves) == ["gnrev.adam[lr=0.01]", "gnrev.sgd[lr=0.01]",
                                                   "toy.sign_sgd[lr=0.01]"]


@needs_real_mnist
def test_registered_optimizers_on_deepobs_mnist_logreg_with_local_idx_files(toy_registry,
                                                                             tmp_path):
    """DeepOBS's own mnist_logreg (P = 7850: DenseGN's n·C = 320 ≤ P) on the real MNIST t10k
    images laid out for torchvision; one epoch each of DenseGN, the toy plugin's optimizer, Adam
    and SGD on DeepOBS's runner, filed by registry name."""
    deepobs = require_deepobs()
    data = dob.prepare_mnist_data_dir(tmp_path / "data", REAL_MNIST)
    problems = dob.register_local_mnist_problems()
    assert set(problems) == {"mnist_logreg_t10k", "mnist_mlp_t10k", "mnist_2c2d_t10k"}
    assert issubclass(problems["mnist_logreg_t10k"], deepobs.pytorch.testproblems.mnist_logreg)
    results = {}
    with one_thread():
        for name, hps in (("dense_gn", {}), ("toy.sign_sgd", {"lr": 1e-3}), ("adam", {}),
                          ("sgd", {"lr": 0.1})):
            results[name] = dob.run_deepobs(name, "mnist_logreg_t10k", hps, batch_size=32,
                                            num_epochs=1, random_seed=42,
                                            output_dir=tmp_path / "res", data_dir=data)
    assert sorted(p.relative_to(tmp_path / "res").parts[1] for p in _json_files(
        tmp_path / "res")) == ["gnrev.adam", "gnrev.dense_gn", "gnrev.sgd", "toy.sign_sgd"]
    gn = results["dense_gn"]
    assert gn["optimizer_name"] == "gnrev.dense_gn"
    assert gn["optimizer_hyperparams"] == OPTIMIZER_DEFAULTS["gnrev.dense_gn"]
    for name, out in results.items():
        # 8000 training images, 2000 held out for validation: 6000 / 32 = 187 steps
        assert len(out["minibatch_train_losses"]) == math.ceil(187 / 10), name
        assert out["test_accuracies"][0] < 0.2 and out["test_accuracies"][1] > 0.8, name


def _real_mnist_subset(root: Path, n_train: int, n_test: int) -> Path:
    """A ``train`` + ``t10k`` IDX folder cut from the real MNIST test split (so DeepOBS's loaders
    see few images and an epoch is a few steps)."""
    from gnrev_plugin.data import read_idx  # noqa: PLC0415

    images = read_idx(REAL_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(REAL_MNIST / "t10k-labels-idx1-ubyte.gz")
    root.mkdir(parents=True, exist_ok=True)
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, n_train + n_test))):
        dob.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.asarray(images[sl]))
        dob.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(labels[sl]))
    return root


@needs_real_mnist
@pytest.mark.parametrize("problem", ["mnist_mlp_t10k", "mnist_2c2d_t10k"])
def test_dense_gn_on_deepobs_mlp_and_2c2d(problem, tmp_path):
    """DenseGN through DeepOBS's own StandardRunner on DeepOBS's mnist_mlp (P = 1.34 M, all
    nn.Linear) and mnist_2c2d (P = 3.27 M, Conv2d + Linear): the structured Gram makes both fit
    (the dense J of a batch would be 320 × P). 4 steps of batch 32 on real MNIST images."""
    deepobs = require_deepobs()
    data = dob.prepare_mnist_data_dir(tmp_path / "data", _real_mnist_subset(tmp_path / "src",
                                                                            256, 64))
    problems = dob.register_local_mnist_problems(train_eval_size=128)
    assert issubclass(problems["mnist_2c2d_t10k"], deepobs.pytorch.testproblems.mnist_2c2d)
    with one_thread():
        out = dob.run_deepobs("dense_gn", problem, {}, batch_size=32, num_epochs=1,
                              random_seed=42, output_dir=tmp_path / "res", data_dir=data,
                              train_log_interval=1)
    assert out["optimizer_name"] == "gnrev.dense_gn" and out["testproblem"] == problem
    assert len(out["minibatch_train_losses"]) == 128 // 32
    assert all(math.isfinite(v) for v in out["minibatch_train_losses"])
    assert out["train_losses"][1] < out["train_losses"][0]


@needs_real_mnist
@pytest.mark.parametrize("net_name", ["net_mlp", "net_mnist_2c2d"])
def test_dense_gn_uses_the_structured_gram_on_deepobs_networks(net_name):
    """Every layer of DeepOBS's networks gets a structured Gram (Flatten before the first
    Linear no longer matters), and the step on 8 real images is exact."""
    deepobs = require_deepobs()
    from gnrev_plugin.data import load_idx_dataset  # noqa: PLC0415

    torch.manual_seed(0)
    net = getattr(deepobs.pytorch.testproblems.testproblems_modules, net_name)(10)
    ds = load_idx_dataset(REAL_MNIST, normalization="none")
    x, y = ds.x_test[:8].reshape(8, 1, 28, 28), ds.y_test[:8]
    opt = DenseGN(net.parameters(), model=net, lr=0.2, loss="cross_entropy",
                  max_jacobian_entries=10)          # the generic J would be refused
    opt.step_on_batch(x, y)
    kinds = {k: v.split(":")[0] for k, v in opt.last_step_info["layers"].items()}
    expect = ({"dense1": "linear", "dense2": "linear", "dense3": "linear", "dense4": "linear"}
              if net_name == "net_mlp" else
              {"conv1.1": "conv2d", "conv2.1": "conv2d", "dense1": "linear", "dense2": "linear"})
    assert kinds == expect and opt.last_step_exact
