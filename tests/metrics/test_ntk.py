"""Empirical NTK: structured RevMLP path == torch.func == curvlinops (float64), kernel similarities."""

import copy

import numpy as np
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
    # every per-layer kernel == J_l J_lᵀ of that half-layer's parameters alone (dense jacrev)
    J = jacobian_oracle(model, X)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    for layer, part in parts.items():
        cols = torch.tensor(sum(([n.startswith(layer + ".")] * s
                                 for n, s in zip(names, sizes, strict=True)), []))
        Jl = J[:, cols]
        assert torch.allclose(part, Jl @ Jl.T, rtol=0, atol=1e-12 * (Jl @ Jl.T).abs().max())
    assert torch.allclose(sum(parts.values()), J @ J.T, rtol=0, atol=1e-10)
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
    assert kernel_alignment(K1, K2) == pytest.approx(np_alignment(K1, K2), rel=1e-13)
    H = torch.eye(6, dtype=DT) - 1.0 / 6
    assert torch.allclose(center_kernel(K1), H @ K1 @ H, atol=1e-13)
    assert kernel_alignment(K1, K2, centered=True) == pytest.approx(
        np_alignment(K1, K2, centered=True), rel=1e-12)
    assert abs(kernel_alignment(K1, K2, centered=True) - kernel_alignment(K1, K2)) > 1e-3
    assert 0.0 <= kernel_alignment(K1, K2) <= 1.0              # PSD kernels
    with pytest.raises(ValueError):
        kernel_alignment(K1, K2[:5, :5])


def np_alignment(A, B, centered=False):
    """⟨A, B⟩_F / (‖A‖_F ‖B‖_F) in NumPy, optionally after A ↦ HAH with H = I − 11ᵀ/m."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if centered:
        H = np.eye(len(A)) - 1.0 / len(A)
        A, B = H @ A @ H, H @ B @ H
    return float((A * B).sum() / (np.linalg.norm(A) * np.linalg.norm(B)))


def moved_copy(model, scale, seed):
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return moved


def probe_mean(num_probes, shape, seed):
    """v̄ = mean of ``num_probes`` N(0, I) draws, the documented recipe of random_probe_similarity."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_probes, *shape, generator=gen, dtype=DT).mean(0).reshape(-1)


@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_ntk_similarity_and_velocity_of_two_models_equal_dense_formulas(scale):
    """Two different models: A(K_a, K_b), (1 − A)/dt and ‖K_b − K_a‖/(‖K_a‖ dt) from dense
    torch.func Jacobians and NumPy (1e-12 relative)."""
    model = revmlp(6)
    moved = moved_copy(model, scale, seed=6)
    X = torch.randn(5, 8, generator=torch.Generator().manual_seed(6), dtype=DT)
    Ja, Jb = jacobian_oracle(model, X), jacobian_oracle(moved, X)
    Ka, Kb = (Ja @ Ja.T).numpy(), (Jb @ Jb.T).numpy()
    K0, K1 = empirical_ntk(model, X), empirical_ntk(moved, X)
    align = np_alignment(Ka, Kb)
    assert 0.3 < align < 1 - 1e-6                  # genuinely different kernels
    assert ntk_similarity(K0, K1) == pytest.approx(align, rel=1e-12)
    assert ntk_similarity(K0, K1) == pytest.approx(ntk_similarity(K1, K0), rel=1e-14)
    assert ntk_velocity(K0, K1, dt=2.0) == pytest.approx((1 - align) / 2.0, rel=1e-9)
    rel_change = float(np.linalg.norm(Kb - Ka) / np.linalg.norm(Ka))
    assert ntk_velocity(K0, K1, distance="relative", dt=4.0) == pytest.approx(rel_change / 4.0,
                                                                              rel=1e-12)
    assert kernel_alignment(K0, K1, centered=True) == pytest.approx(
        np_alignment(Ka, Kb, centered=True), rel=1e-12)
    with pytest.raises(ValueError, match="dt must be positive"):
        ntk_velocity(K0, K1, dt=0.0)
    with pytest.raises(ValueError, match="distance"):
        ntk_velocity(K0, K1, distance="angle")


