"""Devices: every metric, optimizer step and runner computes on the device of its model and data.

**Without a GPU: the device trap** (:class:`DeviceTrap`). The bug to catch is a tensor that a
GPU run would hold on the CPU — built without naming a device (``torch.eye(n)``: torch's default
device is the CPU), drawn from a CPU generator, made by ``.cpu()`` / ``.to("cpu")`` /
``device="cpu"`` — meeting the data. On a GPU that is a "tensors on different devices" error (or
a silent copy per call); on a CPU-only machine it is invisible, since the data *are* on the CPU.
The trap makes it visible without a GPU: a :class:`~torch.overrides.TorchFunctionMode` tags
every such tensor (and what is computed from tags alone) as *host* and everything else as
*data*, and raises :class:`DeviceLeak` when one torch call gets both (a 0-d host tensor is
allowed, as torch allows CPU scalars beside GPU tensors), or on ``.numpy()`` of data.
``x.to(X.device)`` turns a host tensor into data, as on a GPU. The value computed in the trap
must equal the value computed outside it. The convention this enforces: a constructor names its
device — the data's (``device=X.device``) or ``device="cpu"`` for a CPU-side draw whose values
then move with ``.to(X.device)`` (the same numbers on every device).

Blind spots (the ``cuda`` tests cover them): ``torch.device("cpu")`` objects cannot be told from
the data's device here; code that branches on ``device.type == "cpu"`` looks leaky; code run by
autograd hooks during ``backward()`` (BackPACK's extension rules) is outside any torch function
mode. Code that builds modules (``nn.Linear`` follows the default device by design) runs outside
the trap; only computations on built models and data run inside it.

**With a GPU** (``@pytest.mark.cuda``; skipped with the reason otherwise): every registered
metric on CUDA against the CPU, every optimizer step, the benchopt solver with ``device=cuda``,
the DeepOBS runner with DeepOBS's default device ``cuda``, the AlgoPerf submission on a CUDA
model, ``gnrev train --device cuda`` and ``gnrev reproduce EXPERIMENT --preset smoke --device
cuda`` for every experiment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import weakref
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from realdata import REAL_MNIST, needs_real_mnist
from torch import nn
from torch.overrides import TorchFunctionMode

from gnrev_plugin import metrics as M
from gnrev_plugin.build import build_model, build_optimizer
from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.hosts.curvlinops import (
    GaussNewtonStepOperator,
    NMELinearOperator,
    NTKLinearOperator,
    to_dense,
)
from gnrev_plugin.registry import get_registry
from gnrev_plugin.stepping import train_step

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ============================================================================ the device trap
class DeviceLeak(AssertionError):
    """A tensor that would be on another device than the data met the data."""


#: torch's factory functions (those ``torch.set_default_device`` redirects).
CONSTRUCTORS = frozenset(getattr(torch, n) for n in (
    "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace",
    "logspace", "ones", "rand", "randint", "randn", "randperm", "range", "scalar_tensor",
    "tensor", "tril_indices", "triu_indices", "zeros", "bartlett_window", "blackman_window",
    "hamming_window", "hann_window", "kaiser_window") if hasattr(torch, n))


def _host_string(device) -> bool:
    return isinstance(device, str) and torch.device(device).type == "cpu"


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class DeviceTrap(TorchFunctionMode):
    """Simulates data on an accelerator while everything runs on the CPU (module docstring).

    Two kinds of tensors: *data* (the model's and the inputs', and all that is computed from
    them) and *host* tensors, what a GPU run would hold on the CPU: built without naming a
    device (torch's default device, and a CPU generator's, is the CPU), built or moved with
    the string ``"cpu"`` (``device="cpu"``, ``.to("cpu")``), made by ``.cpu()``, and what is
    computed from host tensors alone. A call that mixes data with a host tensor of ≥ 1
    dimension (torch allows CPU scalars next to GPU tensors) raises :class:`DeviceLeak`, and so
    does ``.numpy()`` of data. A ``torch.device`` object or a
    tensor as the target (``device=X.device``, ``.to(X.device)``, ``.to(other)``) counts as the
    data's device: here it *is* the CPU, so the trap cannot tell ``torch.device("cpu")`` from
    it (a blind spot, not a false alarm).
    """

    def __init__(self) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref] = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, out) -> None:
        for t in _tensors(out):
            self._host[id(t)] = weakref.ref(t)

    def _unmark(self, out) -> None:
        for t in _tensors(out):
            self._host.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__qualname__", str(func))
        if func in CONSTRUCTORS and not _tensors(args):
            device = kwargs.get("device")
            out = func(*args, **kwargs)
            if device is None or _host_string(device):  # torch's default device: the CPU
                self._mark_host(out)
            return out
        tensors = _tensors((args, kwargs))
        host = [t for t in tensors if self._is_host(t)]
        data = [t for t in tensors if not self._is_host(t)]
        if data and any(t.dim() > 0 for t in host):
            raise DeviceLeak(f"{name} got a host tensor (built without naming its device, from a "
                             "CPU generator, or by 'cpu' / .cpu()) together with the data, "
                             "which would be on the accelerator")
        if func is torch.Tensor.numpy and data:
            raise DeviceLeak("numpy() of a tensor on the data's device (an accelerator tensor "
                             "has no numpy view; move it with .cpu() first)")
        out = func(*args, **kwargs)
        targets = [a for a in (*args[1:], kwargs.get("device"))
                   if isinstance(a, str | torch.device | torch.Tensor)]
        moves = func is torch.Tensor.cpu or (func is torch.Tensor.to and targets)
        if moves and out is args[0]:
            out = out.clone()  # a move between devices copies: the source keeps its kind
        if func is torch.Tensor.cpu or (moves and _host_string(targets[0])):
            self._mark_host(out)
        elif moves:
            self._unmark(out)  # moved to a named device: the data's (class docstring)
        elif host and not data:
            self._mark_host(out)
        return out


@contextlib.contextmanager
def device_trap() -> Iterator[None]:
    """Run the body in a :class:`DeviceTrap`."""
    with DeviceTrap():
        yield


def _plain(value) -> object:
    """A metric's value as nested Python floats/ints/strings (tensors moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().double().tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    return float(value)


