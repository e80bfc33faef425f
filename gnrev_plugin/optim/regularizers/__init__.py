r"""Sharpness regularisers of Dauphin, Agarwala & Mobahi (NeurIPS 2024) as optimizer wrappers.

Each class wraps a **base optimizer** (a ``torch.optim.Optimizer`` class, default
``torch.optim.SGD``, or a factory ``(param_groups, **options)``; through the registry also any
registered optimizer name that steps from ``p.grad``, ``base="gnrev.sgd"``; its options as keywords,
``lr=0.1``, or in ``base_kwargs``) and hands it a *direction* ``d`` in place of the gradient:
``p.grad ← d; base.step()``. The wrapper and the base share their ``param_groups``, so every
hyperparameter (the wrapper's ``rho``/``sigma2``/``loss``, the base's ``lr``, ``momentum``...)
lives there, as in ``torch.optim``, and LR schedulers see the base's ``lr``.

Notation (the paper's): mini-batch loss ``L(θ) = (1/B) Σ_n ℓ(z_n, y_n)`` with logits
``z_n = f(θ, x_n)``, gradient ``g = ∇L``, ``ĝ = g/‖g‖`` (``ĝ := 0`` when ``g = 0``), Hessian
``H = ∇²L = G + NME`` with the Gauss-Newton matrix ``G = (1/B) Σ_n J_nᵀ H_{z,n} J_n`` and the
nonlinear modelling error ``NME = (1/B) Σ_n Σ_c [∇_z ℓ_n]_c ∇²_θ z_{n,c}``.

Each method: its objective → the direction ``d`` handed to the base optimizer.

* :class:`SAM` (``gnrev.sam``): ``max_{‖ε‖≤ρ} L(θ+ε)`` with one ascent step ``ε = ρ ĝ`` →
  ``d = ∇L(θ + ε)``.
* :class:`PSAM` (``gnrev.psam``), the gradient-norm penalty ``L + ρ‖∇L‖`` (SAM to first order)
  → ``d = ∇L + ρ H ĝ``.
* :class:`WeightNoise` (``gnrev.weight_noise``): ``E_{ε∼N(0,σ²I)} L(θ+ε)`` → ``d = ∇L(θ + ε)``
  for one draw ``ε``.
* :class:`HessianTracePenalty` (``gnrev.hessian_trace_penalty``): ``L + (σ²/2) tr H`` →
  ``d = ∇[L + (σ²/2)(1/k) Σ_i v_iᵀ H v_i]``.
* :class:`GNTracePenalty` (``gnrev.gn_trace_penalty``): ``L + (σ²/2) tr G`` →
  ``d = ∇[L + (σ²/2)(1/B) Σ_n ‖∇_θ ℓ(z_n, ŷ_n)‖²]``.

* ``v_i ∼ N(0, I)`` (or Rademacher, ``probes=``), ``k = samples`` probes: Hutchinson's
  ``E vᵀHv = tr H``.
* Cross-entropy: ``ŷ_n ∼ Cat(softmax z_n)``, one sampled label per example per sample; since
  ``H_z = diag(p) − ppᵀ = E_ŷ[(p − e_ŷ)(p − e_ŷ)ᵀ]``,
  ``E_ŷ (1/B) Σ_n ‖∇_θ ℓ(z_n, ŷ_n)‖² = (1/B) Σ_n tr(J_nᵀ H_z J_n) = tr G``.
  MSE (``nn.MSELoss()``, ``ℓ_n = ‖z_n − y_n‖²/C``, ``H_z = (2/C) I``): ``ŷ_n = z_n + √(C/2) ξ``,
  ``ξ ∼ N(0, I)``, the model's Gaussian predictive distribution, with the same identity.
  The labels are sampled at ``θ`` and held fixed, so ``d`` is the gradient of the sampled-label
  objective (the paper's estimator), ``E_ŷ ∇‖∇ℓ(z, ŷ)‖²``; it omits the score-function term
  ``Σ_c ‖∇ℓ(z, c)‖² ∇p_c`` of ``∇ tr G``.

Per-group hyperparameters generalise the uniform ones: SAM's ascent is ``ε_p = ρ_p g_p/‖g‖`` (the
norm over all parameters) and PSAM's direction its first-order Taylor term, ``∇L + H ε``; the
noise and the probes of the other three methods are drawn with covariance ``Σ = diag(σ_p² I)``, so
their penalty is ``½ tr(Σ H)`` (or ``½ tr(Σ G)``).

**Cost per step** (``P`` parameters, batch ``B``; an HVP is a forward-over-reverse product, about
two to three gradients):

* SAM: 2 gradients, 0 HVPs; PSAM: 1 gradient + 1 HVP;
* weight noise: ``k`` gradients (plus one forward for the loss at ``θ``), 0 HVPs;
* Hessian trace: ``k`` HVPs and their reverse-mode gradient (third derivatives, ≈ 2 HVPs each);
* GN trace: one forward to sample labels, ``k`` per-example gradient passes (``vmap``, ``B×P``
  memory) and their reverse-mode gradient (≈ ``k`` batched HVPs); no Hessian product.

**Ablating the activation NME** (``ablate_nme=True``). The activation's second derivative ``φ''``
enters ``H`` only through the within-layer ("activation") part of the NME. With the option on,
every elementwise activation ``φ`` of the model (:data:`ELEMENTWISE_ACTIVATIONS`) is replaced, in
the method's second-order part only, by its tangent at the pre-activations ``h₀`` of the current
iterate ``θ`` on this batch,

    φ̃(h) = φ(h₀) + φ'(h₀)(h − h₀),

which has the same value, first derivative, Jacobian and ``G`` at ``θ`` but ``φ̃'' = 0`` (the
construction of :class:`~gnrev_plugin.nn.NMEAblatedActivation`, frozen at ``θ``). So PSAM uses
``∇L + H_abl ε`` (the φ''-free HVP; ``H_abl = H`` for ReLU), the trace penalties use ``tr H_abl``
and drop ``φ''``/``φ'''`` from the penalty's gradient, and SAM and weight noise take the gradient
at ``θ + ε`` of the model whose activations are frozen at first order around ``θ``
(``= ∇L + H_abl ε + O(‖ε‖²)``). ``∇L`` itself is never changed. Activations must be
``nn.Module`` instances (not functional calls inside ``forward``).

**Stepping.** Runners call :meth:`~SharpnessOptimizer.step_on_batch` ``(x, y)`` (the wrappers
declare ``needs=("model", "loss")``, so the runner passes ``model=`` and ``loss=``): every method
evaluates its direction on the batch with ``torch.func`` (``grad``, ``jvp(grad)``, ``vmap``). In a
plain training loop the drop-in contract is::

    loss = crit(model(x), y); loss.backward(); opt.step()          # every method

where the batch and the loss are taken from the forward/backward just run (the package's
:class:`~gnrev_plugin.optim.capture.OutputCapture`: the loss must be ``nn.CrossEntropyLoss()`` or
``nn.MSELoss()`` with default options, applied to the model output). :class:`SAM` and
:class:`WeightNoise` also accept the usual SAM closure (any loss, any model)::

    def closure():
        opt.zero_grad(); loss = crit(model(x), y); loss.backward(); return loss
    loss = opt.step(closure)      # SAM: ∇L at θ, then at θ + ε, through the closure
"""

from __future__ import annotations

from .base import SharpnessOptimizer
from .linearisation import ELEMENTWISE_ACTIVATIONS, ActivationLinearisation
from .noise import WeightNoise
from .sam import PSAM, SAM
from .trace_penalties import PROBES, GNTracePenalty, HessianTracePenalty

__all__ = ["SharpnessOptimizer", "SAM", "PSAM", "WeightNoise", "HessianTracePenalty",
           "GNTracePenalty", "ActivationLinearisation", "ELEMENTWISE_ACTIVATIONS", "PROBES"]