@pytest.mark.parametrize("mode", ["kernel", "jacobian"])
def test_random_probe_similarity_of_two_models_equals_dense_formula(mode):
    """cos(K_a v̄, K_b v̄) (kernel) or cos(J_aᵀ v̄, J_bᵀ v̄) (jacobian) with dense Jacobians."""
    model = revmlp(7)
    moved = moved_copy(model, 0.3, seed=7)
    X = torch.randn(6, 8, generator=torch.Generator().manual_seed(7), dtype=DT)
    Ja, Jb = jacobian_oracle(model, X), jacobian_oracle(moved, X)
    v = probe_mean(40, (6, 3), seed=3)
    a, b = (Ja @ (Ja.T @ v), Jb @ (Jb.T @ v)) if mode == "kernel" else (Ja.T @ v, Jb.T @ v)
    expect = float(a @ b / (a.norm() * b.norm()))
    assert expect < 1 - 1e-4
    got = random_probe_similarity(model, moved, X, num_probes=40, seed=3, mode=mode)
    assert got == pytest.approx(expect, rel=1e-10)
    with pytest.raises(ValueError, match="mode"):
        random_probe_similarity(model, moved, X, mode="cka")


class Features(nn.Module):
    """``m.features`` (``X^(L)``, before the readout) as a module, for the dense oracle."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.features(x)


def test_random_probe_on_features_uses_the_pre_readout_output():
    """The reference code's variant on X^(L): dense Jacobian of model.features."""
    model = revmlp(8)
    moved = moved_copy(model, 0.3, seed=8)
    X = torch.randn(4, 8, generator=torch.Generator().manual_seed(8), dtype=DT)
    Ja, Jb = jacobian_oracle(Features(model), X), jacobian_oracle(Features(moved), X)
    v = probe_mean(100, (4, 8), seed=0)
    a, b = Ja @ (Ja.T @ v), Jb @ (Jb.T @ v)
    expect = float(a @ b / (a.norm() * b.norm()))
    assert expect < 1 - 1e-4
    got = random_probe_similarity(model, moved, X, output_fn=lambda m, x: m.features(x))
    assert got == pytest.approx(expect, rel=1e-10)


def test_kernel_target_alignment():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (9,), generator=g)
    Y = torch.nn.functional.one_hot(y, 3).to(DT)
    assert kernel_target_alignment(Y @ Y.T, y, centered=False) == pytest.approx(1.0)
    assert kernel_target_alignment(Y @ Y.T, Y) == pytest.approx(1.0)
    K = torch.randn(9, 9, generator=g, dtype=DT)
    K = K @ K.T
    assert kernel_target_alignment(K, Y, centered=False) == pytest.approx(
        np_alignment(K, Y @ Y.T), rel=1e-13)
    assert kernel_target_alignment(K, y) == pytest.approx(np_alignment(K, Y @ Y.T, centered=True),
                                                          rel=1e-12)
    y_vec = Y.reshape(-1, 1)
    Kbig = torch.randn(27, 27, generator=g, dtype=DT)
    Kbig = Kbig @ Kbig.T
    assert kernel_target_alignment(Kbig, Y) == pytest.approx(
        np_alignment(Kbig, y_vec @ y_vec.T, centered=True), rel=1e-12)
    with pytest.raises(ValueError):
        kernel_target_alignment(torch.eye(5, dtype=DT), Y)


