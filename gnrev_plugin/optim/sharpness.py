r"""Sharpness regularisers of Dauphin, Agarwala & Mobahi (NeurIPS 2024) as optimizer wrappers.

Each class wraps a **base optimizer** (``base="gnrev.sgd"`` or any registered optimizer that steps
from ``p.grad``, or a ``torch.optim.Optimizer`` class; its options as keywords, ``lr=0.1``, or in
``base_kwargs``) and hands it
a *direction* ``d`` in place of the gradient: ``p.grad ← d; base.step()``. The wrapper and the base
share their ``param_groups``, so every hyperparameter (the wrapper's ``rho``/``sigma2``, the base's
``lr``, ``momentum``...) lives there, as in ``torch.optim``, and LR schedulers see the base's ``lr``.

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

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from ..nn.dauphin_activations import BetaGELU, NMEAblatedActivation, SyntheticNMEReLU
from ..nn.discovery import find_module_owning
from .capture import OutputCapture, suspended
from .errors import LossCaptureError, NonFiniteError

__all__ = ["SharpnessOptimizer", "SAM", "PSAM", "WeightNoise", "HessianTracePenalty",
           "GNTracePenalty", "ActivationLinearisation", "ELEMENTWISE_ACTIVATIONS", "LOSSES",
           "PROBES"]

#: Losses the wrappers evaluate on a batch: mean cross-entropy on class indices, or
#: ``nn.MSELoss()`` (mean over ``B·C`` entries) on ``(B, C)`` targets.
LOSSES = ("cross_entropy", "mse")
#: Hutchinson probe distributions (both have ``E vvᵀ = I``).
PROBES = ("gaussian", "rademacher")
#: Module types treated as elementwise activations by ``ablate_nme=True``.
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, BetaGELU, NMEAblatedActivation, SyntheticNMEReLU,
)

Params = dict[str, torch.Tensor]
Record = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ============================================================================ NME ablation
class ActivationLinearisation:
    """Replace each elementwise activation by its tangent at reference pre-activations.

    :meth:`record` runs the model once on ``x`` (no autograd) and stores, for every activation
    call in order, ``(h₀, φ(h₀), φ'(h₀))`` (``φ'`` by ``torch.func.jvp`` of the module's
    ``forward`` with a tangent of ones, exact for elementwise ``φ``). Inside :meth:`installed`,
    after :meth:`use` ``(records)``, the activations return ``φ(h₀) + φ'(h₀)(h − h₀)`` instead
    of ``φ(h)``; the records may also be per-example slices (inside ``vmap`` over the batch).

    Raises:
        ValueError: the model has no :data:`ELEMENTWISE_ACTIVATIONS` module, or one is in-place.
    """

    def __init__(self, model: nn.Module,
                 types: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, types)]
        if not self.modules:
            raise ValueError(
                "ablate_nme=True needs the model's activations as nn.Module instances (e.g. "
                "gnrev.mlp's nn.GELU / BetaGELU); found none in "
                f"{type(model).__name__}. Functional activations inside forward() cannot be "
                "linearised")
        inplace = [type(m).__name__ for m in self.modules if getattr(m, "inplace", False)]
        if inplace:
            raise ValueError(f"ablate_nme=True cannot linearise in-place activations {inplace}")
        self.model = model
        self._records: list[Record] | None = None
        self._next = 0

    def record(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Record]]:
        """One forward pass on ``x`` without autograd: ``(output, records)``."""
        records: list[Record] = []

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            h0 = args[0].detach()
            value, slope = jvp(module.forward, (h0,), (torch.ones_like(h0),))
            records.append((h0, value.detach(), slope.detach()))

        handles = [m.register_forward_hook(hook) for m in self.modules]
        try:
            with torch.no_grad(), suspended():
                out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return out, records

    @contextmanager
    def installed(self) -> Iterator[ActivationLinearisation]:
        """Within this context the activations use the records set by :meth:`use` (and behave
        normally while none are set)."""
        handles = [m.register_forward_hook(self._replay) for m in self.modules]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._records = None

    def use(self, records: list[Record] | None) -> None:
        """Set the records the next forward pass replays (``None``: plain activations)."""
        self._records, self._next = records, 0

    def _replay(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self._records is None:
            return None
        if self._next >= len(self._records):
            raise RuntimeError("the forward pass called more activations than were recorded")
        h0, value, slope = self._records[self._next]
        self._next += 1
        h = args[0]
        if h0.dim() > h.dim() or tuple(h.shape[h.dim() - h0.dim():]) != tuple(h0.shape):
            raise RuntimeError(f"activation input of shape {tuple(h.shape)} does not match the "
                               f"recorded pre-activation {tuple(h0.shape)}")
        return value + slope * (h - h0)


# ============================================================================ base wrapper
def _check_number(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        what = "> 0" if positive else "≥ 0"
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def _build_base(base: str | type, groups: list[dict], base_kwargs: Mapping) -> torch.optim.Optimizer:
    """The base optimizer on ``groups`` (shared, not copied)."""
    if isinstance(base, str):
        from ..registry import get_registry

        reg = get_registry()
        name = reg.resolve_name("optimizer", base)
        entry = reg.entry("optimizer", name)
        if entry.needs:
            raise ValueError(f"base optimizer {name!r} needs {list(entry.needs)}: the base must "
                             "be a plain optimizer that steps from p.grad (e.g. gnrev.sgd, "
                             "gnrev.adam)")
        try:
            opt = reg.get_optimizer(name, groups, **base_kwargs)
        except TypeError as err:
            raise ValueError(f"base optimizer {name!r} rejected base_kwargs "
                             f"{dict(base_kwargs)}: {err}") from err
    elif isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        try:
            opt = base(groups, **base_kwargs)
        except TypeError as err:
            raise ValueError(f"base optimizer {base.__name__} rejected base_kwargs "
                             f"{dict(base_kwargs)}: {err}") from err
    else:
        raise TypeError("base must be a registered optimizer name (e.g. 'gnrev.sgd') or a "
                        f"torch.optim.Optimizer subclass, got {base!r}")
    if not isinstance(opt, torch.optim.Optimizer) or callable(getattr(opt, "step_on_batch", None)):
        raise TypeError(f"base optimizer {base!r} must be a torch.optim.Optimizer that steps from "
                        f"p.grad, got {type(opt).__name__}")
    if len(opt.param_groups) != len(groups) or any(
            a is not b for a, b in zip(opt.param_groups, groups, strict=True)):
        raise TypeError(f"base optimizer {type(opt).__name__} copied its parameter groups; the "
                        "wrapper needs them shared (torch.optim.Optimizer's behaviour)")
    return opt


class SharpnessOptimizer(torch.optim.Optimizer):
    """Common machinery of the five wrappers (see the module docstring).

    Args:
        params: parameters (or parameter groups) to train; they must belong to ``model``.
        defaults: the method's hyperparameters (per group).
        base: the base optimizer: a registry name (``"gnrev.sgd"``, ``"adam"``...) or a
            ``torch.optim.Optimizer`` subclass.
        base_kwargs: the base's options (``lr``, ``momentum``...) as a dict; the wrappers also
            take them as plain keywords (``SAM(params, rho=0.05, lr=0.1, momentum=0.9)``),
            merged with ``base_kwargs`` (a key given both ways is an error). A registry base
            also gets its entry's defaults. They end up in the shared ``param_groups``.
        base_options: the keywords just described (subclasses pass their ``**base_options``).
        model: the ``nn.Module`` the parameters belong to (found among live modules if omitted).
        loss: ``"cross_entropy"`` or ``"mse"`` (the batch loss ``L``).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict, *,
                 base: str | type = "gnrev.sgd", base_kwargs: Mapping | None = None,
                 model: nn.Module | None = None, loss: str = "cross_entropy",
                 base_options: Mapping | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unsupported loss {loss!r}; the sharpness wrappers support {LOSSES}")
        if not isinstance(defaults.get("ablate_nme", False), bool):
            raise ValueError(f"ablate_nme must be a bool, got {defaults['ablate_nme']!r}")
        if base_kwargs is not None and not isinstance(base_kwargs, Mapping):
            raise ValueError(f"base_kwargs must be a dict, got {type(base_kwargs).__name__}")
        base_kwargs, base_options = dict(base_kwargs or {}), dict(base_options or {})
        if both := sorted(set(base_kwargs) & set(base_options)):
            raise ValueError(f"{both} given both as keywords and in base_kwargs")
        base_kwargs.update(base_options)
        super().__init__(params, defaults)
        self.loss_kind = loss
        self.base_optimizer = _build_base(base, self.param_groups, base_kwargs)
        self.base_name = base if isinstance(base, str) else f"{base.__module__}.{base.__qualname__}"
        self.param_groups = self.base_optimizer.param_groups
        params_all = [p for g in self.param_groups for p in g["params"]]
        self.model = model if model is not None else find_module_owning(params_all)
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        owned = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(params_all) if id(p) not in owned]
        if missing:
            raise ValueError(f"parameters {missing} passed to {type(self).__name__} are not in "
                             "the model")
        self._names = {id(p): owned[id(p)] for p in params_all}
        self._capture = OutputCapture(self.model)
        self._linearisation: ActivationLinearisation | None = None
        if self._option("ablate_nme"):
            self._linearisation = ActivationLinearisation(self.model)
        #: Scalars of the last step: ``loss`` (``L(θ)``), ``grad_norm`` (``‖∇L(θ)‖``) and the
        #: method's own (penalty, trace estimates...).
        self.last_step_info: dict[str, float] = {}
        #: The random draws of the last step (``epsilon``, ``probes``, ``labels``), detached.
        self.last_probes: dict[str, Any] = {}

    # ------------------------------------------------------------------ groups and options
    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapper and the base (both see the same dict)."""
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        self.base_optimizer.add_param_group(param_group)
        self._validate_group(param_group)
        for p in param_group["params"]:
            name = {id(q): n for n, q in self.model.named_parameters()}.get(id(p))
            if name is None:
                raise ValueError("a parameter of the new group is not in the model")
            self._names[id(p)] = name

    def _validate_group(self, group: dict) -> None:
        """Check a group's hyperparameters (subclasses extend)."""

    def _option(self, key: str) -> Any:
        values = {repr(g[key]) for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"{key} is a model-wide option and must be equal in every parameter "
                             f"group, got {sorted(values)}")
        return self.param_groups[0][key]

    def _per_param(self, key: str) -> dict[str, float]:
        return {self._names[id(p)]: float(g[key]) for g in self.param_groups for p in g["params"]}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _theta(self) -> Params:
        return {self._names[id(p)]: p.detach() for p in self._params()}

    # ------------------------------------------------------------------ losses
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be tensors")
        if x.dim() < 1 or y.dim() < 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need a non-empty batch with one target per input, got x "
                             f"{tuple(x.shape)} and y {tuple(y.shape)}")
        if self.loss_kind == "cross_entropy" and (y.dim() != 1 or torch.is_floating_point(y)):
            raise ValueError("cross-entropy targets must be integer class indices of shape (B,), "
                             f"got {tuple(y.shape)} {y.dtype}")
        if self.loss_kind == "mse" and (y.dim() != 2 or not torch.is_floating_point(y)):
            raise ValueError("MSE targets must be floating (B, C) (one-hot for classes), got "
                             f"{tuple(y.shape)} {y.dtype}")

    def _criterion(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # = F.cross_entropy(z, y) / F.mse_loss(z, y), written out: vmap has no batching rule
        # for nll_loss (a slow per-example loop in the GN-trace penalty), and jvp(grad(·))
        # through F.mse_loss's backward raises "ZeroTensors are immutable" (torch 2.14.1)
        if self.loss_kind == "cross_entropy":
            return (torch.logsumexp(z, 1) - z.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
        return ((z - y) ** 2).mean()

    def _forward(self, theta: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, theta, (x,))

    def _loss(self, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L(θ)`` on the batch (with the records set by :meth:`_records`, if any)."""
        return self._criterion(self._forward(theta, x), y)

    def _loss_with(self, records: list[Record] | None) -> Callable[..., torch.Tensor]:
        """``θ, x, y ↦ L(θ)`` with the activations linearised at ``records`` (``None``: not)."""
        if records is None:
            return self._loss
        lin = self._linearisation

        def loss(theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            lin.use(records)
            try:
                return self._loss(theta, x, y)
            finally:
                lin.use(None)

        return loss

    def _records(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Record] | None]:
        """The output at ``θ`` (no autograd) and, with ``ablate_nme``, the activation records."""
        if self._linearisation is not None:
            return self._linearisation.record(x)
        with torch.no_grad(), suspended():
            return self.model(x), None

    @contextmanager
    def _maybe_linearised(self) -> Iterator[None]:
        if self._linearisation is None:
            yield
        else:
            with self._linearisation.installed():
                yield

    def _sync_linearisation(self) -> None:
        """Follow the groups' ``ablate_nme`` (it may be changed after construction)."""
        if not self._option("ablate_nme"):
            self._linearisation = None
        elif self._linearisation is None:
            self._linearisation = ActivationLinearisation(self.model)

    # ------------------------------------------------------------------ stepping
    def compute_direction(self, x: torch.Tensor, y: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L(θ), {name: d})``: the loss before the step and the direction the base would get.
        Nothing is changed except the method's random generator (and :attr:`last_step_info`,
        :attr:`last_probes`)."""
        self._check_batch(x, y)
        self._sync_linearisation()
        with torch.no_grad(), suspended(), self._maybe_linearised():
            loss, d = self._direction(x, y)
        bad = [n for n, t in d.items() if not bool(torch.isfinite(t).all())]
        if bad or not math.isfinite(float(loss)):
            raise NonFiniteError(f"non-finite {type(self).__name__} direction (in {bad or 'loss'});"
                                 " the parameters were not changed")
        return loss.detach(), d

    def _direction(self, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on ``(x, y)`` (``y``: the loss's targets); returns ``L(θ)`` before the step."""
        loss, d = self.compute_direction(x, y)
        self._apply(d)
        self._capture.batch = None
        return loss

    @torch.no_grad()
    def _apply(self, d: dict[str, torch.Tensor]) -> None:
        for p in self._params():
            p.grad = d[self._names[id(p)]].to(p.dtype).reshape(p.shape).clone()
        self.base_optimizer.step()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step on the batch of the last ``loss = crit(model(x), y); loss.backward()``
        (``closure``, if given, is called first, torch.optim-style, and its batch is used).
        Returns the loss at ``θ`` before the step."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        try:
            batch, call = self._capture.consume(self.loss_kind)
        finally:
            self._capture.batch = None
        _check_default_loss_options(call.options, self.loss_kind)
        return self.step_on_batch(batch.inputs, call.target)

    def close(self) -> None:
        """Remove the hook this optimizer put on the model."""
        self._capture.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the base optimizer's (momentum buffers...) and the state of
        the method's random generator."""
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        gen = getattr(self, "_gen", None)
        if gen is not None:
            sd["generator_state"] = gen.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        if "base_optimizer" not in sd:
            raise ValueError(f"not a {type(self).__name__} state dict (no 'base_optimizer')")
        base = sd.pop("base_optimizer")
        gen_state = sd.pop("generator_state", None)
        super().load_state_dict(sd)
        self.base_optimizer.load_state_dict(base)
        self.param_groups = self.base_optimizer.param_groups
        gen = getattr(self, "_gen", None)
        if gen is not None and gen_state is not None:
            gen.set_state(gen_state)


def _check_default_loss_options(options: dict, kind: str) -> None:
    bad = {}
    if options.get("weight") is not None:
        bad["weight"] = "a tensor"
    if options.get("reduction", "mean") != "mean":
        bad["reduction"] = options["reduction"]
    if float(options.get("label_smoothing", 0.0) or 0.0) != 0.0:
        bad["label_smoothing"] = options["label_smoothing"]
    if bad:
        raise LossCaptureError(
            f"the drop-in step evaluates the plain mean {kind} loss, but the training loop used "
            f"{bad}; use step_on_batch with matching targets, or the closure (SAM, weight noise)")


def _norm(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors.values()))


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def _make_generator(seed: int | None, params: list[torch.Tensor]) -> torch.Generator:
    device = params[0].device if params else torch.device("cpu")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ============================================================================ SAM / PSAM
class _Ascent(SharpnessOptimizer):
    """SAM and PSAM: the ascent ``ε_p = ρ_p g_p/‖g‖``."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], rho: float = 0.05, *,
                 base: str | type = "gnrev.sgd", base_kwargs: Mapping | None = None,
                 ablate_nme: bool = False, model: nn.Module | None = None,
                 loss: str = "cross_entropy", **base_options: Any) -> None:
        _check_number("rho", rho)
        super().__init__(params, dict(rho=rho, ablate_nme=ablate_nme), base=base,
                         base_kwargs=base_kwargs, model=model, loss=loss,
                         base_options=base_options)
        for g in self.param_groups:
            self._validate_group(g)

    def _validate_group(self, group: dict) -> None:
        _check_number("rho", group["rho"])

    def _ascent(self, g: Params) -> tuple[Params, torch.Tensor]:
        gnorm = _norm(g)
        inv = torch.where(gnorm > 0, 1.0 / gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny),
                          torch.zeros_like(gnorm))
        rho = self._per_param("rho")
        return {n: rho[n] * inv * t for n, t in g.items()}, gnorm


class SAM(_Ascent):
    r"""Sharpness-aware minimisation (Foret et al.), one ascent step.

    ``ε = ρ ĝ``, ``d = ∇L(θ + ε)``; the base steps from ``d`` at ``θ``. Cost: 2 gradients.

    With ``ablate_nme=True`` the gradient at ``θ + ε`` is that of the model whose activations are
    frozen at first order around ``θ`` (module docstring), ``∇L + ρ H_abl ĝ + O(ρ²)``.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        rho: ``ρ ≥ 0``, the radius of the ascent step.
        base: the base optimizer: a registry name (default ``"gnrev.sgd"``) or a
            ``torch.optim.Optimizer`` subclass.
        base_kwargs, base_options: the base's options (``lr=0.1``, ``momentum=0.9``...), as a
            dict or as keywords; they live in the shared ``param_groups``.
        ablate_nme: remove ``φ''`` from the perturbed gradient's second-order part.
        model, loss: the model and ``"cross_entropy"``/``"mse"`` (runners pass both).

    ``step(closure)`` with the usual SAM closure (zero grads, forward, backward, return loss)
    works for any loss: it calls the closure at ``θ`` (for ``∇L(θ)``; gradients already present
    are ignored) and at ``θ + ε``, restores ``θ`` and steps the base from ``∇L(θ + ε)``; it
    returns the loss at ``θ``. Without a closure it is the drop-in step on the captured batch
    (module docstring).
    """

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        g, loss = grad_and_value(self._loss)(theta, x, y)
        eps, gnorm = self._ascent(g)
        d = grad(self._loss_with(records))({n: theta[n] + eps[n] for n in theta}, x, y)
        self.last_step_info = {"loss": float(loss), "grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        return loss, d

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if closure is None:
            return super().step()
        if self._option("ablate_nme"):
            raise ValueError("SAM(ablate_nme=True) cannot linearise the activations through a "
                             "closure; call step() after loss.backward() (drop-in) or "
                             "step_on_batch(x, y)")
        params = self._params()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        g = {self._names[id(p)]: (p.grad if p.grad is not None else torch.zeros_like(p))
             for p in params}
        eps, gnorm = self._ascent(g)
        saved = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.add_(eps[self._names[id(p)]])
            with torch.enable_grad():
                closure()
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            self._capture.batch = None
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.last_step_info = {"grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        self.base_optimizer.step()
        return loss


class PSAM(_Ascent):
    r"""Penalty SAM, the gradient-norm penalty ``L + ρ‖∇L‖``: ``d = ∇L + ρ H ĝ``.

    The first-order Taylor expansion of SAM's ``∇L(θ + ρĝ)``; ``H ĝ`` is one Hessian-vector
    product (``torch.func.jvp`` of ``torch.func.grad``), so the NME enters:
    ``H ĝ = G ĝ + NME ĝ``. Cost: 1 gradient + 1 HVP. With ``ablate_nme=True``:
    ``d = ∇L + ρ H_abl ĝ``, the φ''-free HVP (equal to ``H ĝ`` for ReLU).

    Args: as :class:`SAM`. ``step()`` is the drop-in step (a ``closure``, if given, is called
    first and its batch used).
    """

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        g, loss = grad_and_value(self._loss)(theta, x, y)
        eps, gnorm = self._ascent(g)
        loss_fn = self._loss_with(records)
        _, h_eps = jvp(lambda t: grad(loss_fn)(t, x, y), (theta,), (eps,))
        self.last_step_info = {"loss": float(loss), "grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        return loss, {n: g[n] + h_eps[n] for n in g}


# ============================================================================ noise family
class _Noisy(SharpnessOptimizer):
    """Weight noise and the trace penalties: ``σ²`` per group, ``samples``, a seeded generator."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], sigma2: float = 1e-4, *,
                 samples: int = 1, base: str | type = "gnrev.sgd",
                 base_kwargs: Mapping | None = None, ablate_nme: bool = False,
                 seed: int | None = None, model: nn.Module | None = None,
                 loss: str = "cross_entropy", method_options: Mapping | None = None,
                 **base_options: Any) -> None:
        _check_number("sigma2", sigma2)
        _check_int("samples", samples)
        super().__init__(params, dict(sigma2=sigma2, samples=samples, ablate_nme=ablate_nme,
                                      **dict(method_options or {})),
                         base=base, base_kwargs=base_kwargs, model=model, loss=loss,
                         base_options=base_options)
        for g in self.param_groups:
            self._validate_group(g)
        self._gen = _make_generator(seed, self._params())

    def _validate_group(self, group: dict) -> None:
        _check_number("sigma2", group["sigma2"])
        _check_int("samples", group["samples"])

    def _std(self) -> dict[str, float]:
        return {n: math.sqrt(s) for n, s in self._per_param("sigma2").items()}

    def _normal_like(self, theta: Params, scale: Mapping[str, float], k: int | None = None
                     ) -> Params:
        """``scale_p · ξ_p``, ``ξ ∼ N(0, I)`` (with a leading dimension ``k`` if given)."""
        out = {}
        for n, t in theta.items():
            shape = t.shape if k is None else (k, *t.shape)
            out[n] = scale[n] * torch.randn(shape, generator=self._gen, device=t.device,
                                            dtype=t.dtype)
        return out


