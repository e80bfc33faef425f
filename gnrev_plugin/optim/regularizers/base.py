"""The common machinery of the sharpness regularisers (:class:`SharpnessOptimizer`): the shared
``param_groups`` with a base optimizer, the batch loss, the drop-in step and the state dict."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ...nn.discovery import find_module_owning
from ..capture import OutputCapture, suspended
from ..errors import LossCaptureError, NonFiniteError
from ..protocols import BATCH_STEP
from ..targets import LOSSES
from ..validation import validate_batch
from .base_optimizer import BaseFactory, base_name, build_base
from .linearisation import ActivationLinearisation, Record

__all__ = ["SharpnessOptimizer", "Params", "check_number", "check_int", "norm", "dot",
           "make_generator"]

Params = dict[str, torch.Tensor]


def check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite number ``≥ 0`` (``> 0`` if ``positive``), or a ``ValueError`` naming ``name``.

    Args:
        name: the option's name.
        value: its value.
        positive: require ``> 0``.

    Returns:
        ``value`` as a float.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        what = "> 0" if positive else "≥ 0"
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any) -> int:
    """An integer ``≥ 1``, or a ``ValueError`` naming ``name``.

    Args:
        name: the option's name.
        value: its value.

    Returns:
        ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


class SharpnessOptimizer(torch.optim.Optimizer):
    r"""Common machinery of the five wrappers (see :mod:`gnrev_plugin.optim.regularizers`).

    It hands the base optimizer a direction ``d`` in place of the gradient,

    .. math::

        p.\mathrm{grad} \leftarrow d_p, \qquad \text{base.step()},

    and implements the batch-step protocol (:mod:`gnrev_plugin.optim.protocols`).

    Args:
        params: parameters (or parameter groups) to train; they must belong to ``model``.
        defaults: the method's hyperparameters (per group).
        base: the base optimizer: a ``torch.optim.Optimizer`` subclass (default
            ``torch.optim.SGD``) or a factory ``(param_groups, **options) -> Optimizer``;
            registry names (``"gnrev.sgd"``) are resolved by the registry, which builds the
            wrappers with its entry's defaults (``build_optimizer("gnrev.sam", ...)``).
        base_kwargs: the base's options (``lr``, ``momentum``...) as a dict; the wrappers also
            take them as plain keywords (``SAM(params, rho=0.05, lr=0.1, momentum=0.9)``),
            merged with ``base_kwargs`` (a key given both ways is an error). They end up in the
            shared ``param_groups``.
        base_options: the keywords just described (subclasses pass their ``**base_options``).
        model: the ``nn.Module`` the parameters belong to (found among live modules if omitted).
        loss: ``"cross_entropy"`` or ``"mse"`` (the batch loss ``L``); a model-wide group
            hyperparameter (``param_groups[i]["loss"]``).
    """

    capabilities = frozenset({BATCH_STEP})

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict, *,
                 base: BaseFactory = torch.optim.SGD, base_kwargs: Mapping | None = None,
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
        super().__init__(params, {**defaults, "loss": loss})
        self.base_optimizer = build_base(base, self.param_groups, base_kwargs)
        self.base_name = base_name(base)
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
        """Add a group to the wrapper and the base (both see the same dict).

        Args:
            param_group: A torch.optim param group.
        """
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        if param_group["loss"] not in LOSSES:
            raise ValueError(f"unsupported loss {param_group['loss']!r}; the sharpness wrappers "
                             f"support {LOSSES}")
        self.base_optimizer.add_param_group(param_group)
        self._validate_group(param_group)
        for p in param_group["params"]:
            name = {id(q): n for n, q in self.model.named_parameters()}.get(id(p))
            if name is None:
                raise ValueError("a parameter of the new group is not in the model")
            self._names[id(p)] = name

    def _validate_group(self, group: dict) -> None:
        """Check a group's hyperparameters (subclasses extend)."""

    @property
    def loss_kind(self) -> str:
        """The batch loss, ``"cross_entropy"`` or ``"mse"`` (the groups' ``loss``).

        Returns:
            The loss name.
        """
        return self._option("loss")

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
        :attr:`last_probes`).

        Args:
            x: Input batch.
            y: The loss's targets.

        Returns:
            ``(L(θ), {name: d})``.
        """
        self._check_batch(x, y)
        validate_batch(type(self).__name__, self.model, x, y, self.loss_kind)
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
        r"""One step on ``(x, y)`` (``y``: the loss's targets); returns ``L(θ)`` before the step.

        Args:
            x: Input batch.
            y: The loss's targets.

        Returns:
            :math:`L(\theta)` before the step.
        """
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
        r"""Drop-in step on the batch of the last ``loss = crit(model(x), y); loss.backward()``
        (``closure``, if given, is called first, torch.optim-style, and its batch is used).
        Returns the loss at ``θ`` before the step.

        Args:
            closure: torch.optim-style closure, or ``None``.

        Returns:
            :math:`L(\theta)` before the step.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        try:
            batch, call = self._capture.consume(self.loss_kind)
        finally:
            self._capture.batch = None
        check_default_loss_options(call.options, self.loss_kind)
        return self.step_on_batch(batch.inputs, call.target)

    def close(self) -> None:
        """Remove the hook this optimizer put on the model.
        """
        self._capture.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the base optimizer's (momentum buffers...) and the state of
        the method's random generator.

        Returns:
            The state dict (``"base_optimizer"`` and ``"generator_state"`` added).
        """
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        gen = getattr(self, "_gen", None)
        if gen is not None:
            sd["generator_state"] = gen.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the base optimizer's and the generator's state too).

        Args:
            state_dict: What :meth:`state_dict` returned.
        """
        sd = dict(state_dict)
        if "base_optimizer" not in sd:
            raise ValueError(f"not a {type(self).__name__} state dict (no 'base_optimizer')")
        base = sd.pop("base_optimizer")
        gen_state = sd.pop("generator_state", None)
        super().load_state_dict(sd)
        self.base_optimizer.load_state_dict(base)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:      # state dicts saved before an option was a group one
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        gen = getattr(self, "_gen", None)
        if gen is not None and gen_state is not None:
            gen.set_state(gen_state)


def check_default_loss_options(options: dict, kind: str) -> None:
    """Refuse a captured loss call with options the drop-in step does not evaluate (``weight``,
    a reduction other than ``mean``, label smoothing): a :class:`LossCaptureError`.

    Args:
        options: the loss call's keyword options.
        kind: ``"cross_entropy"`` or ``"mse"``.
    """
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


def norm(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""The Euclidean norm over all parameters, :math:`\lVert g\rVert = (\sum_p \lVert g_p\rVert^2)^{1/2}`.

    Args:
        tensors: one tensor per parameter name.

    Returns:
        A 0-dim tensor.
    """
    return torch.sqrt(sum((t * t).sum() for t in tensors.values()))


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""The inner product over all parameters, :math:`\langle a, b\rangle = \sum_p \langle a_p, b_p\rangle`.

    Args:
        a, b: one tensor per parameter name (``b`` has ``a``'s names).

    Returns:
        A 0-dim tensor.
    """
    return sum((a[n] * b[n]).sum() for n in a)


def make_generator(seed: int | None, params: list[torch.Tensor]) -> torch.Generator:
    """A ``torch.Generator`` on the parameters' device, seeded with ``seed`` (drawn from torch's
    global RNG when ``None``).

    Args:
        seed: an integer or ``None``.
        params: the parameters (their device).

    Returns:
        The generator.
    """
    device = params[0].device if params else torch.device("cpu")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