def test_kernel_target_alignment_class_count_and_shape_errors():
    """Class indices without num_classes give C = max + 1 columns (an (nC × nC) kernel must
    match exactly); a kernel matching neither n nor nC is refused with the reason."""
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([0, 2, 1, 2, 0])
    Y = torch.nn.functional.one_hot(y, 3).to(DT)
    A = torch.randn(15, 15, generator=g, dtype=DT)
    Kbig = A @ A.T
    yv = Y.reshape(-1, 1)
    assert kernel_target_alignment(Kbig, y) == pytest.approx(
        np_alignment(Kbig, yv @ yv.T, centered=True), rel=1e-12)
    with pytest.raises(ValueError, match=r"^kernel of size 4 matches neither n=5 nor n·C=15$"):
        kernel_target_alignment(torch.zeros(4, 15, dtype=DT), Y)
    with pytest.raises(ValueError, match=r"^kernels must be square matrices of equal shape, got "
                                         r"\(5, 5\) and \(4, 4\)$"):
        kernel_alignment(torch.eye(5, dtype=DT), torch.eye(4, dtype=DT))


def test_curvlinops_ntk_of_a_parameter_subset_and_frozen_weights():
    """``params=`` restricts the curvlinops NTK to those parameters; a RevMLP whose weights are
    frozen (biases trained) gives the structured NTK of the biases alone (A = [1])."""
    model = revmlp(9, L=2)
    X = torch.randn(4, 8, generator=torch.Generator().manual_seed(9), dtype=DT)
    sub = [model.blocks[1].f.linear.weight, model.blocks[0].g.linear.bias]
    names = {id(p): n for n, p in model.named_parameters()}
    sub_names = [names[id(p)] for p in sub]

    def J_of(names_):
        base = {n: p.detach() for n, p in model.named_parameters()}

        def f(*ps):
            return functional_call(model, {**base, **dict(zip(names_, ps, strict=True))},
                                   (X,)).reshape(-1)
        jac = jacrev(f, argnums=tuple(range(len(names_))))(*(base[n] for n in names_))
        return torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)

    Js = J_of(sub_names)
    assert torch.allclose(empirical_ntk(model, X, method="curvlinops", params=sub), Js @ Js.T,
                          rtol=0, atol=1e-12)
    for blk in model.blocks:
        blk.f.linear.weight.requires_grad_(False)
        blk.g.linear.weight.requires_grad_(False)
    bias_names = [n for n, p in model.named_parameters() if p.requires_grad]
    Jb = J_of(bias_names)
    assert torch.allclose(revmlp_ntk(model, X), Jb @ Jb.T, rtol=0, atol=1e-12)


def test_empirical_ntk_dispatch_trace_outputs_and_errors():
    """``auto`` on a RevMLP with ``params=`` uses torch.func (the structured path refuses a
    subset); ``trace_outputs`` through the structured and curvlinops paths; clear errors."""
    model = revmlp(10, L=2)
    X = torch.randn(4, 8, generator=torch.Generator().manual_seed(10), dtype=DT)
    J = jacobian_oracle(model, X)
    K = J @ J.T
    K_tr = np.einsum("iajb->ij", (K.reshape(4, 3, 4, 3) * np.eye(3)[None, :, None, :]).numpy())
    for method in ("auto", "structured", "curvlinops"):
        got = empirical_ntk(model, X, method=method, trace_outputs=True)
        assert got.shape == (4, 4)
        np.testing.assert_allclose(got.numpy(), K_tr, rtol=0, atol=1e-12 * np.abs(K_tr).max())
    sub = [model.blocks[0].f.linear.weight]
    Jw = J[:, :model.blocks[0].f.linear.weight.numel()]
    assert torch.allclose(empirical_ntk(model, X, params=sub), Jw @ Jw.T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"^the structured NTK uses all trainable RevMLP "
                       r"parameters; freeze others with requires_grad=False instead of params=$"):
        empirical_ntk(model, X, method="structured", params=sub)
    with pytest.raises(ValueError, match=r"^unknown NTK method 'nope'; use auto, func, "
                                         r"curvlinops or structured$"):
        empirical_ntk(model, X, method="nope")