class WeightNoise(_Noisy):
    r"""Training with Gaussian weight noise: ``d = (1/k) Σ_j ∇L(θ + ε_j)``, ``ε_j ∼ N(0, σ²I)``.

    The objective is ``E_ε L(θ+ε) = L + (σ²/2) tr H + O(σ⁴)`` (Bishop's expansion, which keeps
    the NME). ``sigma2`` is the variance ``σ²`` (the noise's standard deviation is ``√σ²``).
    Cost: ``k`` gradients plus one forward for ``L(θ)``.

    Args:
        params: parameters or groups (a group may set its own ``sigma2``).
        sigma2: ``σ² ≥ 0``.
        samples: ``k`` noise draws averaged per step (the paper: 1).
        seed: seed of the optimizer's own ``torch.Generator`` (``None``: drawn from torch's
            global RNG); its state is in :meth:`state_dict`.
        base, base_kwargs, base_options, ablate_nme, model, loss: as :class:`SAM`.

    ``step(closure)`` with a SAM-style closure (any loss) perturbs ``θ`` in place, calls the
    closure, restores ``θ`` and steps the base; it returns the closure's loss at ``θ + ε``.
    """

    def sample_perturbation(self) -> Params:
        """One draw ``ε ∼ N(0, Σ)``, ``Σ = diag(σ_p² I)``, from the optimizer's generator."""
        return self._normal_like(self._theta(), self._std())

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        out, records = self._records(x)
        loss = self._criterion(out, y)
        loss_fn = self._loss_with(records)
        k = self._option("samples")
        d = {n: torch.zeros_like(t) for n, t in theta.items()}
        eps_all = []
        for _ in range(k):
            eps = self.sample_perturbation()
            eps_all.append(eps)
            gk = grad(loss_fn)({n: theta[n] + eps[n] for n in theta}, x, y)
            for n in d:
                d[n] += gk[n] / k
        self.last_step_info = {"loss": float(loss)}
        self.last_probes = {"epsilon": eps_all}
        return loss, d

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if closure is None:
            return super().step()
        if self._option("ablate_nme"):
            raise ValueError("WeightNoise(ablate_nme=True) cannot linearise the activations "
                             "through a closure; call step() after loss.backward() (drop-in) or "
                             "step_on_batch(x, y)")
        params = self._params()
        k = self._option("samples")
        acc = [torch.zeros_like(p) for p in params]
        saved = [p.detach().clone() for p in params]
        eps_all, loss = [], None
        try:
            for _ in range(k):
                eps = self.sample_perturbation()
                eps_all.append(eps)
                for p in params:
                    p.add_(eps[self._names[id(p)]])
                with torch.enable_grad():
                    loss = closure()
                for a, p, s in zip(acc, params, saved, strict=True):
                    if p.grad is not None:
                        a.add_(p.grad, alpha=1.0 / k)
                    p.copy_(s)
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            self._capture.batch = None
        for p, a in zip(params, acc, strict=True):
            p.grad = a
        self.last_probes = {"epsilon": eps_all}
        self.base_optimizer.step()
        return loss


