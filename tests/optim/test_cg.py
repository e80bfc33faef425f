"""Matrix-free DenseGN (``solver="cg"``) against the dense ``jacrev`` / ``pinv`` oracle.

CG stops on a relative residual ``tol``; the step's error is then bounded by
``‖Δθ − Δθ*‖/‖Δθ*‖ ≤ κ(J)·tol`` (``Δθ − Δθ* = Jᵀ(Λ − Λ*)``, ``‖Jᵀe‖ ≤ ‖JJᵀe‖/σ_min``,
``‖Δθ*‖ ≥ ‖b‖/σ_max``), with ``κ(J)`` from the oracle's ``J``: the tests assert that bound and the
true residual ``‖JΔθ + αε‖/‖αε‖``, recomputed here from the oracle ``J``.
"""

import pytest
import torch
from oracles import bitwise_equal, dense_jacobian, flat_params, oracle_ce_target, rel, snapshot
from test_gram_structured import conv_net
from torch import nn

from gnrev_plugin.optim import DenseGN, RankDeficiencyError
from gnrev_plugin.optim.cg import conjugate_gradient

CG_TOL = 1e-10


def _batch(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 9, 8, generator=g, dtype=torch.float64)
    return x.to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def _check_cg_step(net, x, y, lr, opt_kwargs, preconditioner):
    J, F0 = dense_jacobian(net, x), net(x).detach()
    b = -lr * oracle_ce_target(F0.cpu(), y.cpu(), "identity").to(x.device).reshape(-1)
    expect = torch.linalg.pinv(J) @ b
    s = torch.linalg.svdvals(J)
    kappa = float(s[0] / s[-1])
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=lr, loss="cross_entropy", solver="cg",
                  cg_tol=CG_TOL, **opt_kwargs)
    opt.step_on_batch(x, y)
    delta = flat_params(net) - before
    info = opt.last_step_info
    assert opt.last_step_exact and info["true_residual"] <= CG_TOL
    assert rel(J @ delta, b) <= 2 * CG_TOL                        # the oracle's own residual
    assert rel(delta, expect) <= kappa * CG_TOL
    assert info["preconditioner"] == preconditioner and info["cg_iterations"] >= 1
    return opt


@pytest.mark.parametrize("preconditioner", ["block", "diagonal", "none"])
@pytest.mark.parametrize("case", ["mixed", "groups_no_bias", "same_reflect"])
def test_cg_step_matches_pinv_with_exact_preconditioners(case, preconditioner):
    net = conv_net(case, "batch_eval")
    x, y = _batch(5)
    _check_cg_step(net, x, y, 0.7, {"cg_preconditioner": preconditioner}, preconditioner)


def test_cg_on_a_generic_module_without_preconditioner():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7 * 6, 3))
    net = net.double()
    net.register_parameter("scale", nn.Parameter(torch.tensor(1.2, dtype=torch.float64)))
    net.register_forward_hook(lambda m, a, out: out * m.scale)
    x, y = _batch(4, seed=3)
    _check_cg_step(net, x, y, 0.5, {}, "none")


def test_cg_with_batchnorm_in_training_mode():
    """Any module: BatchNorm in training mode (samples coupled) through JVP/VJP."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 7 * 6, 3)).double()
    x, y = _batch(4, seed=2)
    running = net[1].running_mean.clone()
    net[1].track_running_stats, net[1].running_mean, net[1].running_var = False, None, None
    J, F0 = dense_jacobian(net, x), net(x).detach()
    net[1].track_running_stats, net[1].running_mean = True, running
    net[1].running_var = torch.ones(3, dtype=torch.float64)
    b = -oracle_ce_target(F0, y, "identity").reshape(-1)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=1.0, loss="cross_entropy", solver="cg",
                  cg_tol=CG_TOL)
    opt.step_on_batch(x, y)
    s = torch.linalg.svdvals(J)
    assert rel(flat_params(net) - before, torch.linalg.pinv(J) @ b) <= float(s[0] / s[-1]) * CG_TOL
    assert "couples the samples" in opt.last_step_info["note"]
    assert torch.equal(net[1].running_mean, running)               # statistics untouched


def test_too_few_iterations_is_not_exact():
    net = conv_net("mixed", "group")
    x, y = _batch(5)
    snap = snapshot(net)
    with pytest.raises(RankDeficiencyError, match="true residual"):
        DenseGN(net.parameters(), model=net, loss="cross_entropy", solver="cg",
                cg_max_iter=2).step_on_batch(x, y)
    assert bitwise_equal(net, snap)
    opt = DenseGN(net.parameters(), model=net, loss="cross_entropy", solver="cg", cg_max_iter=2,
                  rank_policy="warn")
    with pytest.warns(RuntimeWarning, match="not exact"):
        opt.step_on_batch(x, y)
    assert opt.last_step_exact is False and opt.last_step_info["cg_iterations"] == 2
    J = dense_jacobian(conv_net("mixed", "group"), x)
    b = -oracle_ce_target(conv_net("mixed", "group")(x).detach(), y, "identity").reshape(-1)
    true_res = rel(J @ (flat_params(net) - flat_params(conv_net("mixed", "group"))), b)
    assert true_res > 1e-3
    assert abs(opt.last_step_info["true_residual"] - true_res) <= 1e-8 * true_res


def test_conjugate_gradient_solves_an_spd_system():
    """Preconditioned CG on a random SPD matrix: ``torch.linalg.solve`` agrees (1e-10), with and
    without the Jacobi preconditioner, in at most dim iterations."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(12, 30, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 30)
    M = B @ B.mT
    b = torch.randn(12, generator=g, dtype=torch.float64)
    expect = torch.linalg.solve(M, b)
    for pre in (None, M.diagonal()):
        res = conjugate_gradient(lambda v: M @ v, b, preconditioner=pre, tol=1e-13,
                                 max_iter=100)
        assert rel(res.solution, expect) <= 1e-10 and res.iterations <= 20


@pytest.mark.cuda
def test_cg_step_matches_pinv_cuda():
    net = conv_net("mixed", "batch_eval").cuda()
    x, y = _batch(5, device="cuda")
    _check_cg_step(net, x, y, 0.7, {}, "block")
