"""Newton targets ε = H⁻¹g against independent per-sample float64 formulas (issue #12, item 1).

Oracles never call :mod:`gnrev_plugin.optim.targets`: per sample, ``p`` is a NumPy softmax,
``y`` the (smoothed) one-hot built by hand, ``g = p − y`` and ``H = diag(p) − ppᵀ``;

* ``identity``: ``ε = p − y``;
* ``pinv``: ``ε = pinv(H) g`` (``torch.linalg.pinv`` with an explicit cut, see ``PINV_RTOL``);
* ``damped``: ``ε = solve(H + λI, g)`` (``torch.linalg.solve``);
* MSE: ``ε = F − Y``.

Tolerance: 1e-10 relative per sample (logits in [−3, 3], so ``κ(H + λI)`` and the pinv's
conditioning stay below ~1e5; observed ~1e-15). The optimizers are then checked end to end:
``J Δθ = −α ε_oracle`` with a dense ``torch.func`` Jacobian (1e-8, as in ``docs/exact_gn.md``).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import dense_jacobian, flat_params, np_softmax, oracle_ce_target, oracle_probs, rel
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN
from gnrev_plugin.optim.targets import (
    loss_gradient_direction,
    mean_loss,
    newton_target,
    soft_targets,
)

DT = torch.float64
TOL = 1e-10


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)
    assert float(err.max()) <= tol, f"worst per-sample relative error {float(err.max()):.3e}"


logits = st.integers(2, 6).flatmap(lambda C: st.tuples(
    st.just(C), st.integers(1, 5), st.integers(0, 2**31 - 1)))


def draw(C, n, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    F_ = (2 * torch.rand(n, C, generator=g, dtype=DT) - 1) * scale
    y = torch.randint(0, C, (n,), generator=g)
    return F_, y


# ------------------------------------------------------------------------------- per sample
@settings(max_examples=40, deadline=None)
@given(shape=logits, kind=st.sampled_from(["identity", "pinv", "damped"]),
       smoothing=st.sampled_from([0.0, 0.1, 0.35]), lam=st.sampled_from([1e-3, 0.1, 2.0]))
@example(shape=(2, 1, 2), kind="pinv", smoothing=0.0, lam=1e-3)   # found by Hypothesis (oracle)
@example(shape=(6, 5, 7), kind="damped", smoothing=0.35, lam=1e-3)
def test_cross_entropy_targets_equal_per_sample_formulas(shape, kind, smoothing, lam):
    C, n, seed = shape
    F_, y = draw(C, n, seed)
    got = newton_target("cross_entropy", F_, y, ce_target=kind, ce_damping=lam,
                        label_smoothing=smoothing)
    assert_rows_close(got, oracle_ce_target(F_, y, kind, lam, smoothing))


@pytest.mark.parametrize("kind", ["identity", "pinv", "damped"])
def test_soft_probability_targets(kind):
    g = torch.Generator().manual_seed(11)
    F_ = torch.randn(4, 5, generator=g, dtype=DT)
    Y = torch.softmax(torch.randn(4, 5, generator=g, dtype=DT), 1)   # rows sum to 1
    got = newton_target("cross_entropy", F_, Y, ce_target=kind, ce_damping=0.05,
                        label_smoothing=0.2)
    assert_rows_close(got, oracle_ce_target(F_, Y, kind, 0.05, 0.2))


def test_pinv_target_solves_the_newton_system_and_is_minimum_norm():
    """H ε = g and ε ⊥ 1 (the null vector of H), independently of pinv's own rounding."""
    F_, y = draw(5, 4, 3)
    eps = newton_target("cross_entropy", F_, y, ce_target="pinv")
    for f, yi, e in zip(F_, y, eps, strict=True):
        p = torch.tensor(np_softmax(f.numpy()), dtype=DT)
        H = torch.diag(p) - torch.outer(p, p)
        g = p - F.one_hot(yi, 5).to(DT)
        assert rel(H @ e, g) <= TOL
        assert abs(float(e.sum())) <= TOL * float(e.norm())


