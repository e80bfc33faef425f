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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..compat.torch import (
    DisableTorchFunctionSubclass,
    functorch_transforms_active,
    is_functorch_wrapped_tensor,
)
from .errors import LossCaptureError
from .targets import loss_gradient_direction

__all__ = ["OutputCapture", "CapturedBatch", "suspended"]

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
    kind: str
    target: torch.Tensor
    options: dict


@dataclass
class CapturedBatch:
    """What one forward/backward of the training loop left for the step."""

    inputs: torch.Tensor
    output: torch.Tensor
    extra: object = None  # e.g. the RevMLP's block activations of this forward
    losses: list[LossCall] = field(default_factory=list)
    grad: torch.Tensor | None = None


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
        model: the module whose output the loss is applied to.
        extra: optional callable ``extra(module)`` evaluated right after each captured forward
            (e.g. to pick up a RevMLP's recorded activations).
    """

    def __init__(self, model: nn.Module, extra=None) -> None:
        self.model = model
        self._extra = extra
        self.batch: CapturedBatch | None = None
        self._handle = model.register_forward_hook(self._forward_hook)

    def close(self) -> None:
        """Remove the forward hook."""
        self._handle.remove()

    # -- hooks ------------------------------------------------------------------------------
    def _forward_hook(self, module, args, output):
        if (_SUSPENDED or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled()
                or not output.requires_grad or functorch_transforms_active()
                or is_functorch_wrapped_tensor(output) or not args
                or not isinstance(args[0], torch.Tensor)):
            return None
        batch = CapturedBatch(args[0].detach(), output.detach(),
                              self._extra(module) if self._extra else None)
        self.batch = batch

        def grad_hook(g: torch.Tensor) -> None:
            if _SUSPENDED or is_functorch_wrapped_tensor(g):
                return  # a batched / internal backward, not the training loop's
            batch.grad = g.detach() if batch.grad is None else batch.grad + g.detach()

        output.register_hook(grad_hook)
        probe = output.as_subclass(_ProbedOutput)
        probe._gnrev_capture = self
        return probe

    def _record_loss(self, call: LossCall) -> None:
        if self.batch is not None:
            self.batch.losses.append(call)

    # -- consumption ------------------------------------------------------------------------
    def consume(self, expected_kind: str) -> tuple[CapturedBatch, LossCall]:
        """Return the captured batch and its loss call, and clear the capture.

        Raises:
            LossCaptureError: no forward/backward was captured, the loss is not the expected kind,
                several different losses were applied, or the gradient at the output is not the
                recorded loss's.
        """
        batch, self.batch = self.batch, None
        if batch is None:
            raise LossCaptureError(
                "no forward pass of the model was captured: call model(x) with autograd enabled, "
                "then loss.backward(), before opt.step() (or use opt.step_on_batch(x, y))")
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
        ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
        d = loss_gradient_direction(call.kind, batch.output, call.target, ls)
        g = batch.grad.to(d.dtype)
        if g.shape != d.shape:
            raise LossCaptureError(f"gradient of shape {tuple(g.shape)} at an output of shape "
                                   f"{tuple(d.shape)}")
        dd = (d * d).sum(1)
        c = torch.where(dd > 0, (g * d).sum(1) / dd.clamp_min(torch.finfo(d.dtype).tiny),
                        torch.zeros_like(dd))
        resid = (g - c[:, None] * d).norm() / g.norm().clamp_min(torch.finfo(d.dtype).tiny)
        tol = 10 * torch.finfo(d.dtype).eps ** 0.5  # 3.5e-3 (float32), 1.5e-7 (float64)
        if bool((c < 0).any()) or float(resid) > tol:
            raise LossCaptureError(
                "the gradient reaching the model output is not that of the recorded "
                f"{call.kind} loss alone (relative mismatch {float(resid):.2e}); extra terms on the "
                "output change the Gauss-Newton system. Use step_on_batch or DenseGN instead")
