"""ExactGN is exact Gauss-Newton: checked against dense float64 torch.func Jacobians and pinv.

Tolerances: function-space identities ≤ 1e-8 relative (observed ~1e-14), float64 throughout unless
a test says otherwise.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracles import bitwise_equal, dense_jacobian, flat_params, rel, snapshot
from torch import nn

import gnrev_plugin.optim.right_inverse as ri
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import (
    DenseGN,
    ExactGN,
    LossCaptureError,
    NonFiniteError,
    RankDeficiencyError,
    exact_gn_direction,
)
from gnrev_plugin.optim.solvers import HalfLayerSolution
from gnrev_plugin.optim.targets import newton_target

TOL = 1e-8


def make(d=8, M=16, L=3, C=3, lin=False, seed=0, act="relu"):
    return RevMLP(d, M, L, C, activation=act, linear_first_block=lin, init_std=0.3,
                  seed=seed).double()


def data(n, d, C, loss="mse", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(n, C, generator=g, dtype=torch.float64)
    return x, torch.randint(0, C, (n,), generator=g)


def max_gram_condition(model, x) -> float:
    """Largest condition number among the full-rank half-layer Grams ``[S, 1][S, 1]ᵀ``.

    Float64 solves are backward stable: the relative error of ``J Δθ`` is ``O(κ · eps)``. The
    property tests keep the 1e-8 tolerance and only draw examples with ``κ < 1e6``.
    """
    with torch.no_grad():
        _, acts = model.features_with_activations(x)
    worst = 1.0
    for a in acts:
        for S in (a.s_f, a.s_g):
            ev = torch.linalg.eigvalsh(S @ S.mT + 1)
            if ev[0] > 1e-10 * ev[-1]:
                worst = max(worst, float(ev[-1] / ev[0]))
    return worst


def assert_no_block_full_rank(model, x) -> None:
    """Dense check that every block has a half-layer with ``rank([S, 1]) < n`` (dead ReLU units,
    linear blocks beyond ``d/2 + 1`` samples, ...), i.e. that a RankDeficiencyError was due."""
    with torch.no_grad():
        _, acts = model.features_with_activations(x)
    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=x.dtype)
    for a in acts:
        ranks = [int(torch.linalg.matrix_rank(torch.cat([s, ones], 1))) for s in (a.s_f, a.s_g)]
        assert min(ranks) < n


def step_delta(opt, model, x, y):
    before = flat_params(model)
    opt.step_on_batch(x, y)
    return flat_params(model) - before


# --------------------------------------------------------------------------- exactness
@settings(max_examples=12, deadline=None)
@given(half=st.integers(2, 5), M=st.integers(6, 16), L=st.integers(1, 3),
       C=st.one_of(st.none(), st.integers(1, 3)), seed=st.integers(0, 10_000),
       act=st.sampled_from(["relu", "tanh", "gelu"]), data_seed=st.integers(0, 10_000))
def test_linearised_output_change_equals_target(half, M, L, C, seed, act, data_seed):
    d = 2 * half
    C = min(C, d) if C else None
    model = RevMLP(d, M, L, C, activation=act, linear_first_block=False, init_std=0.3,
                   seed=seed).double()
    n = min(M + 1, 5)
    x, _ = data(n, d, 1, seed=data_seed)
    out_dim = C or d
    assume(max_gram_condition(model, x) < 1e6)
    T = torch.randn(n, out_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    J = dense_jacobian(model, x)
    try:
        delta = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T)])
    except RankDeficiencyError:
        assert_no_block_full_rank(model, x)   # allowed only if the oracle confirms it
        return
    assert rel(J @ delta, T.reshape(-1)) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("readout", [3, None])
def test_single_block_and_whole_net_reach_the_target(seed, readout):
    """``J Δθ = T`` for one block and a whole net. (``J⁺J Δθ = J⁺T`` and ``‖Δθ‖ ≥ ‖J⁺T‖`` follow
    from it algebraically, so they are not asserted; ``Δθ`` itself is pinned against the dense
    per-block oracle in ``test_exact_gn_dense_oracle.py``.)"""
    for L in (1, 3):
        model = make(L=L, C=readout, seed=seed)
        x, _ = data(6, 8, 3, seed=seed)
        T = torch.randn(6, readout or 8, dtype=torch.float64)
        delta = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T)])
        J = dense_jacobian(model, x)
        assert rel(J @ delta, T.reshape(-1)) <= TOL


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_one_block_without_readout_equals_dense_gn(loss):
    torch.manual_seed(0)
    a, b = make(L=1, C=None, seed=4), make(L=1, C=None, seed=4)
    x = torch.randn(5, 8, dtype=torch.float64)
    y = torch.randn(5, 8, dtype=torch.float64) if loss == "mse" else torch.randint(0, 8, (5,))
    da = step_delta(ExactGN(a.parameters(), lr=0.4, loss=loss), a, x, y)
    db = step_delta(DenseGN(b.parameters(), model=b, lr=0.4, loss=loss), b, x, y)
    assert rel(da, db) <= TOL


def test_dropping_the_missing_jacobian_correction_breaks_exactness(monkeypatch):
    model = make(L=2, C=3, seed=3)
    x, _ = data(6, 8, 3)
    T = torch.randn(6, 3, dtype=torch.float64)
    J = dense_jacobian(model, x)

    def error():
        delta = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T)])
        return rel(J @ delta, T.reshape(-1))

    assert error() <= TOL

    def solve_without_correction(bs, t, w, m_full, exact_share, f_factors=None):
        t1, t2 = bs.block.split(t)
        sol_f, sol_g = bs.f.solve(w * t1), bs.g.solve(w * t2)   # m omitted
        return ri.BlockUpdate(sol_f, HalfLayerSolution(sol_g.weight, sol_g.bias, sol_g.achieved,
                                                       target=sol_g.target,
                                                       residual=sol_g.residual))

    monkeypatch.setattr(ri, "_solve_block", solve_without_correction)
    assert error() > 1e-2


@pytest.mark.parametrize("alpha", [1e-3, 1e-2])
def test_mse_residual_contracts_as_one_minus_alpha(alpha):
    model = make(L=2, C=3, seed=5)
    x, y = data(6, 8, 3, seed=5)
    r0 = (model(x) - y).detach().norm()
    ExactGN(model.parameters(), lr=alpha, loss="mse").step_on_batch(x, y)
    ratio = float((model(x) - y).detach().norm() / r0)
    assert abs(ratio - (1 - alpha)) <= 20 * alpha**2


def test_reference_step_convention_is_L_times_lr():
    model = make(L=3, C=3, seed=6)
    x, y = data(5, 8, 3, loss="cross_entropy", seed=6)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    eps = newton_target("cross_entropy", F0, y)
    delta = step_delta(ExactGN(model.parameters(), lr=0.1, loss="cross_entropy",
                               step_convention="reference"), model, x, y)
    assert rel(J @ delta, -0.3 * eps.reshape(-1)) <= TOL


@pytest.mark.parametrize("ce_target", ["identity", "pinv", "damped"])
def test_cross_entropy_targets_are_reproduced(ce_target):
    model = make(L=2, C=3, seed=7)
    x, y = data(5, 8, 3, loss="cross_entropy", seed=7)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    eps = newton_target("cross_entropy", F0, y, ce_target=ce_target, ce_damping=0.1)
    opt = ExactGN(model.parameters(), lr=0.5, loss="cross_entropy", ce_target=ce_target,
                  ce_damping=0.1)
    assert rel(J @ step_delta(opt, model, x, y), -0.5 * eps.reshape(-1)) <= TOL


def test_float64_cast_of_float32_model_stays_exact():
    model = RevMLP(8, 16, 2, 3, linear_first_block=False, init_std=0.3, seed=8).double()
    U = model.readout
    assert (U.T @ U - torch.eye(3, dtype=U.dtype)).abs().max() > 1e-10  # the float32 pitfall
    x, _ = data(6, 8, 3, seed=8)
    T = torch.randn(6, 3, dtype=torch.float64)
    delta = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T)])
    assert rel(dense_jacobian(model, x) @ delta, T.reshape(-1)) <= TOL


def test_float32_model_is_accurate_to_single_precision():
    model = RevMLP(8, 32, 2, 3, linear_first_block=False, init_std=0.3, seed=9)
    x = torch.randn(6, 8)
    T = torch.randn(6, 3)
    delta = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T)])
    model64 = RevMLP(8, 32, 2, 3, linear_first_block=False, init_std=0.3, seed=9).double()
    J = dense_jacobian(model64, x.double())
    assert rel(J @ delta.double(), T.double().reshape(-1)) <= 1e-4


# --------------------------------------------------------------------------- solvers
def test_eigh_solver_equals_reference_svd_truncation():
    x, y = data(12, 8, 3, loss="cross_entropy", seed=10)
    x[6:] = x[:6] + 1e-3 * x[6:]              # nearly repeated samples: small singular values
    kw = dict(lr=0.5, loss="cross_entropy", rtol=1e-2, atol=1e-5, rank_policy="warn")
    m_svd, m_eigh = make(d=8, M=24, L=2, C=3, seed=10), make(d=8, M=24, L=2, C=3, seed=10)
    with pytest.warns(RuntimeWarning):
        d_svd = step_delta(ExactGN(m_svd.parameters(), solver="svd", **kw), m_svd, x, y)
    with pytest.warns(RuntimeWarning):
        d_eigh = step_delta(ExactGN(m_eigh.parameters(), solver="eigh", **kw), m_eigh, x, y)
    assert rel(d_eigh, d_svd) <= 1e-6


@pytest.mark.parametrize("solver", ["eigh", "svd"])
def test_untruncated_solvers_equal_cholesky(solver):
    x, y = data(6, 8, 3, seed=11)
    a, b = make(seed=11), make(seed=11)
    da = step_delta(ExactGN(a.parameters(), lr=1.0), a, x, y)
    db = step_delta(ExactGN(b.parameters(), lr=1.0, solver=solver), b, x, y)
    assert rel(db, da) <= 1e-9


def test_damped_solver_is_reported_inexact_and_tends_to_exact():
    x, y = data(6, 8, 3, seed=12)
    exact = make(seed=12)
    d0 = step_delta(ExactGN(exact.parameters(), lr=1.0), exact, x, y)
    errs = []
    for lam in (1e-2, 1e-6):
        m = make(seed=12)
        opt = ExactGN(m.parameters(), lr=1.0, solver="damped", damping=lam, rank_policy="warn")
        with pytest.warns(RuntimeWarning, match="damped"):
            errs.append(rel(step_delta(opt, m, x, y), d0))
        assert opt.last_step_exact is False
    assert errs[1] < errs[0] and errs[1] < 1e-4


# --------------------------------------------------------------------------- drop-in
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_drop_in_loop_equals_explicit_path(loss, reduction):
    x, y = data(5, 8, 3, loss=loss, seed=13)
    a, b = make(seed=13), make(seed=13)
    crit = (nn.MSELoss if loss == "mse" else nn.CrossEntropyLoss)(reduction=reduction)
    opt_a = ExactGN(a.parameters(), lr=0.3, loss=loss)      # model found from its parameters
    for _ in range(2):
        opt_a.zero_grad()
        crit(a(x), y).backward()
        opt_a.step()
    opt_b = ExactGN(b.parameters(), lr=0.3, loss=loss, model=b)
    for _ in range(2):
        opt_b.step_on_batch(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_closure_step_and_functional_losses():
    x, y = data(5, 8, 3, loss="cross_entropy", seed=14)
    a, b = make(seed=14), make(seed=14)
    opt = ExactGN(a.parameters(), lr=0.3, loss="cross_entropy")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a(x), y, label_smoothing=0.1)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    J = dense_jacobian(b, x)
    eps = newton_target("cross_entropy", b(x).detach(), y, label_smoothing=0.1)
    assert rel(J @ (flat_params(a) - flat_params(b)), -0.3 * eps.reshape(-1)) <= TOL


# --------------------------------------------------------------------------- rank contract
def test_linear_first_block_beyond_rank_is_redistributed_and_exact():
    model = make(d=8, M=16, L=3, C=3, lin=True, seed=15)   # block 0 rank ≤ d/2 + 1 = 5
    x, y = data(9, 8, 3, seed=15)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    opt = ExactGN(model.parameters(), lr=0.7, verify=True)
    delta = step_delta(opt, model, x, y)
    assert rel(J @ delta, -0.7 * (F0 - y).reshape(-1)) <= TOL
    assert opt.last_step_exact is True
    roles = [b["role"] for b in opt.last_step_info["blocks"]]
    assert roles == ["least squares", "exact share", "exact share"]
    assert opt.last_step_info["blocks"][0]["rank_f"] == 5
    assert opt.last_step_info["relative_residual"] <= TOL


def test_strict_policy_raises_on_any_deficient_block_and_changes_nothing():
    model = make(d=8, M=16, L=3, C=3, lin=True, seed=16)
    x, y = data(9, 8, 3, seed=16)
    snap = snapshot(model)
    opt = ExactGN(model.parameters(), rank_policy="strict")
    with pytest.raises(RankDeficiencyError, match=r"block 0: rank\(A_f\)=5"):
        opt.step_on_batch(x, y)
    assert bitwise_equal(model, snap)


@pytest.mark.parametrize("case", ["batch > M+1", "duplicated samples"])
def test_no_full_rank_block_raises_by_default_and_warns_on_request(case):
    if case == "batch > M+1":
        model, (x, y) = make(d=8, M=4, L=2, seed=17), data(8, 8, 3, seed=17)
    else:
        model, (x, y) = make(seed=17), data(6, 8, 3, seed=17)
        x[3], y[3] = x[0], y[0]
    snap = snapshot(model)
    with pytest.raises(RankDeficiencyError, match="no block can reproduce"):
        ExactGN(model.parameters()).step_on_batch(x, y)
    assert bitwise_equal(model, snap)
    opt = ExactGN(model.parameters(), rank_policy="warn")
    with pytest.warns(RuntimeWarning, match="not exact"):
        opt.step_on_batch(x, y)
    assert opt.last_step_exact is False and not bitwise_equal(model, snap)


def test_frozen_blocks_stay_fixed_and_step_is_exact():
    model = make(L=3, C=3, seed=18)
    x, y = data(6, 8, 3, seed=18)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    params = [p for i in (0, 2) for p in model.blocks[i].parameters()]
    frozen = snapshot(model.blocks[1])
    delta = step_delta(ExactGN(params, lr=0.5), model, x, y)
    assert bitwise_equal(model.blocks[1], frozen)
    assert rel(J @ delta, -0.5 * (F0 - y).reshape(-1)) <= TOL


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["nan input", "inf target"])
def test_non_finite_raises_and_changes_nothing(bad):
    model = make(seed=19)
    x, y = data(5, 8, 3, seed=19)
    if bad == "nan input":
        x[2, 1] = float("nan")
    else:
        y[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(NonFiniteError):
        ExactGN(model.parameters()).step_on_batch(x, y)
    assert bitwise_equal(model, snap)
    opt = ExactGN(model.parameters())
    opt.zero_grad()
    nn.MSELoss()(model(x), y).backward()
    with pytest.raises(NonFiniteError):
        opt.step()
    assert bitwise_equal(model, snap)


def test_construction_errors():
    model = make()
    with pytest.raises(ValueError, match="unsupported loss"):
        ExactGN(model.parameters(), loss="hinge")
    with pytest.raises(TypeError, match="RevMLP"):
        ExactGN(nn.Linear(3, 2).parameters(), model=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no live RevMLP"):
        ExactGN(nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="lr"):
        ExactGN(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match="all of W_f"):
        ExactGN([model.blocks[0].f.linear.weight])
    with pytest.raises(ValueError, match="unknown solver"):
        ExactGN(model.parameters(), solver="qr")
    with pytest.raises(ValueError, match="single parameter group"):
        ExactGN([{"params": model.blocks[0].parameters()},
                 {"params": model.blocks[1].parameters(), "lr": 0.1}], model=model)


def test_drop_in_misuse_is_explained_and_changes_nothing():
    model = make(seed=20)
    x, y = data(5, 8, 3, seed=20)
    snap = snapshot(model)
    opt = ExactGN(model.parameters(), loss="mse")
    with pytest.raises(LossCaptureError, match="no forward pass"):
        opt.step()
    model(x)
    with pytest.raises(LossCaptureError, match="before loss.backward"):
        opt.step()
    (model(x) * 2).pow(2).mean().backward()
    with pytest.raises(LossCaptureError, match="no nn.MSELoss"):
        opt.step()
    (nn.MSELoss()(model(x), y) + model(x).sum()).backward()
    with pytest.raises(LossCaptureError):
        opt.step()
    out = model(x)
    (nn.MSELoss()(out, y) + 0.5 * out.pow(2).mean()).backward()
    with pytest.raises(LossCaptureError, match="not that of the recorded"):
        opt.step()
    nn.CrossEntropyLoss()(model(x), y.argmax(1)).backward()
    with pytest.raises(LossCaptureError, match="built for loss='mse'"):
        opt.step()
    assert bitwise_equal(model, snap)


# --------------------------------------------------------------------------- optimizer API
def test_state_dict_round_trip_and_weight_decay():
    x, y = data(5, 8, 3, seed=21)
    a = make(seed=21)
    opt = ExactGN(a.parameters(), lr=0.2, weight_decay=0.1, solver="eigh")
    opt.step_on_batch(x, y)
    sd = opt.state_dict()
    b = make(seed=21)
    b.load_state_dict(a.state_dict())
    opt_b = ExactGN(b.parameters(), lr=1.0)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["solver"] == "eigh" and opt_b.param_groups[0]["lr"] == 0.2
    assert all(opt_b.state[p]["step"] == 1 for p in b.parameters())
    opt.step_on_batch(x, y)
    opt_b.step_on_batch(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    # decoupled weight decay: θ⁺ = (1 − lr·wd) θ + Δθ_GN
    c, e = make(seed=22), make(seed=22)
    before = flat_params(c)
    d_plain = step_delta(ExactGN(e.parameters(), lr=0.2), e, x, y)
    ExactGN(c.parameters(), lr=0.2, weight_decay=0.5).step_on_batch(x, y)
    assert rel(flat_params(c), (1 - 0.1) * before + d_plain) <= 1e-12


@settings(max_examples=8, deadline=None)
@given(n=st.integers(6, 12), L=st.integers(2, 3), seed=st.integers(0, 10_000))
def test_random_rank_deficient_linear_first_block_still_exact(n, L, seed):
    """d/2 + 1 = 4 < n ≤ M + 1: block 0 is rank-deficient, the others absorb its residual."""
    model = make(d=6, M=16, L=L, C=3, lin=True, seed=seed)
    x, y = data(n, 6, 3, loss="cross_entropy", seed=seed)
    assume(max_gram_condition(model, x) < 1e6)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    opt = ExactGN(model.parameters(), lr=0.3, loss="cross_entropy")
    try:
        delta = step_delta(opt, model, x, y)
    except RankDeficiencyError:               # the ReLU blocks lost rank too (dead units)
        assert_no_block_full_rank(model, x)
        return
    assert rel(J @ delta, -0.3 * newton_target("cross_entropy", F0, y).reshape(-1)) <= TOL
    assert opt.last_step_info["blocks"][0]["role"] == "least squares"


def test_model_with_attached_optimizer_can_be_saved(tmp_path):
    model = make(seed=23)
    opt = ExactGN(model.parameters())
    x, y = data(5, 8, 3, seed=23)
    nn.MSELoss()(model(x), y).backward()
    torch.save(model, tmp_path / "m.pt")
    opt.step()
    assert opt.last_step_exact


def test_deep_copied_model_is_found_from_its_parameters():
    import copy

    model = copy.deepcopy(make(seed=24))
    x, y = data(5, 8, 3, seed=24)
    opt = ExactGN(model.parameters(), lr=0.5)
    assert opt.model is model
    opt.step_on_batch(x, y)
    assert opt.last_step_exact
