"""DenseGN equals the Moore-Penrose Gauss-Newton step −α J⁺ε (dense float64 oracle, ≤ 1e-8).

``ε`` comes from the independent per-sample formulas of ``oracles.oracle_ce_target`` (NumPy
softmax, ``pinv``/``solve`` of ``diag(p) − ppᵀ``), never from the package's ``newton_target``.
"""

import pytest
import torch
from oracles import bitwise_equal, dense_jacobian, flat_params, oracle_ce_target, rel, snapshot
from torch import nn

from gnrev_plugin.optim import DenseGN, NonFiniteError, RankDeficiencyError
from gnrev_plugin.optim.dense_gn import find_module_owning

TOL = 1e-8


def mlp(seed, act=nn.Tanh, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 12), *( [nn.BatchNorm1d(12)] if bn else []), act(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).double()


class ConvNet(nn.Module):
    """A non-Linear-only model (conv + scale parameter) for the generic Jacobian paths."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x[:, None, :])).flatten(1)) * self.scale


@pytest.mark.parametrize("jacobian", ["auto", "structured", "linear", "per_sample", "rows"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_gn_is_moore_penrose_step(jacobian, loss, seed):
    net = mlp(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = (torch.randn(6, 3, generator=g, dtype=torch.float64) if loss == "mse"
         else torch.randint(0, 3, (6,), generator=g))
    J, F0 = dense_jacobian(net, x), net(x).detach()
    eps = F0 - y if loss == "mse" else oracle_ce_target(F0, y, "identity")
    mp = -0.7 * torch.linalg.pinv(J) @ eps.reshape(-1)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=0.7, loss=loss, jacobian=jacobian)
    opt.step_on_batch(x, y)
    assert rel(flat_params(net) - before, mp) <= TOL
    assert opt.last_step_exact


@pytest.mark.parametrize("ce_target", ["pinv", "damped"])
def test_dense_gn_cross_entropy_newton_targets(ce_target):
    """J⁺ applied to the oracle's pinv(H)g or (H + λI)⁻¹g (a flipped sign or dropped term in the
    package's targets fails here, 1e-8)."""
    net = mlp(8)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    J, F0 = dense_jacobian(net, x), net(x).detach()
    mp = -0.4 * torch.linalg.pinv(J) @ oracle_ce_target(F0, y, ce_target, lam=0.2).reshape(-1)
    before = flat_params(net)
    DenseGN(net.parameters(), model=net, lr=0.4, loss="cross_entropy", ce_target=ce_target,
            ce_damping=0.2).step_on_batch(x, y)
    assert rel(flat_params(net) - before, mp) <= TOL


@pytest.mark.parametrize("jacobian", ["auto", "structured", "per_sample", "rows"])
def test_generic_module_and_parameter_subset(jacobian):
    torch.manual_seed(3)
    net = ConvNet().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    names = ["conv.weight", "scale", "head.weight"]
    params = [dict(net.named_parameters())[n] for n in names]
    J = dense_jacobian(net, x, names)
    mp = -0.5 * torch.linalg.pinv(J) @ (net(x).detach() - y).reshape(-1)
    frozen = [net.conv.bias.detach().clone(), net.head.bias.detach().clone()]
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt = DenseGN(params, model=net, lr=0.5, jacobian=jacobian)
    opt.step_on_batch(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in params])
    assert rel(after - before, mp) <= TOL
    assert torch.equal(net.conv.bias, frozen[0]) and torch.equal(net.head.bias, frozen[1])
    assert opt.last_step_info["jacobian"] == ("structured" if jacobian == "auto" else jacobian)
    if jacobian in ("auto", "structured"):   # Conv1d and the scalar take the generic Jacobian
        assert opt.last_step_info["layers"] == {"head": "linear:patch_gram",
                                                "conv.weight": "generic:per_sample",
                                                "scale": "generic:per_sample"}


def test_batchnorm_uses_row_jacobian_and_is_exact():
    net = mlp(4, bn=True)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    oracle = mlp(4, bn=True)            # same weights; batch statistics, no running-stat updates
    oracle[1].track_running_stats, oracle[1].running_mean, oracle[1].running_var = False, None, None
    oracle[1].num_batches_tracked = None
    J = dense_jacobian(oracle, x)
    mp = -torch.linalg.pinv(J) @ (oracle(x).detach() - y).reshape(-1)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=1.0)
    opt.step_on_batch(x, y)
    assert opt.last_step_info["jacobian"] == "rows"
    assert rel(flat_params(net) - before, mp) <= TOL
    with pytest.raises(ValueError, match="independent samples"):
        DenseGN(net.parameters(), model=net, jacobian="per_sample").step_on_batch(x, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_drop_in_equals_explicit_and_model_is_found(reduction):
    a, b = mlp(5), mlp(5)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    opt = DenseGN(a.parameters(), lr=0.3, loss="cross_entropy")   # model found from params
    assert opt.model is a and find_module_owning(a.parameters()) is a
    opt.zero_grad()
    nn.CrossEntropyLoss(reduction=reduction)(a(x), y).backward()
    opt.step()
    DenseGN(b.parameters(), model=b, lr=0.3, loss="cross_entropy").step_on_batch(x, y)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in
               zip(a.parameters(), b.parameters(), strict=True))


def test_rank_deficiency_and_bad_input_change_nothing():
    net = mlp(6)                       # P = 99 < nC = 120
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    snap = snapshot(net)
    with pytest.raises(RankDeficiencyError, match="rank"):
        DenseGN(net.parameters(), model=net).step_on_batch(x, y)
    assert bitwise_equal(net, snap)
    y[1, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        DenseGN(net.parameters(), model=net).step_on_batch(x[:5], y[:5])
    assert bitwise_equal(net, snap)
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="deterministic"):
        DenseGN(drop.parameters(), model=drop).step_on_batch(x[:2], y[:2].nan_to_num())
    with pytest.raises(ValueError, match="unsupported loss"):
        DenseGN(net.parameters(), model=net, loss="l1")
    with pytest.raises(ValueError, match="max_jacobian_entries"):
        DenseGN(net.parameters(), model=net, jacobian="rows",
                max_jacobian_entries=10).step_on_batch(x[:2], y[:2].nan_to_num())


def test_damping_and_least_squares_warn():
    net = mlp(7)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    J = dense_jacobian(net, x)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, rank_policy="warn", solver="eigh")
    with pytest.warns(RuntimeWarning, match="not exact"):
        opt.step_on_batch(x, y)
    F0 = mlp(7)(x).detach()
    expect = -torch.linalg.pinv(J) @ (F0 - y).reshape(-1)      # least squares: J⁺ε
    assert rel(flat_params(net) - before, expect) <= 1e-6
    assert opt.last_step_exact is False
