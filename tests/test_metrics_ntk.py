"""Empirical NTK: structured RevMLP path == torch.func == curvlinops (float64), kernel similarities."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

from gnrev_plugin.metrics import (
    empirical_ntk,
    kernel_alignment,
    kernel_target_alignment,
    ntk_similarity,
    ntk_velocity,
    random_probe_similarity,
    revmlp_ntk,
)
from gnrev_plugin.metrics.ntk import _jvp_input_adjoint, center_kernel, trace_over_outputs
from gnrev_plugin.nn import RevMLP

DT = torch.float64


def jacobian_oracle(model, X):
    """Full (nC × P) Jacobian by jacrev over the batch (not per-sample), rows sample-major."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ps = tuple(p.detach() for n, p in model.named_parameters() if p.requires_grad)

    def f(*ps_):
        return functional_call(model, dict(zip(names, ps_, strict=True)), (X,)).reshape(-1)

    return torch.cat([j.reshape(j.shape[0], -1) for j in jacrev(f, argnums=tuple(range(len(ps))))
                      (*ps)], 1)


def revmlp(seed, d=8, M=10, L=3, C=3, act="tanh", linear_first=False, std=0.3):
    return RevMLP(d, M, L, num_classes=C, activation=act, linear_first_block=linear_first,
                  init_std=std, seed=seed).to(DT)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), L=st.integers(1, 3), C=st.sampled_from([1, 3, None]),
       act=st.sampled_from(["relu", "tanh", "gelu"]), linear_first=st.booleans(),
       n=st.integers(1, 6))
def test_structured_ntk_equals_dense(seed, L, C, act, linear_first, n):
    model = revmlp(seed, L=L, C=C, act=act, linear_first=linear_first)
    X = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=DT)
    J = jacobian_oracle(model, X)
    K_ref = J @ J.T
    K = revmlp_ntk(model, X)
    assert K.shape == K_ref.shape
    assert (K - K_ref).abs().max() <= 1e-10 * max(1.0, K_ref.abs().max().item())
    assert (empirical_ntk(model, X, method="func") - K_ref).abs().max() <= 1e-10 * max(
        1.0, K_ref.abs().max().item())
    K_chunked = revmlp_ntk(model, X, rows_per_chunk=2)
    assert (K_chunked - K_ref).abs().max() <= 1e-10 * max(1.0, K_ref.abs().max().item())
    Ctr = 8 if C is None else C
    K_tr = revmlp_ntk(model, X, trace_outputs=True)
    assert torch.allclose(K_tr, trace_over_outputs(K_ref, Ctr), atol=1e-10, rtol=0)


def test_structured_ntk_per_layer_and_frozen_parameters():
    model = revmlp(3)
    X = torch.randn(5, 8, dtype=DT)
    parts = revmlp_ntk(model, X, per_layer=True)
    assert list(parts) == [f"blocks.{l}.{h}" for l in range(3) for h in "fg"]
    assert torch.allclose(sum(parts.values()), revmlp_ntk(model, X), atol=1e-12)
    # per-layer kernel == J_l J_lᵀ of that half-layer's parameters alone
    J = jacobian_oracle(model, X)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    cols = torch.tensor(sum(([n.startswith("blocks.1.g.")] * s
                             for n, s in zip(names, sizes, strict=True)), []))
    Jl = J[:, cols]
    assert torch.allclose(parts["blocks.1.g"], Jl @ Jl.T, atol=1e-10)
    # freezing biases removes the bias column from A = [σ(h), 1]
    for blk in model.blocks:
        blk.f.linear.bias.requires_grad_(False)
        blk.g.linear.bias.requires_grad_(False)
    J = jacobian_oracle(model, X)
    assert torch.allclose(revmlp_ntk(model, X), J @ J.T, atol=1e-10)


def test_adjoint_of_coupling_jvp():
    model = revmlp(4, act="gelu")
    X = torch.randn(6, 8, dtype=DT)
    _, acts = model.features_with_activations(X)
    fn, h = model.blocks[1].f, acts[1].h_f
    v, u = torch.randn(6, 4, dtype=DT), torch.randn(6, 4, dtype=DT)
    lhs = (u * fn.jvp_input(h, v)).sum()
    rhs = (_jvp_input_adjoint(fn, h, u) * v).sum()
    assert torch.allclose(lhs, rhs, atol=1e-13)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_generic_paths_agree(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 2)).to(DT)
    X = torch.randn(6, 3, dtype=DT)
    J = jacobian_oracle(model, X)
    K_func = empirical_ntk(model, X)
    K_cl = empirical_ntk(model, X, method="curvlinops")
    assert torch.allclose(K_func, J @ J.T, atol=1e-12)
    assert torch.allclose(K_cl, J @ J.T, atol=1e-12)
    assert torch.allclose(empirical_ntk(model, X, trace_outputs=True),
                          trace_over_outputs(J @ J.T, 2), atol=1e-12)
    with pytest.raises(ValueError):
        empirical_ntk(model, X, method="nope")


