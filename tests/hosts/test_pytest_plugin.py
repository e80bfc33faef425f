"""The pytest11 plugin: entry point, fixtures, and contract checks run by pytester on good and
deliberately wrong optimizers/models (a third party's view: only fixtures, no gnrev imports
besides the optimizer under test)."""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest
import torch

from gnrev_plugin.pytest_plugin import (
    ContractViolation,
    DenseOracles,
    check_exact_gn_update,
    check_exactly_invertible,
)

pytest_plugins = ["pytester"]
needs_autoload = pytest.mark.skipif(
    bool(os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")),
    reason="PYTEST_DISABLE_PLUGIN_AUTOLOAD is set: entry-point plugins are not loaded")

# A third-party test module: a dense-J right-inverse GN "optimizer" (good), and wrong ones.
THIRD_PARTY_TESTS = '''
import pytest
import torch
from torch.func import functional_call, jacrev


class DensePinvGN(torch.optim.Optimizer):
    """Reference GN: Δθ = −α J⁺ ε from a dense torch.func Jacobian (needs the batch)."""

    def __init__(self, params, model, lr=1.0, loss="mse", scale=1.0):
        super().__init__(params, dict(lr=lr))
        self.model, self.loss, self.scale = model, loss, scale
        self.batch = None

    @torch.no_grad()
    def step(self, closure=None):
        X, y = self.batch
        names = [n for n, _ in self.model.named_parameters()]
        ps = tuple(p.detach() for p in self.model.parameters())
        J = torch.cat([j.flatten(1) for j in jacrev(
            lambda q: functional_call(self.model, dict(zip(names, q)), (X,)).flatten())(ps)], 1)
        F = self.model(X)
        eps = F - y if self.loss == "mse" else \\
            torch.softmax(F, -1) - torch.nn.functional.one_hot(y, F.shape[-1]).to(F.dtype)
        lr = self.param_groups[0]["lr"]
        delta = -lr * self.scale * torch.linalg.pinv(J) @ eps.flatten()
        i = 0
        for p in self.model.parameters():
            p.add_(delta[i:i + p.numel()].view_as(p))
            i += p.numel()


def dense_step(opt, model, X, y):
    opt.batch = (X, y)
    opt.step()


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_good_dense_gn(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts, loss):
    X, y_mse, y_cls = gnrev_small_data
    y = y_mse if loss == "mse" else y_cls
    rep = gnrev_contracts.check_exact_gn_update(
        lambda params, model: DensePinvGN(params, model, lr=0.7, loss=loss),
        gnrev_tiny_revmlp, X, y, loss=loss, lr=0.7, step=dense_step, min_norm=True)
    assert rep["residual"] < 1e-10


def test_wrong_scale_gn(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts):
    X, y, _ = gnrev_small_data
    gnrev_contracts.check_exact_gn_update(
        lambda params, model: DensePinvGN(params, model, lr=0.7, scale=0.9),
        gnrev_tiny_revmlp, X, y, loss="mse", lr=0.7, step=dense_step)


def test_sgd_is_not_gn(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts):
    X, y, _ = gnrev_small_data
    gnrev_contracts.check_exact_gn_update(
        lambda params, model: torch.optim.SGD(params, lr=0.7), gnrev_tiny_revmlp, X, y,
        loss="mse", lr=0.7)


def test_revmlp_is_invertible(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts):
    gnrev_contracts.check_exactly_invertible(gnrev_tiny_revmlp, gnrev_small_data[0])


class AlmostInvertible(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2.0

    def inverse(self, z):
        return torch.atanh(z / 2.0) * (1 + 1e-6)


def test_wrong_inverse(gnrev_small_data, gnrev_contracts):
    gnrev_contracts.check_exactly_invertible(AlmostInvertible(), gnrev_small_data[0])


def test_oracles_fixture(gnrev_tiny_revmlp, gnrev_small_data, gnrev_dense_oracles):
    X, y, _ = gnrev_small_data
    G = gnrev_dense_oracles.ggn(gnrev_tiny_revmlp, torch.nn.MSELoss(), X, y)
    P = sum(p.numel() for p in gnrev_tiny_revmlp.parameters())
    assert G.shape == (P, P) and torch.allclose(G, G.T)
'''


def test_pytest11_entry_point_is_installed():
    eps = [e for e in md.entry_points(group="pytest11") if e.name == "gnrev"]
    assert [e.value for e in eps] == ["gnrev_plugin.pytest_plugin"]
    assert eps[0].dist.metadata["Name"] == "gnrev-plugin"


@needs_autoload
def test_plugin_is_autoloaded_here(request):
    assert request.config.pluginmanager.has_plugin("gnrev")


@needs_autoload
def test_contracts_pass_on_good_and_fail_on_wrong_ones(pytester):
    pytester.makepyfile(test_third_party=THIRD_PARTY_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")  # autoload
    result.assert_outcomes(passed=4, failed=3)
    result.stdout.fnmatch_lines([
        "E *ContractViolation: DensePinvGN is not an exact Gauss-Newton step on this batch*",
        "E *ContractViolation: SGD is not an exact Gauss-Newton step on this batch*",
        "E *ContractViolation: AlmostInvertible is not exactly invertible*",
    ])


def test_explicit_plugin_flag_without_autoload(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_third_party=THIRD_PARTY_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "gnrev_plugin.pytest_plugin",
                                           "-k", "good or revmlp_is")
    result.assert_outcomes(passed=3, deselected=4)


def test_exact_gn_optimizer_satisfies_the_contract(gnrev_tiny_revmlp, gnrev_small_data):
    from gnrev_plugin.optim import ExactGN
    X, y_mse, y_cls = gnrev_small_data
    for loss, y in [("mse", y_mse), ("cross_entropy", y_cls)]:
        model = type(gnrev_tiny_revmlp)(**{**gnrev_tiny_revmlp.config}).double()
        model.load_state_dict(gnrev_tiny_revmlp.state_dict())
        rep = check_exact_gn_update(
            lambda params, m, loss=loss: ExactGN(params, lr=0.5, loss=loss, model=m),
            model, X, y, loss=loss, lr=0.5)
        assert rep["residual"] < 1e-9
    # ExactGN's per-block right inverse is not the minimum-norm J⁺ step: the check says so
    with pytest.raises(ContractViolation, match="not the minimum-norm"):
        check_exact_gn_update(lambda params, m: ExactGN(params, lr=0.5, loss="mse", model=m),
                              gnrev_tiny_revmlp, X, y_mse, loss="mse", lr=0.5, min_norm=True)


def test_invertibility_of_the_revmlp_and_a_coupling_block(gnrev_tiny_revmlp, gnrev_small_data):
    X = gnrev_small_data[0]
    rep = check_exactly_invertible(gnrev_tiny_revmlp, X)
    assert rep["input_error"] < 1e-12
    block = gnrev_tiny_revmlp.blocks[1]
    check_exactly_invertible(block, X, forward=block)
    with pytest.raises(ContractViolation, match="no inverse"):
        check_exactly_invertible(torch.nn.Linear(6, 6), X)


def test_oracles_agree_with_each_other(gnrev_tiny_revmlp, gnrev_small_data):
    X, _, y = gnrev_small_data
    lossf = torch.nn.CrossEntropyLoss()
    G = DenseOracles.ggn(gnrev_tiny_revmlp, lossf, X, y)
    H = DenseOracles.hessian(gnrev_tiny_revmlp, lossf, X, y)
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    params = list(gnrev_tiny_revmlp.parameters())
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    assert torch.allclose(G, GGNLinearOperator(gnrev_tiny_revmlp, lossf, params, [(X, y)]) @ eye,
                          rtol=0, atol=1e-10)
    assert torch.allclose(H, HessianLinearOperator(gnrev_tiny_revmlp, lossf, params,
                                                   [(X, y)]) @ eye, rtol=0, atol=1e-10)
