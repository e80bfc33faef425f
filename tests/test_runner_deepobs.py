"""DeepOBS adapter: RevMLP test problems, ExactGN as a drop-in optimizer_class, and DeepOBS's
result folder/JSON layout, checked with our runner and (when its wheel imports with stubs) with
DeepOBS's own StandardRunner."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gnrev_plugin.hosts import deepobs as dob

HP = {"lr": {"type": float}}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big")
                                                         for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_idx_dir(root: Path, n_train=300, n_test=100, seed=0) -> Path:
    """MNIST-format files whose labels follow a fixed random linear teacher of the pixels."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((784, 10))
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = (x.reshape(n, -1) / 255.0 @ teacher).argmax(1)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    dob.set_data_dir("mnist", _fake_idx_dir(tmp_path / "mnist"))
    yield dob.make_test_problem("mnist_revmlp", hidden=64, num_blocks=2, train_eval_size=60)
    dob.set_data_dir("mnist", None)


def _json_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json"))


# ------------------------------------------------------------------ layout
def test_float2str_matches_deepobs_folder_names():
    # the verified DeepOBS folder name for lr=0.01, momentum=0.0 (host_ecosystem.md §4)
    assert dob.run_folder_name(2, 128, None, {"lr": 0.01, "momentum": 0.0}) == \
        "num_epochs__2__batch_size__128__lr__1.e-02__momentum__0.e+00"
    assert dob.float2str(0.125) == "1.25e-01"
    assert dob.run_folder_name(3, 64, 5e-4, {"lr": 1.0}) == \
        "num_epochs__3__batch_size__64__weight_decay__5.e-04__lr__1.e+00"


def test_runner_writes_deepobs_layout_with_every_key(tiny_mnist, tmp_path):
    out = tmp_path / "results"
    runner = dob.StandardRunner(dob.ExactGN, HP)
    result = runner.run(tiny_mnist, hyperparams={"lr": 0.5}, batch_size=30, num_epochs=2,
                        random_seed=7, output_dir=out, train_log_interval=2)
    files = _json_files(out)
    assert len(files) == 1
    rel = files[0].relative_to(out).as_posix()
    assert re.fullmatch(r"mnist_revmlp/ExactGN/num_epochs__2__batch_size__30__lr__5\.e-01/"
                        r"random_seed__7__\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d\.json", rel), rel
    data = json.loads(files[0].read_text())
    assert list(data) == list(dob.RESULT_KEYS)
    assert data == json.loads(json.dumps(result))
    assert (data["testproblem"], data["optimizer_name"], data["batch_size"],
            data["num_epochs"], data["random_seed"], data["weight_decay"]) == \
        ("mnist_revmlp", "ExactGN", 30, 2, 7, None)
    assert data["optimizer_hyperparams"] == {"lr": 0.5} and data["training_params"] == {}
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
    step) ExactGN takes the same step as its explicit path on the same batch."""
    torch.manual_seed(0)
    tp = tiny_mnist(30)
    tp.set_up()
    twin = copy.deepcopy(tp.net)
    opt = dob.ExactGN(tp.net.parameters(), lr=0.7, rank_policy="raise")
    ref = dob.ExactGN(twin.parameters(), lr=0.7, model=twin, rank_policy="raise")
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
    dob.StandardRunner(torch.optim.SGD, {"lr": {"type": float},
                                         "momentum": {"type": float, "default": 0.0}}).run(
        tiny_mnist, hyperparams={"lr": 0.01}, batch_size=30, num_epochs=1, random_seed=1,
        output_dir=out)
    dob.StandardRunner(dob.ExactGN, HP).run(tiny_mnist, hyperparams={"lr": 0.1}, batch_size=30,
                                            num_epochs=1, random_seed=1, output_dir=out)
    names = sorted(p.relative_to(out).parts[1:3] for p in _json_files(out))
    assert names == [("ExactGN", "num_epochs__1__batch_size__30__lr__1.e-01"),
                     ("SGD", "num_epochs__1__batch_size__30__lr__1.e-02__momentum__0.e+00")]
    for f in _json_files(out):
        assert all(math.isfinite(v) for v in json.loads(f.read_text())["train_losses"])


def test_skip_if_exists_does_not_repeat_a_run(tiny_mnist, tmp_path):
    runner = dob.StandardRunner(dob.ExactGN, HP)
    kwargs = dict(hyperparams={"lr": 0.1}, batch_size=30, num_epochs=1, random_seed=5,
                  output_dir=tmp_path)
    assert runner.run(tiny_mnist, skip_if_exists=True, **kwargs) is not None
    assert runner.run(tiny_mnist, skip_if_exists=True, **kwargs) is None
    assert len(_json_files(tmp_path)) == 1


def test_runner_rejects_undeclared_or_missing_hyperparameters(tiny_mnist, tmp_path):
    runner = dob.StandardRunner(dob.ExactGN, HP)
    with pytest.raises(ValueError, match="not declared"):
        runner.run(tiny_mnist, hyperparams={"lr": 0.1, "beta": 2.0}, output_dir=tmp_path)
    with pytest.raises(ValueError, match="no default"):
        runner.run(tiny_mnist, hyperparams={}, output_dir=tmp_path)


def test_fmnist_and_cifar10_problems_read_local_files(tmp_path, monkeypatch):
    dob.set_data_dir("fmnist", _fake_idx_dir(tmp_path / "fmnist", seed=1))
    try:
        tp = dob.make_test_problem("fmnist_revmlp", hidden=32, train_eval_size=50)(25)
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
    tp = dob.make_test_problem("cifar10_revmlp", hidden=32, num_blocks=2, train_eval_size=20)(10)
    tp.set_up()
    assert tp.net.in_features == 3072 and tp.net.num_blocks == 2


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GNREV_FMNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set_data_dir"):
        dob.fmnist_revmlp(32).set_up()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        dob.load_cifar10(tmp_path)


# ------------------------------------------------------------------ the real DeepOBS wheel
_STUBBED_DEEPOBS = textwrap.dedent("""
    import importlib.machinery, json, sys
    from unittest.mock import MagicMock
    for m in ["tensorflow", "torchvision", "torchvision.datasets", "torchvision.transforms",
              "matplotlib2tikz", "seaborn", "six", "six.moves"]:
        mod = MagicMock(); mod.__spec__ = importlib.machinery.ModuleSpec(m, None)
        sys.modules[m] = mod
    import torch
    from deepobs import pytorch as pt
    from gnrev_plugin.hosts import deepobs as dob
    import os
    data_dir, out = os.environ["GNREV_TEST_DATA"], os.environ["GNREV_TEST_OUT"]
    sys.argv = sys.argv[:1]  # DeepOBS parses missing arguments from the command line
    dob.set_data_dir("mnist", data_dir)
    tiny = dob.make_test_problem("mnist_revmlp", hidden=64, num_blocks=2, train_eval_size=60)
    dob.register_with_deepobs({"mnist_revmlp": tiny})
    runner = pt.runners.StandardRunner(dob.ExactGN, {"lr": {"type": float}})
    runner.run(testproblem="mnist_revmlp", hyperparams={"lr": 0.5}, batch_size=30, num_epochs=2,
               random_seed=3, output_dir=out, data_dir=out + "/unused", weight_decay=None,
               no_logs=False, train_log_interval=2, print_train_iter=False, tb_log=False,
               tb_log_dir="none")
    # DeepOBS's analyzer on the folder written by gnrev's runner
    from deepobs.analyzer import shared_utils
    from deepobs import config
    assert config.get_testproblem_default_setting("mnist_revmlp")["batch_size"] == 128
    ours = os.path.join(os.environ["GNREV_TEST_OURS"], "mnist_revmlp", "ExactGN")
    for name in shared_utils._read_all_settings_folders(ours):
        setting = os.path.join(ours, name)
        for f in os.listdir(setting):
            shared_utils._check_output_structure(setting, f)  # prints on a corrupted file
    best = shared_utils.create_setting_analyzer_ranking(ours, "final", "valid_accuracies")[0]
    print("ANALYZER", json.dumps({"n_runs": best.n_runs,
                                  "final_valid_acc": best.get_final_value("valid_accuracies"),
                                  "best_test_loss": best.get_best_value("test_losses")}))