def _close(a, b, rtol: float, atol: float, path: str = "") -> None:
    """``a`` and ``b`` (from :func:`_plain`) agree: same structure, numbers within
    ``|a − b| ≤ atol + rtol·|b|`` (NaN equals NaN)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b:
            _close(a[k], b[k], rtol, atol, f"{path}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(b, float):
        assert isinstance(a, float | int), path
        if math.isnan(b):
            assert math.isnan(a), path
        else:
            assert abs(a - b) <= atol + rtol * abs(b), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_the_trap_catches_each_kind_of_device_bug_and_passes_the_fixes():
    """The trap's own check, each bug beside its fix: a constructor without a device meeting the
    data (also through ``@``, which torch alone lets through with garbage), a CPU generator's
    draw used without moving it, ``.cpu()`` / ``.to("cpu")`` results meeting the data,
    ``.numpy()`` of data."""
    X = torch.randn(3, 3, dtype=torch.float64)
    with device_trap():
        with pytest.raises(DeviceLeak):
            torch.kron(X, torch.eye(2, dtype=X.dtype))
        with pytest.raises(DeviceLeak):
            X @ torch.eye(3, dtype=X.dtype)
        assert torch.equal(X @ torch.eye(3, dtype=X.dtype, device=X.device), X)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(3, 3, generator=gen, dtype=X.dtype)
        with pytest.raises(DeviceLeak):
            X + noise.mean(0)                       # host-derived, not moved
        assert (X + noise.mean(0).to(X.device)).shape == (3, 3)
        with pytest.raises(DeviceLeak):
            X - X.cpu()
        with pytest.raises(DeviceLeak):
            X - torch.ones(3, dtype=X.dtype, device="cpu")
        with pytest.raises(DeviceLeak):
            X.sum(0).to("cpu") * X
        assert float((X * X.sum().cpu()).sum()) == float((X * X.sum()).sum())  # CPU scalar: ok
        with pytest.raises(DeviceLeak):
            X.numpy()
        assert X.cpu().numpy().shape == (3, 3)


# ============================================================================ metric cases
@dataclasses.dataclass
class Case:
    """``fn(device)`` builds models and data on ``device`` (outside any trap) and returns the
    zero-argument computation to check. ``stable``: the value is the same on every device up
    to rounding (deterministic); otherwise (random probes drawn on the device) only its
    structure and finiteness are compared across devices."""

    fn: Callable[[torch.device], Callable[[], object]]
    stable: bool = True


CE = nn.CrossEntropyLoss()


def _data(device, n=6, d=8, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return X.to(device), y.to(device)


def _rev(device, seed=0, d=8, c=3):
    return build_model("gnrev.revmlp", dict(hidden=16, num_blocks=2, init_std=0.3),
                       in_features=d, num_classes=c, seed=seed).double().to(device)


def _mlp(device, seed=0, d=8, c=3):
    return build_model("gnrev.mlp", dict(hidden=[5], activation="tanh"), in_features=d,
                       num_classes=c, seed=seed).double().to(device)


def _cond(report) -> dict:
    return dict(kappa=report.kappa, rank=report.rank, lambda_max=report.lambda_max)


def _hess_exact(device):
    X, y = _data(device)
    model = _mlp(device)

    def run():
        s = M.decompose(model, CE, (X, y)).summary(seed=0)
        return dict(trace={k: v.value for k, v in s.trace.items()}, top=s.top_eigenvalues,
                    lambda_min=s.lambda_min_hessian)
    return run


def _hess_estimated(device):
    X, y = _data(device)
    model = _mlp(device)
    def run():  # every estimator runs; the seeded ones are compared (ARPACK's start varies)
        s = M.decompose(model, CE, (X, y)).summary(
            exact_max_dim=0, num_matvecs=3, block_num_matvecs=3, top_k=1, lambda_min=False,
            spectral_density=True, density_ncv=4, eigsh_maxiter=30, eigsh_tol=1e-3,
            seed=0).to_dict()
        return {k: s[k] for k in ("trace", "frobenius", "surrogate_check", "blocks",
                                  "nme_split")}
    return run


def _ntk_pair(device):
    X, _ = _data(device)
    return M.empirical_ntk(_rev(device), X), M.empirical_ntk(_rev(device, seed=1), X)


def _percentage_loss_change(device):
    X, y = _data(device)
    model = _mlp(device)
    opt = build_optimizer("gnrev.sgd", model, {"lr": 0.1})

    def step():
        opt.zero_grad()
        CE(model(X), y).backward()
        opt.step()
    return lambda: M.percentage_loss_change(model, CE, X, y, step)


def _representations(device):
    X, _ = _data(device, n=10)
    a, b = _rev(device), _rev(device, seed=1)
    return lambda: M.cka_by_layer(M.revmlp_representations(a, X), M.revmlp_representations(b, X))


def _deep_linear(device):
    gen = torch.Generator().manual_seed(3)
    Ws = [torch.randn(m, k, generator=gen, dtype=torch.float64).to(device)
          for k, m in ((3, 4), (4, 4), (4, 2))]
    A = torch.randn(3, 3, generator=gen, dtype=torch.float64).to(device)
    Sigma = A @ A.T + torch.eye(3, dtype=torch.float64, device=device)
    return lambda: dict(
        spectrum=M.deep_linear_gn_spectrum(Ws, Sigma),
        bounds={k: v for k, v in M.deep_linear_condition_bounds(Ws, Sigma).items()
                if k != "terms"},
        residual=M.deep_linear_gn_spectrum(M.residual_weights(Ws, 0.7), Sigma),
        lemma=M.spectrum_lemma_matrix(Ws), whitened=M.whitened_two_layer_condition_number(
            Ws[0], Ws[2] @ Ws[1]))


def _two_layer_relu(device):
    gen = torch.Generator().manual_seed(4)
    W, V, X = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device)
               for s in ((2, 4), (4, 3), (5, 3)))
    return lambda: M.two_layer_relu_gram(W, V, X)


def _curvlinops_ops(device):
    X, y = _data(device)
    rev, mlp = _rev(device), _mlp(device)
    params = [p for p in mlp.parameters()]
    return lambda: dict(
        nme=to_dense(NMELinearOperator(mlp, CE, params, [(X, y)], check_deterministic=False)),
        ntk=to_dense(NTKLinearOperator(mlp, params, X, check_deterministic=False)),
        step=to_dense(GaussNewtonStepOperator(rev, X, rank_policy="raise")))  # exact: stable


def _backpack(device):
    """BackPACK's second-order extensions on gnrev's coupling leaves (``hosts/backpack.py``).
    Their rules run in autograd hooks during ``backward()``, where torch function modes are not
    active: the trap sees the forward only, and the ``cuda`` test is what checks the rules."""
    pytest.importorskip("backpack", reason="backpack-for-pytorch is not installed")
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact, DiagHessian

    from gnrev_plugin.hosts.backpack import enabled
    from gnrev_plugin.nn import RevMLP

    X, y = _data(device, c=6)
    # 6 classes on width-4 couplings: the DiagHessian factor lists get compressed (compress())
    model = extend(RevMLP(8, 4, 3, 6, activation="tanh", linear_first_block=False,
                          seed=0).double().to(device))
    loss_fn = extend(nn.CrossEntropyLoss())

    def run():
        with enabled():
            loss = loss_fn(model(X), y)
            with backpack(DiagGGNExact(), BatchGrad(), DiagHessian()):
                loss.backward()
        return {n: [p.diag_ggn_exact, p.grad_batch, p.diag_h] for n, p in model.named_parameters()}
    return run


def _run_metric(name: str, model_fn, **kw):
    def make(device):
        X, y = _data(device)
        model, model0 = model_fn(device, seed=1), model_fn(device, seed=0)
        fn = get_registry().get_metric(name)
        return lambda: fn(model, inputs=X, targets=y, loss_fn=CE, initial_model=model0, **kw)
    return make


def _empirical_ntk(device):
    X, rev, mlp, part = _data(device)[0], _rev(device), _mlp(device), _rev(device, seed=2)
    part.blocks[1].g.linear.weight.requires_grad_(False)   # a coupling with only its bias on
    return lambda: dict(revmlp=M.empirical_ntk(rev, X), mlp=M.empirical_ntk(mlp, X),
                        traced=M.empirical_ntk(rev, X, trace_outputs=True),
                        bias_only=M.empirical_ntk(part, X))


def _gn_condition_number(device):
    data, mlp = _data(device), _mlp(device)
    return lambda: dict(parameter=_cond(M.gn_condition_number(mlp, CE, data, side="parameter")),
                        gram=_cond(M.gn_condition_number(mlp, CE, data, side="gram")))


def _kernel_target_alignment(device):
    K, y = _ntk_pair(device)[0], _data(device)[1]
    return lambda: M.kernel_target_alignment(K, y, 3)


def _cka(fn):
    def make(device):
        X = _data(device)[0]
        return lambda: fn(X, torch.tanh(X))
    return make


def _kernel_pair(fn):
    def make(device):
        K1, K2 = _ntk_pair(device)
        return lambda: fn(K1, K2)
    return make


def _weights(fn):
    def make(device):
        a, b = _rev(device), _rev(device, seed=1)
        return lambda: fn(a, b)
    return make


def _random_probe_similarity(device):
    X, a, b = _data(device)[0], _rev(device), _rev(device, seed=1)
    return lambda: M.random_probe_similarity(a, b, X, num_probes=4, seed=2)


#: Every registered metric (``gnrev.*``) and the other device-sensitive library functions.
METRIC_CASES: dict[str, Case] = {
    # run metrics: fn(model, inputs=, targets=, loss_fn=, initial_model=)
    **{name: Case(_run_metric(name, _mlp if name == "gnrev.nme_trace" else _rev))
       for name in ("gnrev.ntk_similarity_to_init", "gnrev.cka_to_init",
                    "gnrev.weight_cosine_to_init", "gnrev.weight_norm_ratio_to_init",
                    "gnrev.gn_condition_number_on_batch", "gnrev.nme_trace")},
    # library functions
    "gnrev.decompose": Case(_hess_exact),
    "gnrev.decompose/estimated": Case(_hess_estimated, stable=False),
    "gnrev.empirical_ntk": Case(_empirical_ntk),
    "gnrev.gn_condition_number": Case(_gn_condition_number),
    "gnrev.kernel_target_alignment": Case(_kernel_target_alignment),
    "gnrev.linear_cka": Case(_cka(M.linear_cka)),
    "gnrev.rbf_cka": Case(_cka(M.rbf_cka)),
    "gnrev.cka_by_layer": Case(_representations),
    "gnrev.ntk_similarity": Case(_kernel_pair(M.ntk_similarity)),
    "gnrev.ntk_velocity": Case(_kernel_pair(M.ntk_velocity)),
    "gnrev.percentage_loss_change": Case(_percentage_loss_change),
    "gnrev.weight_cosine_similarity": Case(_weights(M.weight_cosine_similarity)),
    "gnrev.weight_norm_ratio": Case(_weights(M.weight_norm_ratio)),
    # not registered, device-sensitive
    "random_probe_similarity": Case(_random_probe_similarity),
    "deep_linear": Case(_deep_linear),
    "two_layer_relu_gram": Case(_two_layer_relu),
    "hosts.curvlinops": Case(_curvlinops_ops),
    "hosts.backpack": Case(_backpack),
}


def test_every_registered_metric_has_a_device_case():
    """A new built-in metric must join :data:`METRIC_CASES` (and so the CPU trap and CUDA)."""
    registered = {n for n in get_registry().names("metric") if n.startswith("gnrev.")}
    cases = {n.partition("/")[0] for n in METRIC_CASES if n.startswith("gnrev.")}
    assert cases == registered


@pytest.mark.parametrize("name", list(METRIC_CASES))
def test_metric_builds_no_tensor_on_the_default_device(name):
    """In the device trap every metric gives exactly the value it gives outside it."""
    case = METRIC_CASES[name]
    expected = _plain(case.fn(CPU)())
    run = case.fn(CPU)          # fresh models and data, built outside the trap
    with device_trap():
        got = run()
    _close(_plain(got), expected, rtol=1e-12, atol=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(METRIC_CASES))
def test_metric_on_cuda_matches_the_cpu(name):
    """Every metric on a CUDA model and data: the value of the CPU (deterministic ones to
    ``rtol = 1e-6`` in float64; the random-probe estimates: same structure, finite)."""
    case = METRIC_CASES[name]
    expected = _plain(case.fn(CPU)())
    got = _plain(case.fn(CUDA)())
    if case.stable:
        _close(got, expected, rtol=1e-6, atol=1e-9)
    else:
        _close(json.loads(json.dumps(got, default=str).replace("NaN", "0")),
               json.loads(json.dumps(expected, default=str).replace("NaN", "0")),
               rtol=math.inf, atol=math.inf)


# ============================================================================ optimizer steps
def _optimizer_names() -> list[str]:
    return [n for n in get_registry().names("optimizer") if n.startswith("gnrev.")]


def _model_for(name: str, device, seed=0):
    return (_mlp if name == "gnrev.dense_gn" else _rev)(device, seed=seed)


@pytest.mark.parametrize("name", _optimizer_names())
def test_optimizer_step_builds_no_tensor_on_the_default_device(name):
    """Two steps of every registered optimizer (GN family, sharpness regularisers, SGD, Adam)
    inside the trap give the parameters of two steps outside it."""
    X, y = _data(CPU)
    results = []
    for trapped in (False, True):
        model = _model_for(name, CPU)
        opt = build_optimizer(name, model, {}, loss="cross_entropy")
        with device_trap() if trapped else contextlib.nullcontext():
            for _ in range(2):
                train_step(opt, model, CE, X, y, reevaluate=False)
        if hasattr(opt, "close"):
            opt.close()
        results.append(_plain(list(model.parameters())))
    _close(results[1], results[0], rtol=1e-12, atol=0.0)


def _steps_on(name: str, device) -> list[torch.Tensor]:
    X, y = _data(device)
    model = _model_for(name, device)
    opt = build_optimizer(name, model, {}, loss="cross_entropy")
    for _ in range(2):
        train_step(opt, model, CE, X, y, reevaluate=False)
    if hasattr(opt, "close"):
        opt.close()
    return [p.detach() for p in model.parameters()]


@pytest.mark.cuda
@pytest.mark.parametrize("name", _optimizer_names())
def test_optimizer_step_on_cuda_matches_the_cpu(name):
    """Two steps of every registered optimizer on a CUDA model stay on the GPU and give the
    CPU's parameters (float64, ``rtol = 1e-6``); the methods that draw noise or probes from a
    generator on the parameters' device (``seed`` option) draw other numbers there: finite."""
    gpu = _steps_on(name, CUDA)
    assert {p.device.type for p in gpu} == {"cuda"}
    if "seed" in get_registry().entry("optimizer", name).defaults:
        assert all(bool(torch.isfinite(p).all()) for p in gpu)
        return
    for p, q in zip(gpu, _steps_on(name, CPU), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-9)


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


# ============================================================================ CLI on CUDA
@pytest.mark.cuda
def test_train_cli_on_cuda(tmp_path):
    """``gnrev train --device cuda`` records the device and ends near the CPU run's loss."""
    from gnrev_plugin.cli import main
    from gnrev_plugin.engine.rundir import read_jsonl

    args = ["train", "--data", "teacher-student", "--epochs", "2", "--batch-size", "32",
            "--model-opt", "hidden=64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 0
    assert json.loads((tmp_path / "cuda" / "config.json").read_text())["spec"]["device"] == "cuda"
    cpu, gpu = read_jsonl(tmp_path / "cpu" / "log.jsonl"), read_jsonl(tmp_path / "cuda" /
                                                                       "log.jsonl")
    assert len(cpu) == len(gpu)
    assert math.isclose(gpu[-1]["train_loss"], cpu[-1]["train_loss"], rel_tol=1e-3)


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