class HessianTracePenalty(_Noisy):
    r"""The Hessian-trace penalty ``L + (σ²/2) tr H`` with Hutchinson's estimator.

    ``d = ∇_θ[L(θ) + ½ (1/k) Σ_i v_iᵀ H(θ) v_i]`` with ``v_i = σ z_i`` held fixed, ``z_i ∼ N(0, I)``
    (``probes="gaussian"``, the paper's) or Rademacher; ``E_z zᵀHz = tr H``, so
    ``E d = ∇L + (σ²/2) ∇ tr H``. Each ``vᵀHv`` is ``⟨v, jvp(grad L)(θ; v)⟩`` (``torch.func``),
    vectorised over the ``k`` probes with ``vmap`` and differentiated once more. Cost: ``k`` HVPs
    and their gradient. The paper uses ``k = 1`` (and 5 in a follow-up).

    With ``ablate_nme=True`` the penalty is ``(σ²/2) tr H_abl`` (``φ'' = 0`` at ``θ``) and its
    gradient drops ``φ''`` and ``φ'''``.

    Args: as :class:`WeightNoise`, plus ``probes``: ``"gaussian"`` or ``"rademacher"``.
    ``step()`` is the drop-in step (a ``closure``, if given, is called first).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], sigma2: float = 1e-4, *,
                 samples: int = 1, probes: str = "gaussian", base: str | type = "gnrev.sgd",
                 base_kwargs: Mapping | None = None, ablate_nme: bool = False,
                 seed: int | None = None, model: nn.Module | None = None,
                 loss: str = "cross_entropy", **base_options: Any) -> None:
        if probes not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, got {probes!r}")
        super().__init__(params, sigma2, samples=samples, base=base, base_kwargs=base_kwargs,
                         ablate_nme=ablate_nme, seed=seed, model=model, loss=loss,
                         method_options={"probes": probes}, **base_options)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if group["probes"] not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, got {group['probes']!r}")

    def sample_probes(self, k: int) -> Params:
        """``k`` unit-variance probes ``z`` (leading dimension ``k``), from the generator."""
        theta = self._theta()
        z = self._normal_like(theta, {n: 1.0 for n in theta}, k)
        if self._option("probes") == "rademacher":
            z = {n: torch.where(t >= 0, 1.0, -1.0).to(t.dtype) for n, t in z.items()}
        return z

    def _quadratic_forms(self, loss_fn: Callable, theta: Params, x: torch.Tensor,
                         y: torch.Tensor, v: Params) -> torch.Tensor:
        """``(v_iᵀ H(θ) v_i)_i`` for the stacked probes ``v``."""
        def one(vi: Params) -> torch.Tensor:
            _, hv = jvp(lambda t: grad(loss_fn)(t, x, y), (theta,), (vi,))
            return _dot(vi, hv)

        return vmap(one)(v)

    def hessian_trace_samples(self, x: torch.Tensor, y: torch.Tensor, num: int) -> torch.Tensor:
        """``num`` independent Hutchinson terms ``z_iᵀ H z_i`` (``H_abl`` with ``ablate_nme``),
        each unbiased for ``tr H``, with the probes this optimizer draws."""
        self._check_batch(x, y)
        _check_int("num", num)
        self._sync_linearisation()
        with torch.no_grad(), suspended(), self._maybe_linearised():
            records = self._records(x)[1]
            return self._quadratic_forms(self._loss_with(records), self._theta(), x, y,
                                         self.sample_probes(num)).detach()

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        k = self._option("samples")
        std = self._std()
        z = self.sample_probes(k)
        v = {n: std[n] * t for n, t in z.items()}
        penalised = self._loss_with(records)

        def total(t: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            loss = self._loss(t, x, y)
            if all(s == 0 for s in std.values()):
                pen = torch.zeros_like(loss)
            else:
                pen = 0.5 * self._quadratic_forms(penalised, t, x, y, v).mean()
            return loss + pen, (loss, pen)

        d, (loss, pen) = grad(total, has_aux=True)(theta)
        self.last_step_info = {"loss": float(loss), "penalty": float(pen)}
        s2 = set(self._per_param("sigma2").values())
        if len(s2) == 1 and (s := s2.pop()) > 0:
            self.last_step_info["hessian_trace_estimate"] = float(2 * pen / s)
        self.last_probes = {"probes": z}
        return loss, d


class GNTracePenalty(_Noisy):
    r"""The Gauss-Newton-trace penalty ``L + (σ²/2) tr G`` with sampled labels.

    ``d = ∇_θ[L(θ) + ½ (1/k) Σ_j (1/B) Σ_n ‖Σ^{1/2} ∇_θ ℓ(z_n(θ), ŷ_{n,j})‖²]``, ``Σ = σ² I``, with the
    labels ``ŷ`` drawn at ``θ`` and held fixed: ``ŷ ∼ Cat(softmax z_n)`` for cross-entropy,
    ``ŷ = z_n + √(C/2) ξ`` for MSE (module docstring); ``E_ŷ (1/B) Σ_n ‖∇ℓ(z_n, ŷ_n)‖² = tr G``.
    This is the weight-noise expansion with the NME dropped. Per-example gradients come from
    ``vmap(grad)``. Cost: ``k`` per-example gradient passes and their gradient; no HVP. The paper
    uses one sampled label per example (``samples=1``).

    With ``ablate_nme=True`` the penalty's value is unchanged (``G`` has no ``φ''``) and its
    gradient drops ``φ''``.

    Args: as :class:`WeightNoise`. ``step()`` is the drop-in step.
    """

    def sample_labels(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` sampled targets per example from the model's predictive distribution at logits
        ``z``: ``(k, B)`` class indices (cross-entropy) or ``(k, B, C)`` (MSE)."""
        z = z.detach()
        if self.loss_kind == "cross_entropy":
            probs = torch.softmax(z.double(), dim=1)
            return torch.multinomial(probs, k, replacement=True, generator=self._gen).T.contiguous()
        noise = torch.randn((k, *z.shape), generator=self._gen, device=z.device, dtype=z.dtype)
        return z + math.sqrt(z.shape[1] / 2.0) * noise

    def _per_example_terms(self, theta: Params, x: torch.Tensor, labels: torch.Tensor,
                           records: list[Record] | None, weight: Mapping[str, float]
                           ) -> torch.Tensor:
        """``((1/B) Σ_n Σ_p w_p ‖∇_p ℓ(z_n, ŷ_{n,j})‖²)_j`` for the ``k`` label sets ``labels``,
        with the activations linearised at ``records`` (per-example slices) when given."""
        lin = self._linearisation

        def single(t: Params, xn: torch.Tensor, yn: torch.Tensor, rec: Any) -> torch.Tensor:
            if rec is None:
                return self._loss(t, xn.unsqueeze(0), yn.unsqueeze(0))
            lin.use(rec)
            try:
                return self._loss(t, xn.unsqueeze(0), yn.unsqueeze(0))
            finally:
                lin.use(None)

        per_example = vmap(grad(single), in_dims=(None, 0, 0, None if records is None else 0))

        def one_set(yj: torch.Tensor) -> torch.Tensor:
            per = per_example(theta, x, yj, records)
            return sum(weight[n] * (t * t).sum() for n, t in per.items()) / len(x)

        return vmap(one_set)(labels)

    def gn_trace_samples(self, x: torch.Tensor, y: torch.Tensor, num: int) -> torch.Tensor:
        """``num`` independent estimates ``(1/B) Σ_n ‖∇_θ ℓ(z_n, ŷ_n)‖²`` (one label per example
        each), drawn as the penalty draws them; each is unbiased for ``tr G``. ``y`` is only
        checked (the labels are sampled)."""
        self._check_batch(x, y)
        _check_int("num", num)
        with torch.no_grad(), suspended():
            z = self.model(x)
            labels = self.sample_labels(z, num)
            theta = self._theta()
            return self._per_example_terms(theta, x, labels, None,
                                           {n: 1.0 for n in theta}).detach()

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        z, records = self._records(x)
        k = self._option("samples")
        labels = self.sample_labels(z, k)
        sigma2 = self._per_param("sigma2")

        def total(t: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            loss = self._loss(t, x, y)
            if all(s == 0 for s in sigma2.values()):
                pen = torch.zeros_like(loss)
            else:
                pen = 0.5 * self._per_example_terms(t, x, labels, records, sigma2).mean()
            return loss + pen, (loss, pen)

        d, (loss, pen) = grad(total, has_aux=True)(theta)
        self.last_step_info = {"loss": float(loss), "penalty": float(pen)}
        s2 = set(sigma2.values())
        if len(s2) == 1 and (s := s2.pop()) > 0:
            self.last_step_info["gn_trace_estimate"] = float(2 * pen / s)
        self.last_probes = {"labels": labels}
        return loss, d