""")


def _deepobs_available() -> str | None:
    if importlib.util.find_spec("deepobs") is None:
        return "the deepobs wheel is not installed (pip install --no-deps deepobs==1.1.2)"
    return None


@pytest.mark.skipif(_deepobs_available() is not None, reason=str(_deepobs_available()))
def test_deepobs_standard_runner_gives_the_same_json_as_ours(tmp_path):
    """DeepOBS 1.1.2's own StandardRunner (TF/torchvision/plotting imports stubbed, in a
    subprocess) runs ExactGN on our problem; its JSON equals ours key by key and value by value,
    and DeepOBS's analyzer reads the folder our runner wrote."""
    data_dir = _fake_idx_dir(tmp_path / "mnist")
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    dob.set_data_dir("mnist", data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the OMP_NUM_THREADS=1 subprocess
    try:
        tiny = dob.make_test_problem("mnist_revmlp", hidden=64, num_blocks=2, train_eval_size=60)
        dob.StandardRunner(dob.ExactGN, HP).run(tiny, hyperparams={"lr": 0.5}, batch_size=30,
                                                num_epochs=2, random_seed=3, output_dir=ours,
                                                train_log_interval=2)
    finally:
        dob.set_data_dir("mnist", None)
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", GNREV_TEST_DATA=str(data_dir),
               GNREV_TEST_OUT=str(theirs), GNREV_TEST_OURS=str(ours))
    proc = subprocess.run([sys.executable, "-c", _STUBBED_DEEPOBS],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr:
        pytest.skip("deepobs does not import even with its optional deps stubbed: "
                    + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "corrupted" not in proc.stdout
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("ANALYZER ")]
    analyzed = json.loads(line.split(" ", 1)[1])
    (f_theirs,), (f_ours,) = _json_files(theirs), _json_files(ours)
    assert f_theirs.relative_to(theirs).parent == f_ours.relative_to(ours).parent
    assert f_theirs.name.rsplit("__", 1)[0] == f_ours.name.rsplit("__", 1)[0]
    a, b = json.loads(f_theirs.read_text()), json.loads(f_ours.read_text())
    assert list(a) == list(b) == list(dob.RESULT_KEYS)
    for key in a:
        if isinstance(a[key], list):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            assert a[key] == b[key], key
    assert analyzed["n_runs"] == 1
    assert analyzed["final_valid_acc"] == pytest.approx(b["valid_accuracies"][-1])
    assert analyzed["best_test_loss"] == pytest.approx(min(b["test_losses"]))