def test_damped_target_tends_to_pinv_target():
    """(H + λI)⁻¹g → H⁺g as λ → 0 for g ⊥ 1 (error O(λ)), and ≈ g/λ for λ ≫ ‖H‖."""
    F_, y = draw(4, 3, 5, scale=1.0)
    pinv = oracle_ce_target(F_, y, "pinv")
    errs = [rel(newton_target("cross_entropy", F_, y, ce_target="damped", ce_damping=lam), pinv)
            for lam in (1e-3, 1e-5)]
    assert errs[1] < 2e-2 * errs[0] and errs[1] < 1e-3
    big = 1e6
    g = oracle_ce_target(F_, y, "identity")
    assert rel(big * newton_target("cross_entropy", F_, y, ce_target="damped", ce_damping=big),
               g) <= 1e-5


def test_mse_target_and_gradient_direction():
    g = torch.Generator().manual_seed(2)
    F_, Y = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    assert torch.equal(newton_target("mse", F_, Y), F_ - Y)
    assert torch.equal(loss_gradient_direction("mse", F_, Y), F_ - Y)
    mixed = newton_target("mse", F_, Y.float())                  # a float32 target is cast
    assert mixed.dtype == DT and torch.equal(mixed, F_ - Y.float().double())
    Fc, y = draw(4, 5, 9)
    want = oracle_ce_target(Fc, y, "identity", smoothing=0.1)
    assert_rows_close(loss_gradient_direction("cross_entropy", Fc, y, label_smoothing=0.1), want)
    # the direction is the gradient of the summed loss up to a positive factor: exactly equal
    Fg = Fc.clone().requires_grad_(True)
    F.cross_entropy(Fg, y, reduction="sum", label_smoothing=0.1).backward()
    assert_rows_close(Fg.grad, want)


def test_mean_loss_against_hand_written_losses():
    g = torch.Generator().manual_seed(4)
    F_, Y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT)
    assert float(mean_loss("mse", F_, Y)) == pytest.approx(float(((F_ - Y) ** 2).mean()),
                                                           rel=1e-14)
    Fc, y = draw(4, 6, 8)
    logp = Fc - torch.logsumexp(Fc, 1, keepdim=True)
    want = -logp[torch.arange(6), y].mean()
    assert float(mean_loss("cross_entropy", Fc, y)) == pytest.approx(float(want), rel=1e-14)
    P = torch.softmax(torch.randn(6, 4, generator=g, dtype=DT), 1).float()   # soft, float32
    assert float(mean_loss("cross_entropy", Fc, P)) == pytest.approx(
        float(-(P.double() * logp).sum(1).mean()), rel=1e-7)


def test_soft_targets_encoding_and_dtype():
    y = torch.tensor([2, 0, 1])
    got = soft_targets(y, 4, label_smoothing=0.2, dtype=DT)
    want = torch.tensor(oracle_probs(y, 4, 0.2), dtype=DT)
    assert got.dtype == DT and torch.allclose(got, want, rtol=0, atol=1e-15)
    assert soft_targets(y, 3).dtype == torch.float32
    assert torch.equal(soft_targets(y, 3), torch.eye(3)[[2, 0, 1]])
    P = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=DT)
    soft = soft_targets(P, 2, dtype=torch.float32)
    assert soft.dtype == torch.float32 and torch.equal(soft, P.float())


def test_invalid_inputs_are_refused_with_the_reason():
    F_, y = draw(3, 4, 1)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\), got range \[0, 3\]"):
        newton_target("cross_entropy", F_, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"range \[-1, 1\]"):
        newton_target("cross_entropy", F_, torch.tensor([0, 1, -1, 1]))
    with pytest.raises(ValueError, match=r"^cross-entropy targets must be class indices of shape "
                       r"\(n,\) \(integer\) or probabilities of shape \(n, 3\); got \(4, 2\)"):
        newton_target("cross_entropy", F_, torch.rand(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="integer"):
        newton_target("cross_entropy", F_, y.double())          # 1-D float: not class indices
    with pytest.raises(ValueError, match=r"outputs of shape \(n, C\), got \(4,\)"):
        newton_target("mse", F_[:, 0], F_[:, 0])
    with pytest.raises(ValueError, match=r"MSE targets must have the output's shape \(4, 3\)"):
        newton_target("mse", F_, F_[:, :2])
    with pytest.raises(ValueError, match="3 targets for 4 outputs"):
        newton_target("cross_entropy", F_, y[:3])
    with pytest.raises(ValueError, match="unsupported loss 'hinge'"):
        newton_target("hinge", F_, y)
    with pytest.raises(ValueError, match="unknown ce_target 'newton'"):
        newton_target("cross_entropy", F_, y, ce_target="newton")
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="ce_damping must be > 0"):
            newton_target("cross_entropy", F_, y, ce_target="damped", ce_damping=bad)
    # an empty batch of class indices is valid (no range to check)
    assert newton_target("cross_entropy", F_[:0], y[:0]).shape == (0, 3)