def test_revmlp_curvlinops_path_agrees():
    model = revmlp(5, L=2)
    X = torch.randn(4, 8, dtype=DT)
    assert torch.allclose(empirical_ntk(model, X, method="curvlinops"), revmlp_ntk(model, X),
                          atol=1e-10)


# ------------------------------------------------------------------- similarities
def test_alignment_properties():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g, dtype=DT)
    B = torch.randn(6, 4, generator=g, dtype=DT)
    K1, K2 = A @ A.T, B @ B.T
    assert kernel_alignment(K1, K1) == pytest.approx(1.0, abs=1e-14)
    assert kernel_alignment(K1, 3.0 * K1) == pytest.approx(1.0, abs=1e-14)
    assert kernel_alignment(K1, K2) == pytest.approx(
        ((K1 * K2).sum() / (K1.norm() * K2.norm())).item(), rel=1e-14)
    H = torch.eye(6, dtype=DT) - 1.0 / 6
    assert torch.allclose(center_kernel(K1), H @ K1 @ H, atol=1e-13)
    assert kernel_alignment(K1, K2, centered=True) == pytest.approx(
        kernel_alignment(H @ K1 @ H, H @ K2 @ H), rel=1e-12)
    assert 0.0 <= kernel_alignment(K1, K2) <= 1.0              # PSD kernels
    with pytest.raises(ValueError):
        kernel_alignment(K1, K2[:5, :5])


def test_ntk_similarity_of_model_with_itself_is_one():
    model = revmlp(6)
    X = torch.randn(5, 8, dtype=DT)
    K = empirical_ntk(model, X)
    assert ntk_similarity(K, empirical_ntk(copy.deepcopy(model), X)) == pytest.approx(1, abs=1e-14)
    assert ntk_velocity(K, K) == pytest.approx(0.0, abs=1e-14)
    assert ntk_velocity(K, K, distance="relative") == 0.0
    assert random_probe_similarity(model, copy.deepcopy(model), X) == pytest.approx(1, abs=1e-12)
    assert random_probe_similarity(model, model, X, mode="jacobian") == pytest.approx(1, abs=1e-12)


def test_ntk_velocity_and_random_probe_detect_change():
    model = revmlp(7)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X = torch.randn(6, 8, dtype=DT)
    K0, K1 = empirical_ntk(model, X), empirical_ntk(moved, X)
    v = ntk_velocity(K0, K1, dt=2.0)
    assert v == pytest.approx((1 - kernel_alignment(K0, K1)) / 2.0, rel=1e-14) and v > 0
    assert ntk_velocity(K0, K1, distance="relative") == pytest.approx(
        ((K1 - K0).norm() / K0.norm()).item(), rel=1e-14)
    # the probe cosine equals cos(K_a v̄, K_b v̄) with the same probe average
    gen = torch.Generator().manual_seed(3)
    vbar = torch.randn(50, 6, 3, generator=gen, dtype=DT).mean(0).reshape(-1)
    expect = torch.nn.functional.cosine_similarity(K0 @ vbar, K1 @ vbar, dim=0).item()
    assert random_probe_similarity(model, moved, X, num_probes=50, seed=3) == pytest.approx(
        expect, rel=1e-10)
    # reference-code variant on the pre-readout features X^(L)
    sim = random_probe_similarity(model, moved, X, output_fn=lambda m, x: m.features(x))
    assert -1.0 <= sim < 1.0


def test_kernel_target_alignment():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (9,), generator=g)
    Y = torch.nn.functional.one_hot(y, 3).to(DT)
    assert kernel_target_alignment(Y @ Y.T, y, centered=False) == pytest.approx(1.0)
    assert kernel_target_alignment(Y @ Y.T, Y) == pytest.approx(1.0)
    K = torch.randn(9, 9, generator=g, dtype=DT)
    K = K @ K.T
    assert kernel_target_alignment(K, Y, centered=False) == pytest.approx(
        kernel_alignment(K, Y @ Y.T), rel=1e-14)
    y_vec = Y.reshape(-1, 1)
    Kbig = torch.randn(27, 27, generator=g, dtype=DT)
    Kbig = Kbig @ Kbig.T
    assert kernel_target_alignment(Kbig, Y) == pytest.approx(
        kernel_alignment(Kbig, y_vec @ y_vec.T, centered=True), rel=1e-14)
    with pytest.raises(ValueError):
        kernel_target_alignment(torch.eye(5, dtype=DT), Y)
