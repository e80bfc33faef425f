"""The sharpness regularisers (gnrev.sam, .psam, .weight_noise, .hessian_trace_penalty,
.gn_trace_penalty) against dense float64 oracles.

The oracles share no code with :mod:`gnrev_plugin.optim.regularizers`: the MLP is re-implemented on a
flat parameter vector with explicit matrices and closed-form activations (and, for the NME
ablation, closed-form tangent lines frozen at the pre-activations of ``θ``), the losses are written
out (``logsumexp(z) − z_y``, ``mean (z − Y)²``), and every derivative comes from ``torch.func``
(``grad``, ``hessian``, ``jacrev``) on that flat function. Each update is checked through a real
``step_on_batch`` with a momentum-free SGD base: ``θ₁ = θ₀ − η d``.

Tolerances: exact identities to ``1e-10`` relative (observed ~1e-15); Monte-Carlo checks at four
standard errors of the estimator computed from the same samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, hessian, jacrev, vmap

from gnrev_plugin.nn import MLP
from gnrev_plugin.optim import PSAM, SAM, GNTracePenalty, HessianTracePenalty, WeightNoise

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DT = torch.float64
RTOL = 1e-10
SQRT2 = math.sqrt(2.0)


# ------------------------------------------------------------------ independent oracle
def _cdf(x):
    return 0.5 * (1.0 + torch.erf(x / SQRT2))


def _pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _phi(act: str, h):
    if act == "relu":
        return torch.clamp(h, min=0.0)
    beta = 1.0 if act == "gelu" else float(act.split(":")[1])
    return h * _cdf(beta * h)


def _dphi(act: str, h):
    if act == "relu":
        return (h > 0).to(h.dtype)
    beta = 1.0 if act == "gelu" else float(act.split(":")[1])
    return _cdf(beta * h) + beta * h * _pdf(beta * h)


class Oracle:
    """``L(v)`` of a bias-ful MLP on a flat vector ``v`` (``named_parameters`` order)."""

    def __init__(self, model: MLP, x, y, act: str, loss: str):
        self.shapes = [p.shape for p in model.parameters()]
        self.v0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        self.x, self.y, self.act, self.loss = x, y, act, loss
        self.h0 = [h.detach() for h in self.preacts(self.v0)]

    def unflat(self, v):
        out, i = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(v[i:i + n].reshape(s))
            i += n
        return out

    def preacts(self, v):
        ws, a, hs = self.unflat(v), self.x, []
        for i in range(0, len(ws) - 2, 2):
            h = a @ ws[i].T + ws[i + 1]
            hs.append(h)
            a = _phi(self.act, h)
        return hs

    def logits(self, v, x=None, frozen: bool = False):
        """``z(v)``; ``frozen``: each activation is its tangent at the pre-activations of
        ``v0`` on the full batch (``x`` must then be ``None``)."""
        ws, a = self.unflat(v), self.x if x is None else x
        for j, i in enumerate(range(0, len(ws) - 2, 2)):
            h = a @ ws[i].T + ws[i + 1]
            if frozen:
                h0 = self.h0[j]
                a = _phi(self.act, h0) + _dphi(self.act, h0) * (h - h0)
            else:
                a = _phi(self.act, h)
        return a @ ws[-2].T + ws[-1]

    def per_example(self, z, y):
        if self.loss == "cross_entropy":
            return torch.logsumexp(z, 1) - z[torch.arange(len(z)), y]
        return ((z - y) ** 2).mean(1)

    def L(self, v, frozen: bool = False):
        return self.per_example(self.logits(v, frozen=frozen), self.y).mean()

    def g(self):
        return grad(self.L)(self.v0)

    def H(self, frozen: bool = False):
        return hessian(lambda v: self.L(v, frozen))(self.v0)


def problem(act: str, seed: int = 0, loss: str = "cross_entropy", n: int = 12, d: int = 4,
            widths=(5, 4), C: int = 3):
    torch.manual_seed(seed)
    model = MLP(in_features=d, num_classes=C, hidden=list(widths), activation=act, dtype=DT)
    x = 1.5 * torch.randn(n, d, dtype=DT)
    labels = torch.randint(0, C, (n,))
    y = labels if loss == "cross_entropy" else torch.nn.functional.one_hot(labels, C).to(DT)
    return model, x, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_dict(d, model):
    return torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def step_direction(opt, model, x, y, lr):
    """``d`` recovered from a real step of the SGD base: ``(θ₀ − θ₁)/η``."""
    v0 = flat(model)
    opt.step_on_batch(x, y)
    return (v0 - flat(model)) / lr


ACTS = ["relu", "gelu", "beta_gelu:4"]
LR = 0.3


# ------------------------------------------------------------------ each update = its formula
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_sam_update_is_the_gradient_at_the_normalised_ascent_point(act, ablate, loss):
    model, x, y = problem(act, loss=loss)
    o = Oracle(model, x, y, act, loss)
    rho = 0.07
    g = o.g()
    eps = rho * g / g.norm()
    expected = grad(lambda v: o.L(v, frozen=ablate))(o.v0 + eps)
    opt = SAM(model.parameters(), rho=rho, lr=LR, model=model, loss=loss, ablate_nme=ablate)
    d = step_direction(opt, model, x, y, LR)
    assert rel(d, expected) < RTOL * 1e2  # the step's θ₀ − θ₁ loses ~1e-14 to cancellation
    assert rel(flat_dict(opt.last_probes["epsilon"], model), eps) < RTOL


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_psam_update_is_gradient_plus_rho_hessian_times_unit_gradient(act, ablate, loss):
    model, x, y = problem(act, loss=loss)
    o = Oracle(model, x, y, act, loss)
    rho = 0.07
    g = o.g()
    H = o.H(frozen=ablate)
    expected = g + rho * H @ (g / g.norm())
    opt = PSAM(model.parameters(), rho=rho, lr=LR, model=model, loss=loss, ablate_nme=ablate)
    assert rel(step_direction(opt, model, x, y, LR), expected) < RTOL * 1e2


def test_psam_ablated_hessian_is_the_hessian_of_the_nme_ablated_gelu_model():
    """The frozen-tangent Hessian of the oracle is the Hessian of ``MLP(activation=
    "ablated_gelu")`` (the nn/ module), so the two ablation constructions agree."""
    model, x, y = problem("gelu")
    o = Oracle(model, x, y, "gelu", "cross_entropy")
    abl = MLP(in_features=4, num_classes=3, hidden=[5, 4], activation="ablated_gelu", dtype=DT)
    abl.load_state_dict(model.state_dict())
    names = [n for n, _ in abl.named_parameters()]

    def L_abl(v):
        ps = dict(zip(names, o.unflat(v), strict=True))
        z = torch.func.functional_call(abl, ps, (x,))
        return o.per_example(z, y).mean()

    H_abl = hessian(L_abl)(o.v0)
    assert float((H_abl - o.H(frozen=True)).abs().max()) < 1e-13
    assert float((H_abl - o.H()).abs().max()) > 1e-3  # the activation NME is not negligible


def test_psam_with_per_group_rho_is_first_order_sam():
    """Two groups with their own ρ: ``d = ∇L + H ε`` with ``ε_p = ρ_p g_p/‖g‖``."""
    model, x, y = problem("gelu")
    o = Oracle(model, x, y, "gelu", "cross_entropy")
    ps = list(model.parameters())
    rhos = torch.cat([torch.full((p.numel(),), 0.02 if i < 2 else 0.09, dtype=DT)
                      for i, p in enumerate(ps)])
    g = o.g()
    expected = g + o.H() @ (rhos * g / g.norm())
    opt = PSAM([{"params": ps[:2], "rho": 0.02}, {"params": ps[2:]}], rho=0.09, lr=LR,
               model=model)
    assert rel(step_direction(opt, model, x, y, LR), expected) < RTOL * 1e2


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_weight_noise_update_is_the_gradient_at_the_drawn_perturbation(act, ablate, loss):
    model, x, y = problem(act, loss=loss)
    o = Oracle(model, x, y, act, loss)
    opt = WeightNoise(model.parameters(), sigma2=0.01, samples=2, seed=3, lr=LR, model=model,
                      loss=loss, ablate_nme=ablate)
    d = step_direction(opt, model, x, y, LR)
    eps = [flat_dict(e, model) for e in opt.last_probes["epsilon"]]
    assert len(eps) == 2 and rel(eps[0], eps[1]) > 0.5
    expected = sum(grad(lambda v: o.L(v, frozen=ablate))(o.v0 + e) for e in eps) / 2
    assert rel(d, expected) < RTOL * 1e2


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_hessian_trace_penalty_update_is_the_gradient_of_the_hutchinson_penalty(act, ablate, loss):
    """``d = ∇_θ[L + (σ²/2)(1/k) Σ_i z_iᵀ H(θ) z_i]`` with the drawn probes; the third
    derivatives come from ``grad(hessian)`` of the oracle."""
    model, x, y = problem(act, loss=loss, widths=(4, 3))
    o = Oracle(model, x, y, act, loss)
    sigma2, k = 0.05, 3
    opt = HessianTracePenalty(model.parameters(), sigma2=sigma2, samples=k, seed=1, lr=LR,
                              model=model, loss=loss, ablate_nme=ablate)
    d = step_direction(opt, model, x, y, LR)
    z = torch.stack([flat_dict({n: t[i] for n, t in opt.last_probes["probes"].items()}, model)
                     for i in range(k)])

    def penalty(v):
        H = hessian(lambda u: o.L(u, frozen=ablate))(v)
        return torch.einsum("ip,pq,iq->", z, H, z) / k

    expected = o.g() + 0.5 * sigma2 * grad(penalty)(o.v0)
    assert rel(d, expected) < RTOL * 1e2
    assert opt.last_step_info["hessian_trace_estimate"] == pytest.approx(
        float(penalty(o.v0)), rel=1e-10)


def _per_example_grads(o: Oracle, labels, frozen: bool):
    """``(B, P)``: ``∇_θ ℓ(z_n(θ), ŷ_n)`` as rows of the Jacobian of the loss vector."""
    def losses(v):
        return o.per_example(o.logits(v, frozen=frozen), labels)

    return losses


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_gn_trace_penalty_update_is_the_gradient_of_the_sampled_label_penalty(act, ablate, loss):
    """``d = ∇_θ[L + (σ²/2)(1/k) Σ_j (1/B) Σ_n ‖∇_θ ℓ(z_n, ŷ_{n,j})‖²]`` with the drawn labels:
    per-example gradients (not the batch gradient), each example with its own label."""
    model, x, y = problem(act, loss=loss)
    o = Oracle(model, x, y, act, loss)
    sigma2, k = 0.05, 2
    opt = GNTracePenalty(model.parameters(), sigma2=sigma2, samples=k, seed=2, lr=LR,
                         model=model, loss=loss, ablate_nme=ablate)
    d = step_direction(opt, model, x, y, LR)
    labels = opt.last_probes["labels"]
    assert labels.shape[:2] == (k, len(x))

    def penalty(v):
        total = 0.0
        for j in range(k):
            J = jacrev(_per_example_grads(o, labels[j], ablate))(v)  # (B, P)
            total = total + (J * J).sum() / len(x)
        return total / k

    expected = o.g() + 0.5 * sigma2 * grad(penalty)(o.v0)
    assert rel(d, expected) < RTOL * 1e2
    assert opt.last_step_info["gn_trace_estimate"] == pytest.approx(float(penalty(o.v0)),
                                                                    rel=1e-10)


@pytest.mark.parametrize("cls", [WeightNoise, HessianTracePenalty, GNTracePenalty])
def test_zero_noise_is_plain_gradient_descent(cls):
    model, x, y = problem("gelu")
    o = Oracle(model, x, y, "gelu", "cross_entropy")
    opt = cls(model.parameters(), sigma2=0.0, seed=0, lr=LR, model=model)
    assert rel(step_direction(opt, model, x, y, LR), o.g()) < RTOL * 1e2


# ------------------------------------------------------------------ SAM vs PSAM
def _sam_minus_psam(act: str, seed: int, rhos):
    torch.manual_seed(seed)
    model = MLP(in_features=6, num_classes=4, hidden=[12, 12], activation=act, dtype=DT)
    x = torch.randn(64, 6, dtype=DT)
    y = torch.randint(0, 4, (64,))
    out = []
    for rho in rhos:
        sam = SAM(model.parameters(), rho=rho, model=model)
        psam = PSAM(model.parameters(), rho=rho, model=model)
        _, ds = sam.compute_direction(x, y)
        _, dp = psam.compute_direction(x, y)
        sam.close()
        psam.close()
        out.append(float(torch.sqrt(sum(((ds[n] - dp[n]) ** 2).sum() for n in ds))))
    return model, x, y, out


RHOS = [0.1, 0.05, 0.025]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sam_minus_psam_is_second_order_in_rho_for_gelu(seed):
    """Halving ρ divides ‖∇L(θ + ρĝ) − (∇L + ρHĝ)‖ by 4 (observed 3.99–4.04)."""
    *_, diffs = _sam_minus_psam("gelu", seed, RHOS)
    for a, b in zip(diffs, diffs[1:], strict=False):
        assert 3.8 < a / b < 4.2


@pytest.mark.parametrize("seed", [0, 2])
def test_sam_minus_psam_is_not_second_order_for_relu(seed):
    """For ReLU, PSAM's HVP sees φ'' = 0 while SAM's step crosses activation boundaries: the
    gap shrinks far slower than ρ² (observed ratios 1.2–2.4 per halving)."""
    model, x, y, diffs = _sam_minus_psam("relu", seed, RHOS)
    for a, b in zip(diffs, diffs[1:], strict=False):
        assert a / b < 3.0
    # the cause: some pre-activation changes sign between θ and θ + ρĝ at the smallest ρ
    o = Oracle(model, x, y, "relu", "cross_entropy")
    g = o.g()
    moved = o.preacts(o.v0 + RHOS[-1] * g / g.norm())
    assert any(bool(((h0 > 0) != (h1 > 0)).any()) for h0, h1 in zip(o.h0, moved, strict=True))


# ------------------------------------------------------------------ the NME ablation and PSAM
@pytest.mark.parametrize("act, changes", [("gelu", True), ("beta_gelu:2", True),
                                          ("relu", False)])
def test_ablating_the_activation_nme_changes_psam_for_gelu_not_relu(act, changes):
    model, x, y = problem(act, n=32, widths=(8, 8))
    plain = PSAM(model.parameters(), rho=0.1, model=model)
    ablated = PSAM(model.parameters(), rho=0.1, model=model, ablate_nme=True)
    _, d0 = plain.compute_direction(x, y)
    _, d1 = ablated.compute_direction(x, y)
    g = grad(Oracle(model, x, y, act, "cross_entropy").L)(flat(model))
    a, b = flat_dict(d0, model), flat_dict(d1, model)
    # relative to the size of the second-order term ρHĝ = d − g
    change = float((a - b).norm() / (a - g).norm())
    if changes:
        assert change > 0.05
    else:
        assert change < 1e-12


# ------------------------------------------------------------------ Monte-Carlo expectations
def test_weight_noise_expectation_is_half_sigma2_trace_h_to_order_sigma4():
    """With the optimizer's own draws ``ε ∼ N(0, σ²I)`` and antithetic pairs ``±ε``:

    * ``E[εᵀHε]/2 = (σ²/2) tr H`` (the sample mean within 4 standard errors), and
    * the remainder ``R(σ) = mean[(L(θ+ε) + L(θ−ε))/2 − L(θ) − εᵀHε/2]`` is ``O(σ⁴)``: with the
      same normal draws, quartering σ² divides it by 16 (observed 15.9),

    so ``E L(θ+ε) − L(θ) = (σ²/2) tr H + O(σ⁴)``."""
    model, x, y = problem("gelu", n=16)
    o = Oracle(model, x, y, "gelu", "cross_entropy")
    H = o.H()
    L0 = o.L(o.v0)
    S = 4000
    remainders = []
    for sigma2 in (0.02, 0.005):
        opt = WeightNoise(model.parameters(), sigma2=sigma2, seed=11, model=model)
        eps = torch.stack([flat_dict(opt.sample_perturbation(), model) for _ in range(S)])
        quad = 0.5 * torch.einsum("sp,pq,sq->s", eps, H, eps)
        mean, se = float(quad.mean()), float(quad.std() / math.sqrt(S))
        target = 0.5 * sigma2 * float(torch.trace(H))
        assert abs(mean - target) < 4 * se, (sigma2, mean, target, se)
        assert se < 0.05 * abs(target)  # the check has power
        Lp = vmap(o.L)(o.v0 + eps)
        Lm = vmap(o.L)(o.v0 - eps)
        remainders.append(float(((Lp + Lm) / 2 - L0 - quad).mean()))
    ratio = remainders[0] / remainders[1]
    assert 14.5 < ratio < 17.5, remainders


def _dense_gn_trace(o: Oracle) -> float:
    J = jacrev(lambda v: o.logits(v))(o.v0)  # (B, C, P)
    z = o.logits(o.v0)
    B, C = z.shape
    if o.loss == "cross_entropy":
        p = torch.softmax(z, 1)
        Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        Hz = (2.0 / C) * torch.eye(C, dtype=DT).expand(B, C, C)
    G = torch.einsum("bcp,bcd,bdq->pq", J, Hz, J) / B
    return float(torch.trace(G))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_gn_trace_estimator_is_unbiased_for_tr_g(loss):
    """The mean of the optimizer's sampled-label estimates ``(1/B) Σ_n ‖∇ℓ(z_n, ŷ_n)‖²`` is
    ``tr G = (1/B) Σ_n tr(J_nᵀ H_z J_n)`` (dense Jacobians, explicit ``H_z``) within 4 SE."""
    model, x, y = problem("gelu", n=8, loss=loss)
    o = Oracle(model, x, y, "gelu", loss)
    opt = GNTracePenalty(model.parameters(), seed=5, model=model, loss=loss)
    samples = opt.gn_trace_samples(x, y, 1500)
    mean, se = float(samples.mean()), float(samples.std() / math.sqrt(len(samples)))
    trG = _dense_gn_trace(o)
    assert abs(mean - trG) < 4 * se, (mean, trG, se)
    assert se < 0.03 * trG


def test_hutchinson_trace_estimates_are_unbiased_for_tr_h_and_tr_h_ablated():
    model, x, y = problem("gelu", n=16)
    o = Oracle(model, x, y, "gelu", "cross_entropy")
    for ablate in (False, True):
        opt = HessianTracePenalty(model.parameters(), seed=4, model=model, ablate_nme=ablate)
        samples = opt.hessian_trace_samples(x, y, 3000)
        mean, se = float(samples.mean()), float(samples.std() / math.sqrt(len(samples)))
        trH = float(torch.trace(o.H(frozen=ablate)))
        assert abs(mean - trH) < 4 * se, (ablate, mean, trH, se)
        assert se < 0.05 * abs(trH)
