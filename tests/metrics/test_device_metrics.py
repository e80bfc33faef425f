"""Devices: every registered metric (and the metric-like host computations) computes on the
device of its model and data: in the device trap on every machine, against the CPU on a GPU
(``@pytest.mark.cuda``). The trap is described in ``tests/device_trap.py``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import pytest
import torch
from device_trap import (
    CE,
    CPU,
    CUDA,
    _close,
    _data,
    _mlp,
    _plain,
    _rev,
    device_trap,
)
from torch import nn

from gnrev_plugin import metrics as M
from gnrev_plugin.build import build_optimizer
from gnrev_plugin.hosts.curvlinops import (
    GaussNewtonStepOperator,
    NMELinearOperator,
    NTKLinearOperator,
    to_dense,
)
from gnrev_plugin.registry import get_registry


# ============================================================================ metric cases
@dataclasses.dataclass
class Case:
    """``fn(device)`` builds models and data on ``device`` (outside any trap) and returns the
    zero-argument computation to check. ``stable``: the value is the same on every device up
    to rounding (deterministic); otherwise (random probes drawn on the device) only its
    structure and finiteness are compared across devices."""

    fn: Callable[[torch.device], Callable[[], object]]
    stable: bool = True



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
    """BackPACK's second-order extensions on gnrev's coupling leaves (``hosts/backpack/``).
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