# ------------------------------------------------------------------------------- end to end
def revmlp(seed):
    return RevMLP(8, 16, 2, 3, activation="tanh", linear_first_block=False, init_std=0.3,
                  seed=seed).double()


@pytest.mark.parametrize("kind", ["identity", "pinv", "damped"])
def test_exact_gn_reproduces_the_oracle_target(kind):
    """J Δθ = −α ε_oracle for ExactGN's explicit step (1e-8, dense torch.func Jacobian)."""
    model = revmlp(7)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 8, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    eps = oracle_ce_target(F0, y, kind, lam=0.1)
    before = flat_params(model)
    ExactGN(model.parameters(), lr=0.5, loss="cross_entropy", ce_target=kind,
            ce_damping=0.1).step_on_batch(x, y)
    assert rel(J @ (flat_params(model) - before), -0.5 * eps.reshape(-1)) <= 1e-8


def test_exact_gn_drop_in_uses_the_recorded_label_smoothing():
    model = revmlp(8)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 8, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    before = flat_params(model)
    opt = ExactGN(model.parameters(), lr=0.3, loss="cross_entropy", ce_target="pinv")
    opt.zero_grad()
    nn.CrossEntropyLoss(label_smoothing=0.2)(model(x), y).backward()
    opt.step()
    eps = oracle_ce_target(F0, y, "pinv", smoothing=0.2)
    assert rel(J @ (flat_params(model) - before), -0.3 * eps.reshape(-1)) <= 1e-8


def test_results_keep_the_output_dtype():
    """A float64 target does not promote a float32 model's target, direction or loss (and the
    values are those of the target cast to float32)."""
    g = torch.Generator().manual_seed(12)
    F32 = torch.randn(4, 3, generator=g)
    Y64 = torch.randn(4, 3, generator=g, dtype=DT)
    P64 = torch.softmax(torch.randn(4, 3, generator=g, dtype=DT), 1)
    for got in (newton_target("mse", F32, Y64), loss_gradient_direction("mse", F32, Y64)):
        assert got.dtype == torch.float32 and torch.equal(got, F32 - Y64.float())
    assert mean_loss("mse", F32, Y64).dtype == torch.float32
    assert mean_loss("cross_entropy", F32, P64).dtype == torch.float32
    assert float(mean_loss("mse", F32, Y64)) == pytest.approx(
        float(((F32 - Y64.float()) ** 2).mean()), rel=1e-6)
    want = -(P64.float() * torch.log_softmax(F32, 1)).sum(1).mean()
    assert float(mean_loss("cross_entropy", F32, P64)) == pytest.approx(float(want), rel=1e-6)
    for kind in ("identity", "pinv", "damped"):
        assert newton_target("cross_entropy", F32, P64, ce_target=kind).dtype == torch.float32


def test_documented_defaults():
    """ce_target='identity', ce_damping=1e-3, no label smoothing (module docstring)."""
    F_, y = draw(4, 3, 13, scale=1.0)
    assert torch.equal(newton_target("cross_entropy", F_, y),
                       newton_target("cross_entropy", F_, y, ce_target="identity"))
    assert_rows_close(newton_target("cross_entropy", F_, y, ce_target="damped"),
                      oracle_ce_target(F_, y, "damped", lam=1e-3))
    assert_rows_close(loss_gradient_direction("cross_entropy", F_, y),
                      oracle_ce_target(F_, y, "identity", smoothing=0.0))
    assert_rows_close(newton_target("cross_entropy", F_, y),
                      oracle_ce_target(F_, y, "identity", smoothing=0.0))
