"""Devices in the host runners: the benchopt solver's ``device`` parameter, gnrev's DeepOBS
problems following DeepOBS's default device, the AlgoPerf submission on the parameters' device;
in the device trap on every machine, against the CPU on a GPU (``@pytest.mark.cuda``). The trap
is described in ``tests/device_trap.py``."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from device_trap import (
    CPU,
    CUDA,
    _close,
    _data,
    _model_for,
    _plain,
    device_trap,
)

from gnrev_plugin.build import build_model
from gnrev_plugin.hosts import algoperf as ap


# ============================================================================ benchopt
def _benchopt_solver(name, device="cpu", **params):
    pytest.importorskip("benchopt", reason="benchopt is not installed")
    from gnrev_plugin.hosts.benchopt.solvers import make_solver

    X, y = _data(CPU, n=24)
    init = partial(build_model, "gnrev.revmlp", dict(hidden=32, num_blocks=2, init_std=0.3),
                   in_features=8, num_classes=3, seed=3)
    solver = make_solver(name).get_instance(device=device, batch_size=8, **params)
    return solver, dict(X=X.float(), y=y, model_init_fn=init, loss="cross_entropy",
                        track_batch_loss_change=True)


class _Epochs:
    def __init__(self, n):
        self.left = n + 1

    def __call__(self):
        self.left -= 1
        return self.left > 0


def _solve(solver, objective, epochs=2):
    solver.set_objective(**objective)
    solver.run(_Epochs(epochs))
    return solver.get_result()


def test_benchopt_device_parameter_cpu_runs_and_is_in_the_name():
    """``device`` is a benchopt parameter (so ``-s "gnrev.exact_gn[device=cuda]"`` selects it);
    ``device=cpu`` trains on the CPU, as the default does."""
    from gnrev_plugin.hosts.benchopt.solvers import make_solver

    solver, objective = _benchopt_solver("gnrev.exact_gn", device="cpu")
    assert make_solver("gnrev.exact_gn").parameters["device"] == ["cpu"]  # the default
    assert "device=cpu" in str(solver)
    assert solver.skip(**objective) == (False, None)
    result = _solve(solver, objective)
    assert {p.device for p in result["model"].parameters()} == {CPU}
    assert result["exact_step_fraction"] == 1.0


def test_benchopt_solver_builds_no_tensor_on_the_default_device():
    """The solver's epochs (batch order, GN steps) in the device trap give the model they give
    outside it."""
    models = []
    for trapped in (False, True):
        solver, objective = _benchopt_solver("gnrev.exact_gn")
        solver.set_objective(**objective)
        model = solver.model_init_fn()
        solver.model_init_fn = lambda model=model: model  # built outside the trap
        with device_trap() if trapped else contextlib.nullcontext():
            solver.run(_Epochs(2))
        models.append(_plain(list(solver.get_result()["model"].parameters())))
    _close(models[1], models[0], rtol=1e-12, atol=0.0)


def test_benchopt_device_cuda_without_a_gpu_is_refused(monkeypatch):
    """``device=cuda`` where torch sees no GPU: the solver skips saying so, and
    ``set_objective`` raises the same clear ``ValueError`` (no silent CPU run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    solver, objective = _benchopt_solver("gnrev.exact_gn", device="cuda")
    skip, reason = solver.skip(**objective)
    assert skip and "device 'cuda' requested" in reason and "is_available() is False" in reason
    with pytest.raises(ValueError, match="is_available\\(\\) is False"):
        solver.set_objective(**objective)


@pytest.mark.cuda
def test_benchopt_solver_on_cuda_matches_the_cpu():
    """``gnrev.exact_gn[device=cuda]``: the model trains on the GPU, every step exact, and ends
    where the CPU run ends (float32, ``atol = 1e-4``); the shipped objective evaluates it."""
    cpu = _solve(*_benchopt_solver("gnrev.exact_gn", device="cpu"))
    solver, objective = _benchopt_solver("gnrev.exact_gn", device="cuda")
    assert solver.skip(**objective) == (False, None)
    gpu = _solve(solver, objective)
    assert {p.device.type for p in gpu["model"].parameters()} == {"cuda"}
    assert gpu["exact_step_fraction"] == 1.0
    for p, q in zip(gpu["model"].parameters(), cpu["model"].parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-3, atol=1e-4)


# ============================================================================ DeepOBS
@pytest.fixture
def deepobs_device():
    """DeepOBS's default device, restored after the test; and a tiny gnrev MNIST problem."""
    dob = pytest.importorskip("gnrev_plugin.hosts.deepobs")
    from gnrev_plugin.compat import deepobs as compat

    try:
        config = compat.import_deepobs().pytorch.config
    except ModuleNotFoundError as err:
        if err.name != "deepobs":
            raise
        pytest.skip(f"DeepOBS is not installed ({err})")
    saved = config.get_default_device()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(120, 784, generator=gen)
    y = torch.randint(0, 10, (120,), generator=gen)
    from gnrev_plugin.data import Dataset

    ds = Dataset("mnist", x[:90], y[:90], x[90:], y[90:], 10)
    problem = dob.make_test_problem("mnist_revmlp", {"hidden": 16}, train_eval_size=30)
    problem.load_data = lambda self: ds  # in-memory data instead of IDX files
    try:
        yield config, problem
    finally:
        config.set_default_device(saved)


def test_deepobs_problem_follows_deepobs_default_device(deepobs_device, monkeypatch):
    """gnrev's DeepOBS problems take DeepOBS's ``config.get_default_device()`` (DeepOBS's
    ``TestProblem`` convention): ``set_default_device("cpu")`` gives a CPU network; another
    device (``meta``, the one any CPU machine has) is followed too; ``cuda`` where torch sees no
    GPU is refused clearly."""
    config, problem_cls = deepobs_device
    from gnrev_plugin.compat import deepobs as compat

    config.set_default_device("cpu")
    tp = problem_cls(30)
    tp.set_up()
    assert compat.default_device() == "cpu"
    assert {p.device for p in tp.net.parameters()} == {CPU}
    tp.train_init_op()
    loss, _ = tp.get_batch_loss_and_accuracy()
    assert loss.device == CPU

    config.set_default_device("meta")
    tp = problem_cls(30)
    tp.set_up()
    assert {p.device.type for p in tp.net.parameters()} == {"meta"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config.set_default_device("cuda")
    with pytest.raises(ValueError, match="is_available\\(\\) is False"):
        problem_cls(30)


@pytest.mark.cuda
def test_deepobs_runner_on_cuda(deepobs_device, tmp_path):
    """With DeepOBS's default device ``cuda`` gnrev's runner trains the network on the GPU; the
    losses it logs are those of the CPU run (``rtol = 1e-3``)."""
    config, problem_cls = deepobs_device
    from gnrev_plugin.hosts import deepobs as dob

    outputs = {}
    for device in ("cpu", "cuda"):
        config.set_default_device(device)
        cls = dob.deepobs_optimizer_class("gnrev.exact_gn")
        runner = dob.StandardRunner(cls, dob.hyperparameter_names(cls.registry_name))
        tp = runner.create_testproblem(problem_cls, 30, None, 42)
        assert {p.device.type for p in tp.net.parameters()} == {device}
        outputs[device] = runner.training(tp, {"lr": 0.2, "rank_policy": "warn"}, 1, False, 1)
    for key in ("train_losses", "test_losses", "minibatch_train_losses"):
        torch.testing.assert_close(torch.tensor(outputs["cuda"][key]),
                                   torch.tensor(outputs["cpu"][key]), rtol=1e-3, atol=1e-5)


# ============================================================================ AlgoPerf
class _Workload:
    """AlgoPerf's PyTorch workload contract (``model_fn``, ``loss_fn``), on the batch's device
    as AlgoPerf's workloads are (they create their tensors on ``pytorch_setup()``'s device)."""

    class loss_type:  # noqa: N801 - AlgoPerf's spec.LossType member
        name = "SOFTMAX_CROSS_ENTROPY"

    def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state, mode, rng,
                 update_batch_norm, dropout_rate=0.0):
        return params(augmented_and_preprocessed_input_batch["inputs"]), model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        per = F.cross_entropy(logits_batch, label_batch, reduction="none",
                              label_smoothing=label_smoothing)
        if mask_batch is None:
            return {"summed": per.sum(), "per_example": per,
                    "n_valid_examples": torch.as_tensor(len(per), device=per.device)}
        per = per * mask_batch
        return {"summed": per.sum(), "per_example": per, "n_valid_examples": mask_batch.sum()}


def _algoperf_steps(optimizer: str, device, trapped: bool = False, steps: int = 2):
    X, y = _data(device)
    model = _model_for(optimizer, device)
    hps = {"learning_rate": 0.3}
    with device_trap() if trapped else contextlib.nullcontext():
        state = ap.init_optimizer_state(_Workload(), model, None, hps, None, optimizer=optimizer)
        for step in range(steps):
            state, model, _ = ap.update_params(
                _Workload(), model, None, None, hps, {"inputs": X, "targets": y},
                _Workload.loss_type, state, [], step, None)
    return model


@pytest.mark.parametrize("optimizer", ["gnrev.dense_gn", "gnrev.exact_gn", "gnrev.sgd"])
def test_algoperf_submission_uses_the_params_device(optimizer):
    """The submission builds nothing on a default device: its optimizer state and steps come
    from the model AlgoPerf passes (on ``pytorch_setup()``'s device) and the batch; two steps in
    the device trap give the parameters of two steps outside it."""
    ref = _plain(list(_algoperf_steps(optimizer, CPU).parameters()))
    got = _plain(list(_algoperf_steps(optimizer, CPU, trapped=True).parameters()))
    _close(got, ref, rtol=1e-12, atol=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["gnrev.dense_gn", "gnrev.exact_gn", "gnrev.sgd"])
def test_algoperf_submission_on_cuda_matches_the_cpu(optimizer):
    """On a CUDA model and batch the submission's steps stay on the GPU and match the CPU's
    (float64, ``rtol = 1e-6``)."""
    gpu = _algoperf_steps(optimizer, CUDA)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    cpu = _algoperf_steps(optimizer, CPU)
    for p, q in zip(gpu.parameters(), cpu.parameters(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-9)
