"""Drop-in support: see what an unmodified training loop does with the model output.

A benchmark runner calls ``opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()``
and never hands the optimizer ``x``, ``y`` or the loss. :class:`OutputCapture` recovers what the
Gauss-Newton step needs:

* a forward hook on the model stores the input ``x`` and the output ``F`` of the last forward
  pass run with autograd on (not inside ``torch.func`` transforms);
* the returned output is a thin tensor subclass whose ``__torch_function__`` records calls of
  :func:`torch.nn.functional.mse_loss` / :func:`~torch.nn.functional.cross_entropy` (which
  ``nn.MSELoss`` and ``nn.CrossEntropyLoss`` use) on it: the loss type, the target ``Y`` and the
  keyword options. Every other operation passes through and returns plain tensors;
* a tensor hook captures ``g = ∂ℓ/∂F`` during ``backward()``. The Newton target is computed from
  ``(F, Y)``; ``g`` proves that ``backward()`` ran and is checked to be, row by row, a non-negative
  multiple of the recorded loss's gradient direction (so an extra loss term on the output, which
  would change the Newton system, raises instead of being silently ignored).

**Mixed precision.** When the captured forward ran under an enabled :func:`torch.autocast` (bf16
on CPU, bf16/fp16 on CUDA; checked with ``torch.is_autocast_enabled(device_type)`` for the
output's device), its output and activations are in the autocast dtype and are *not* used to build
the Gauss-Newton system. Instead :attr:`CapturedBatch.output` and :attr:`CapturedBatch.extra` are
recomputed on first access by one forward pass of the eager model on the captured inputs (cast to
the parameter dtype), with autocast disabled and without autograd. So the step computes exactly the
Gauss-Newton step of the parameter-dtype model on the same batch (bitwise the step of the same loop
without autocast, for a deterministic forward), at the cost of one extra forward pass. The gradient
check uses the autocast output as the loss saw it, with a tolerance widened to the rounding of
``g`` in the autocast dtype (see :meth:`OutputCapture._check_gradient`).

**torch.compile.** ``torch.compile(model)`` returns a wrapper (``OptimizedModule``) whose own
``__call__`` and hooks run eagerly and whose compiled region runs ``model.__call__``, *including
model's forward hooks*: Dynamo inlines them into the graph for ``torch.nn`` containers such as
``nn.Sequential`` (and then ignores hooks added after the wrapper's first call) and compiles them
as frames of their own for user-defined modules such as the RevMLP. The capture therefore

* hooks the compiled wrappers of the model it knows when it is built (the one it is given, and
  those the optimizer's discovery scan saw, see
  :func:`~gnrev_plugin.nn.discovery.compiled_wrappers_of`): their hooks run eagerly, outside the
  graph, and record the call (``fullgraph=True`` works);
* makes the model's own hook a no-op while Dynamo traces it on behalf of such a wrapper (so it
  leaves no graph break), and otherwise (a wrapper created after the optimizer,
  ``model.compile()`` in place) has Dynamo call the recording part eagerly through
  ``torch.compiler.disable``: one graph break at the end of the forward (not allowed with
  ``fullgraph=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compat.torch import (
    DisableTorchFunctionSubclass,
    compiled_module_type,
    functorch_transforms_active,
    is_functorch_wrapped_tensor,
)
from ..nn.discovery import compiled_wrappers_of, unwrap_compiled
from .errors import LossCaptureError
from .targets import loss_gradient_direction

__all__ = ["OutputCapture", "CapturedBatch", "suspended", "autocast_dtype", "autocast_disabled"]

_SUSPENDED = 0


class suspended:  # noqa: N801 - used as a context manager like torch.no_grad
    """Within this context no :class:`OutputCapture` records anything (internal forward passes)."""

    def __enter__(self) -> None:
        global _SUSPENDED
        _SUSPENDED += 1

    def __exit__(self, *exc) -> None:
        global _SUSPENDED
        _SUSPENDED -= 1

_LOSS_FUNCTIONS = {F.mse_loss: "mse", F.cross_entropy: "cross_entropy"}


@dataclass
class LossCall:
    """One recorded loss call on the model output: its kind, target ``Y`` and keyword options.

    Attributes:
        kind: ``"cross_entropy"`` or ``"mse"``.
        target: The target :math:`Y` the loss was called with.
        options: The loss's keyword options (e.g. ``label_smoothing``).
    """

    kind: str
    target: torch.Tensor
    options: dict


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the :func:`torch.autocast` region enabled for ``device_type`` here, or
    ``None`` outside autocast.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ...

    Returns:
        The autocast dtype, or ``None``.
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class autocast_disabled:  # noqa: N801 - used as a context manager like torch.no_grad
    """Within this context :func:`torch.autocast` is off for CPU and for the device type of
    ``module``'s parameters, so a Gauss-Newton step called inside an autocast region still builds
    and solves its systems in their stated dtypes (not in the autocast dtype).

    Args:
        module: The model whose parameters' device type is covered.
    """

    def __init__(self, module: nn.Module) -> None:
        first = next(iter(module.parameters()), None)
        kinds = {"cpu"} if first is None else {"cpu", first.device.type}
        self._kinds = sorted(k for k in kinds if torch.amp.is_autocast_available(k))
        self._stack = ExitStack()

    def __enter__(self) -> None:
        for kind in self._kinds:
            self._stack.enter_context(torch.autocast(kind, enabled=False))

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)


class CapturedBatch:
    """What one forward/backward of the training loop left for the step.

    Attributes:
        captured_output: the model output ``F`` as the loss saw it (detached; in the autocast
            dtype when the forward ran under autocast).
        autocast: the autocast dtype of the captured forward, or ``None``.
        losses: the recorded loss calls; ``grad``: ``g = ∂ℓ/∂F`` summed over ``backward`` calls.

    ``inputs``, ``output`` and ``extra`` (e.g. the RevMLP's block activations) are the forward
    pass's in the parameter dtype: without autocast, the captured ones; under autocast, recomputed
    once on first access of ``output``/``extra`` (module docstring), with ``inputs`` cast to the
    parameter dtype.
    """

    def __init__(self, inputs: torch.Tensor, output: torch.Tensor, extra: object = None, *,
                 autocast: torch.dtype | None = None,
                 recompute: Callable[[torch.Tensor], tuple[torch.Tensor, object]] | None = None,
                 param_dtype: torch.dtype | None = None) -> None:
        self.captured_output = output
        self.autocast = autocast
        self.losses: list[LossCall] = []
        self.grad: torch.Tensor | None = None
        if autocast is not None and recompute is None:
            raise ValueError("a batch captured under autocast needs a recompute function")
        if (autocast is not None and param_dtype is not None and inputs.is_floating_point()
                and inputs.dtype != param_dtype):
            inputs = inputs.to(param_dtype)
        self._inputs = inputs
        self._recompute = recompute if autocast is not None else None
        self._output, self._extra = output, extra

    @property
    def inputs(self) -> torch.Tensor:
        """The model input ``X`` (detached; under autocast in the parameter dtype).

        Returns:
            :math:`X`.
        """
        return self._inputs

    def _resolve(self) -> None:
        if self._recompute is not None:
            recompute, self._recompute = self._recompute, None
            self._output, self._extra = recompute(self._inputs)

    @property
    def output(self) -> torch.Tensor:
        """``F`` in the parameter dtype (recomputed without autocast if it ran under it).

        Returns:
            :math:`F`.
        """
        self._resolve()
        return self._output

    @property
    def extra(self) -> object:
        """What ``extra(module)`` returned after the (re)computed forward pass.

        Returns:
            The extra forward data (e.g. the RevMLP's block activations).
        """
        self._resolve()
        return self._extra


#: Ops whose result is the same values as their first argument (kept probed).
_ALIASES = {torch.Tensor.view_as}


class _ProbedOutput(torch.Tensor):
    """The model output, marked so that loss calls on it are recorded."""

    _gnrev_capture: OutputCapture | None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _LOSS_FUNCTIONS.get(func)
        if kind is not None and args:
            probe = next((a for a in args[:2] if isinstance(a, _ProbedOutput)), None)
            other = next((a for a in args[:2] if a is not probe), kwargs.get("target"))
            cap = getattr(probe, "_gnrev_capture", None)
            if cap is not None and isinstance(other, torch.Tensor):
                cap._record_loss(LossCall(kind, other.detach(), dict(kwargs)))
        with DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _ALIASES and args and isinstance(args[0], _ProbedOutput) \
                and isinstance(out, torch.Tensor):
            # An alias of the output is still the output: a module's full backward hook (BackPACK's
            # ``extend``, hence Cockpit) routes it through an autograd Function whose identity
            # outputs are ``view_as`` aliases; the loss is then applied to the alias.
            alias = out.as_subclass(_ProbedOutput)
            alias._gnrev_capture = args[0]._gnrev_capture
            return alias
        return out


class OutputCapture:
    """Forward hook + loss probe + gradient hook on ``model`` (see the module docstring).

    Args:
        model: the module whose output the loss is applied to, or a ``torch.compile`` wrapper of
            it (the hooks go on the eager module, on that wrapper and on the wrappers the last
            discovery scan saw).
        extra: optional callable ``extra(module)`` evaluated right after each captured forward
            (e.g. to pick up a RevMLP's recorded activations); ``module`` is the eager module.
    """

    def __init__(self, model: nn.Module, extra=None) -> None:
        self.model = unwrap_compiled(model)
        self._extra = extra
        self.batch: CapturedBatch | None = None
        #: > 0 while a hooked compiled wrapper runs (its eager hooks record the call)
        self._in_wrapper = 0
        #: the recording part behind ``torch.compiler.disable`` (built now if Dynamo is loaded,
        #: else the first time Dynamo traces the hook, which it can only do once loaded)
        self._eager_record = (torch.compiler.disable(self._record)
                              if compiled_module_type() is not None else None)
        self._handles = [self.model.register_forward_hook(self._forward_hook)]
        wrappers = compiled_wrappers_of(self.model)
        if model is not self.model and not any(w is model for w in wrappers):
            wrappers.append(model)
        for wrapper in wrappers:
            self._handles += [
                wrapper.register_forward_pre_hook(self._enter_wrapper),
                wrapper.register_forward_hook(self._wrapper_hook, always_call=True)]

    def __getstate__(self) -> dict:
        # Saving a model pickles its hooks, hence this object; the Dynamo wrapper is rebuilt.
        return {**self.__dict__, "_eager_record": None}

    def close(self) -> None:
        """Remove the hooks.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ------------------------------------------------------------------------------
    def _enter_wrapper(self, module, args) -> None:
        self._in_wrapper += 1

    def _wrapper_hook(self, module, args, output):
        """Eager hook of a compiled wrapper: record the call its compiled region just ran."""
        self._in_wrapper -= 1
        if getattr(output, "_gnrev_capture", None) is self:   # the model's own hook recorded it
            return None
        return self._record(module, args, output)

    def _forward_hook(self, module, args, output):
        """The model's own hook. Dynamo traces it when a compiled region runs the model: then it
        is a no-op inside a hooked wrapper (whose eager hook records), else the recording runs
        eagerly behind one graph break."""
        if torch.compiler.is_compiling():
            if self._in_wrapper:
                return None
            if self._eager_record is None:
                self._eager_record = torch.compiler.disable(self._record)
            return self._eager_record(module, args, output)
        return self._record(module, args, output)

    def _record(self, module, args, output):
        if (_SUSPENDED or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled()
                or not output.requires_grad or functorch_transforms_active()
                or is_functorch_wrapped_tensor(output) or not args
                or not isinstance(args[0], torch.Tensor)):
            return None
        amp = autocast_dtype(output.device.type)
        if amp is None:
            batch = CapturedBatch(args[0].detach(), output.detach(),
                                  self._extra(self.model) if self._extra else None)
        else:
            batch = CapturedBatch(args[0].detach(), output.detach(), autocast=amp,
                                  recompute=self._recompute, param_dtype=self._param_dtype())
        self.batch = batch

        def grad_hook(g: torch.Tensor) -> None:
            if _SUSPENDED or is_functorch_wrapped_tensor(g):
                return  # a batched / internal backward, not the training loop's
            batch.grad = g.detach() if batch.grad is None else batch.grad + g.detach()

        output.register_hook(grad_hook)
        probe = output.as_subclass(_ProbedOutput)
        probe._gnrev_capture = self
        return probe

    def _param_dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)

    def _recompute(self, inputs: torch.Tensor) -> tuple[torch.Tensor, object]:
        """``F`` and ``extra`` of the eager model on ``inputs`` in the parameter dtype: autocast
        disabled, no autograd, nothing captured."""
        with suspended(), torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
            out = self.model(inputs)
            extra = self._extra(self.model) if self._extra else None
        return out.detach(), extra

    def _record_loss(self, call: LossCall) -> None:
        if self.batch is not None:
            self.batch.losses.append(call)

    # -- consumption ------------------------------------------------------------------------
    def consume(self, expected_kind: str) -> tuple[CapturedBatch, LossCall]:
        """Return the captured batch and its loss call, and clear the capture.

        Raises:
            LossCaptureError: the step runs inside an enabled ``torch.autocast`` region, no
                forward/backward was captured, the loss is not the expected kind,
                several different losses were applied, or the gradient at the output is not the
                recorded loss's.

        Args:
            expected_kind: The loss the optimizer was configured with.

        Returns:
            ``(batch, loss_call)``.
        """
        batch, self.batch = self.batch, None
        amp = None if batch is None else autocast_dtype(batch.captured_output.device.type)
        if amp is not None:
            raise LossCaptureError(
                f"opt.step() was called inside torch.autocast({amp}): the Gauss-Newton system "
                "must not be built in the autocast dtype. Leave the autocast region before "
                "opt.step() (autocast only the forward pass and the loss, as with torch.amp)")
        if batch is None:
            raise LossCaptureError(
                "no forward pass of the model was captured: call model(x) with autograd enabled, "
                "then loss.backward(), before opt.step() (or use opt.step_on_batch(x, y)). For a "
                "torch.compile'd model, build the optimizer after torch.compile(model), so that it "
                "can hook the compiled wrapper")
        if batch.grad is None:
            raise LossCaptureError("opt.step() was called before loss.backward(): the gradient "
                                   "of the loss at the model output was not captured")
        if not batch.losses:
            raise LossCaptureError(
                "no nn.MSELoss / nn.CrossEntropyLoss (F.mse_loss / F.cross_entropy) was applied "
                "directly to the model output, so the Gauss-Newton target is unknown; apply the "
                "loss to model(x) itself, or use opt.step_on_batch(x, y)")
        call = batch.losses[-1]
        for other in batch.losses[:-1]:
            if (other.kind != call.kind or other.target.shape != call.target.shape
                    or not torch.equal(other.target, call.target)):
                raise LossCaptureError("several different losses were applied to the same model "
                                       "output; the Gauss-Newton target is ambiguous")
        if call.kind != expected_kind:
            raise LossCaptureError(f"the optimizer was built for loss={expected_kind!r} but the "
                                   f"training loop applied {call.kind!r} to the model output")
        # Class weights (CE) scale each sample's g and H alike, so ε is unchanged.
        ignore = call.options.get("ignore_index", -100)
        if (call.kind == "cross_entropy" and not torch.is_floating_point(call.target)
                and bool((call.target == ignore).any())):
            raise LossCaptureError("targets equal to ignore_index are not supported by the exact "
                                   "Gauss-Newton step")
        self._check_gradient(batch, call)
        return batch, call

    @staticmethod
    def _check_gradient(batch: CapturedBatch, call: LossCall) -> None:
        """``g`` must be, row by row, a non-negative multiple of the recorded loss's direction
        ``d`` (:func:`~gnrev_plugin.optim.targets.loss_gradient_direction` at the output the loss
        saw): relative residual ``‖g − c⊙d‖/‖g‖ ≤ tol``.

        ``tol = 10·√eps`` of ``d``'s dtype (3.5e-3 float32, 1.5e-7 float64). Under autocast the
        losses run in float32 on the upcast output (autocast's float32 list), so ``d`` is formed
        in float32 from it and the only extra error is ``g``'s rounding to the autocast dtype on
        its way back, ``≤ eps/2`` per entry: ``tol = max(10·√eps_d, 4·eps_g)`` (3.1e-2 bfloat16,
        3.9e-3 float16).
        """
        ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
        out = batch.captured_output
        tol_floor = 0.0
        if batch.autocast is not None:
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            tol_floor = 4 * torch.finfo(batch.grad.dtype).eps
        d = loss_gradient_direction(call.kind, out, call.target, ls)
        g = batch.grad.to(d.dtype)
        if g.shape != d.shape:
            raise LossCaptureError(f"gradient of shape {tuple(g.shape)} at an output of shape "
                                   f"{tuple(d.shape)}")
        dd = (d * d).sum(1)
        c = torch.where(dd > 0, (g * d).sum(1) / dd.clamp_min(torch.finfo(d.dtype).tiny),
                        torch.zeros_like(dd))
        resid = (g - c[:, None] * d).norm() / g.norm().clamp_min(torch.finfo(d.dtype).tiny)
        tol = max(10 * torch.finfo(d.dtype).eps ** 0.5, tol_floor)
        if bool((c < 0).any()) or float(resid) > tol:
            raise LossCaptureError(
                "the gradient reaching the model output is not that of the recorded "
                f"{call.kind} loss alone (relative mismatch {float(resid):.2e}); extra terms on the "
                "output change the Gauss-Newton system. Use step_on_batch or DenseGN instead")
