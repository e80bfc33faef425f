"""CKA, representation capture, weight-change and per-batch loss-change metrics (float64)."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gnrev_plugin.metrics import (
    LossChangeTracker,
    capture_representations,
    cka_by_layer,
    hsic,
    linear_cka,
    percentage_loss_change,
    rbf_cka,
    revmlp_representations,
    snapshot_parameters,
    weight_cosine_similarity,
    weight_norm_ratio,
)
from gnrev_plugin.metrics.representation import cka, linear_kernel, rbf_kernel
from gnrev_plugin.nn import RevMLP

DT = torch.float64


def rand(n, p, seed):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


def orthogonal(p, seed):
    q, _ = torch.linalg.qr(rand(p, p, seed))
    return q


def gram_cka_oracle(X, Y):
    """Biased linear CKA from the textbook Gram formula with explicit H."""
    n = X.shape[0]
    H = torch.eye(n, dtype=DT) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    h = lambda A, B: torch.trace(A @ H @ B @ H)  # noqa: E731
    return (h(K, L) / torch.sqrt(h(K, K) * h(L, L))).item()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 30), p=st.integers(1, 12),
       q=st.integers(1, 12), scale=st.floats(1e-3, 1e3))
def test_linear_cka_properties(seed, n, p, q, scale):
    X, Y = rand(n, p, seed), rand(n, q, seed + 1)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    val = linear_cka(X, Y)
    assert 0.0 <= val <= 1.0 + 1e-12
    assert val == pytest.approx(gram_cka_oracle(X, Y), rel=1e-9, abs=1e-12)
    # invariance to orthogonal maps and isotropic scaling (either argument)
    assert linear_cka(X @ orthogonal(p, seed + 2), scale * Y) == pytest.approx(val, rel=1e-9,
                                                                               abs=1e-12)
    assert linear_cka(scale * X, Y @ orthogonal(q, seed + 3)) == pytest.approx(val, rel=1e-9,
                                                                               abs=1e-12)
    # feature-space and Gram-space forms agree
    assert cka(linear_kernel(X), linear_kernel(Y)) == pytest.approx(val, rel=1e-9, abs=1e-12)


def test_linear_cka_is_not_invariant_to_general_linear_maps():
    X = rand(20, 4, 0)
    A = torch.diag(torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=DT))
    assert linear_cka(X, X @ A) < 1 - 1e-3


def test_unbiased_hsic_matches_song_et_al_formula_and_cka_of_self():
    n = 9
    X, Y = rand(n, 3, 4), rand(n, 5, 5)
    K, L = X @ X.T, Y @ Y.T
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    one = torch.ones(n, dtype=DT)
    ref = (torch.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
           - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))
    assert hsic(K, L, unbiased=True).item() == pytest.approx(ref.item(), rel=1e-12)
    assert linear_cka(X, X, unbiased=True) == pytest.approx(1.0, abs=1e-12)
    # unbiased CKA is still invariant to orthogonal maps and scaling
    assert linear_cka(X @ orthogonal(3, 1), 2 * Y, unbiased=True) == pytest.approx(
        linear_cka(X, Y, unbiased=True), rel=1e-10)
    with pytest.raises(ValueError):
        hsic(K[:3, :3], L[:3, :3], unbiased=True)


def test_rbf_cka():
    X, Y = rand(15, 4, 6), rand(15, 3, 7)
    assert rbf_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    v = rbf_cka(X, Y)
    assert 0.0 <= v <= 1.0
    # RBF kernel with the median heuristic is invariant to orthogonal maps and scaling
    assert rbf_cka(3.0 * X @ orthogonal(4, 8), Y) == pytest.approx(v, rel=1e-10)
    K = rbf_kernel(X, sigma=2.0)
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    assert torch.allclose(K, torch.exp(-d2 / 8.0), atol=1e-14)


def test_cka_errors():
    with pytest.raises(ValueError):
        linear_cka(rand(5, 2, 0), rand(6, 2, 0))
    with pytest.raises(ValueError):
        linear_cka(torch.ones(5, 2, dtype=DT), rand(5, 2, 0))


# ------------------------------------------------------------------- capture
def test_capture_representations_with_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = rand(6, 3, 1)
    reps = capture_representations(model, X, ["0", "1"])
    assert torch.allclose(reps["0"], model[0](X))
    assert torch.allclose(reps["1"], torch.tanh(model[0](X)))
    assert not model[0]._forward_hooks                     # hooks removed
    assert set(capture_representations(model, X)) == {"0", "1", "2"}
    with pytest.raises(ValueError):
        capture_representations(model, X, ["nope"])


def test_revmlp_representations_match_forward():
    model = RevMLP(6, 8, 2, num_classes=3, seed=1, init_std=0.3).to(DT)
    X = rand(5, 6, 2)
    reps = revmlp_representations(model, X)
    assert list(reps) == ["input", "blocks.0.f", "blocks.0.g", "blocks.1.f", "blocks.1.g"]
    assert torch.allclose(reps["blocks.1.g"], model.features(X), atol=1e-14)
    _, acts = model.features_with_activations(X)
    y1 = X[:, :3] + model.blocks[0].f.linear(acts[0].s_f)
    assert torch.allclose(reps["blocks.0.f"], torch.cat([y1, X[:, 3:]], 1), atol=1e-14)
    blocks = revmlp_representations(model, X, per="block")
    assert torch.allclose(blocks["blocks.0"], reps["blocks.0.g"])
    # hooks on the blocks agree with the block entries
    hooked = capture_representations(model, X, ["blocks.0", "blocks.1"])
    assert torch.allclose(hooked["blocks.1"], blocks["blocks.1"])
    # CKA between two different models, layer by layer, against the Gram-formula oracle
    other = RevMLP(6, 8, 2, num_classes=3, seed=2, init_std=0.3).to(DT)
    reps_b = revmlp_representations(other, X)
    sims = cka_by_layer(reps, reps_b)
    assert list(sims) == list(reps)
    for name, v in sims.items():
        assert v == pytest.approx(gram_cka_oracle(reps[name], reps_b[name]), rel=1e-9, abs=1e-12)
    assert min(v for k, v in sims.items() if k != "input") < 1 - 1e-6


# ------------------------------------------------------------------- training metrics
def test_weight_similarity_and_norm_ratio():
    torch.manual_seed(2)
    model = nn.Linear(4, 3).to(DT)
    init = snapshot_parameters(model)
    assert weight_cosine_similarity(init, model)["weight"] == pytest.approx(1.0)
    with torch.no_grad():
        model.weight.mul_(2.0)
        model.bias.neg_()
    cos = weight_cosine_similarity(init, model)
    assert cos["weight"] == pytest.approx(1.0) and cos["bias"] == pytest.approx(-1.0)
    a = torch.cat([init["weight"].reshape(-1), init["bias"]])
    b = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    assert cos["__all__"] == pytest.approx((a @ b / (a.norm() * b.norm())).item(), rel=1e-14)
    ratio = weight_norm_ratio(init, model)
    assert ratio["weight"] == pytest.approx(2.0) and ratio["bias"] == pytest.approx(1.0)
    assert weight_norm_ratio(init, model, inverse=True)["weight"] == pytest.approx(0.5)
    assert ratio["__all__"] == pytest.approx((b.norm() / a.norm()).item(), rel=1e-14)
    zero = {"b": torch.zeros(3, dtype=DT)}
    assert math.isnan(weight_cosine_similarity(zero, zero)["b"])
    with pytest.raises(ValueError):
        weight_cosine_similarity({"a": torch.ones(2)}, {"b": torch.ones(2)})


def test_percentage_loss_change_with_any_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X, y = rand(8, 3, 4), rand(8, 2, 5)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    with torch.no_grad():
        before = loss_fn(model(X), y).item()
    probe = copy.deepcopy(model)
    rec = percentage_loss_change(model, loss_fn, X, y, step)
    # replay the same step on a copy to get ℓ_B(θ⁺) independently
    popt = torch.optim.SGD(probe.parameters(), lr=0.1)
    popt.zero_grad()
    loss_fn(probe(X), y).backward()
    popt.step()
    with torch.no_grad():
        after = loss_fn(probe(X), y).item()
    assert rec["loss_before"] == before and rec["loss_after"] == pytest.approx(after, rel=1e-14)
    assert rec["percent_change"] == pytest.approx(100 * (after - before) / before, rel=1e-12)
    assert rec["percent_change"] < 0
    tracker = LossChangeTracker()
    tracker.update(model, loss_fn, X, y, step)
    tracker.update(model, loss_fn, X, y, lambda: None)      # a no-op step changes nothing
    assert tracker.values[1] == 0.0
    assert tracker.mean() == pytest.approx(tracker.values[0] / 2)
    assert len(tracker.reset()) == 2 and math.isnan(tracker.mean())


def test_percentage_loss_change_exact_gn_full_step_on_revmlp():
    """A full exact GN step (α = 1, MSE) interpolates the batch to first order: ≈ −100 %."""
    import gnrev_plugin.optim as optim
    model = RevMLP(8, 32, 2, num_classes=None, seed=0, linear_first_block=False).to(DT)
    X = rand(4, 8, 6)
    with torch.no_grad():                    # small residual: the linearisation is accurate
        y = model(X) + 1e-4 * rand(4, 8, 7)
    opt = optim.ExactGN(model.parameters(), lr=1.0, loss="mse", model=model)
    rec = percentage_loss_change(model, nn.MSELoss(), X, y, lambda: opt.step_on_batch(X, y))
    assert rec["percent_change"] == pytest.approx(-100.0, abs=1.0)
