"""The device trap shared by the ``test_device_*`` modules (tests/conftest.py puts ``tests/``
on ``sys.path``).

**Without a GPU: the device trap** (:class:`DeviceTrap`). The bug to catch is a tensor that a
GPU run would hold on the CPU — built without naming a device (``torch.eye(n)``: torch's default
device is the CPU), drawn from a CPU generator, made by ``.cpu()`` / ``.to("cpu")`` /
``device="cpu"`` — meeting the data. On a GPU that is a "tensors on different devices" error (or
a silent copy per call); on a CPU-only machine it is invisible, since the data *are* on the CPU.
The trap makes it visible without a GPU: a :class:`~torch.overrides.TorchFunctionMode` tags
every such tensor (and what is computed from tags alone) as *host* and everything else as
*data*, and raises :class:`DeviceLeak` when one torch call gets both (a 0-d host tensor is
allowed, as torch allows CPU scalars beside GPU tensors), or on ``.numpy()`` of data.
``x.to(X.device)`` turns a host tensor into data, as on a GPU. The value computed in the trap
must equal the value computed outside it. The convention this enforces: a constructor names its
device — the data's (``device=X.device``) or ``device="cpu"`` for a CPU-side draw whose values
then move with ``.to(X.device)`` (the same numbers on every device).

Blind spots (the ``cuda`` tests cover them): ``torch.device("cpu")`` objects cannot be told from
the data's device here; code that branches on ``device.type == "cpu"`` looks leaky; code run by
autograd hooks during ``backward()`` (BackPACK's extension rules) is outside any torch function
mode. Code that builds modules (``nn.Linear`` follows the default device by design) runs outside
the trap; only computations on built models and data run inside it.

Shared with the trap: ``CE``, ``_data``, ``_rev``, ``_mlp``, ``_model_for`` (the small models and data
every device test builds), ``_plain``/``_close`` (comparing nested results across devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gnrev_plugin.build import build_model

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ============================================================================ the device trap
class DeviceLeak(AssertionError):
    """A tensor that would be on another device than the data met the data."""


#: torch's factory functions (those ``torch.set_default_device`` redirects).
CONSTRUCTORS = frozenset(getattr(torch, n) for n in (
    "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace",
    "logspace", "ones", "rand", "randint", "randn", "randperm", "range", "scalar_tensor",
    "tensor", "tril_indices", "triu_indices", "zeros", "bartlett_window", "blackman_window",
    "hamming_window", "hann_window", "kaiser_window") if hasattr(torch, n))


def _host_string(device) -> bool:
    return isinstance(device, str) and torch.device(device).type == "cpu"


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class DeviceTrap(TorchFunctionMode):
    """Simulates data on an accelerator while everything runs on the CPU (module docstring).

    Two kinds of tensors: *data* (the model's and the inputs', and all that is computed from
    them) and *host* tensors, what a GPU run would hold on the CPU: built without naming a
    device (torch's default device, and a CPU generator's, is the CPU), built or moved with
    the string ``"cpu"`` (``device="cpu"``, ``.to("cpu")``), made by ``.cpu()``, and what is
    computed from host tensors alone. A call that mixes data with a host tensor of ≥ 1
    dimension (torch allows CPU scalars next to GPU tensors) raises :class:`DeviceLeak`, and so
    does ``.numpy()`` of data. A ``torch.device`` object or a
    tensor as the target (``device=X.device``, ``.to(X.device)``, ``.to(other)``) counts as the
    data's device: here it *is* the CPU, so the trap cannot tell ``torch.device("cpu")`` from
    it (a blind spot, not a false alarm).
    """

    def __init__(self) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref] = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, out) -> None:
        for t in _tensors(out):
            self._host[id(t)] = weakref.ref(t)

    def _unmark(self, out) -> None:
        for t in _tensors(out):
            self._host.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__qualname__", str(func))
        if func in CONSTRUCTORS and not _tensors(args):
            device = kwargs.get("device")
            out = func(*args, **kwargs)
            if device is None or _host_string(device):  # torch's default device: the CPU
                self._mark_host(out)
            return out
        tensors = _tensors((args, kwargs))
        host = [t for t in tensors if self._is_host(t)]
        data = [t for t in tensors if not self._is_host(t)]
        if data and any(t.dim() > 0 for t in host):
            raise DeviceLeak(f"{name} got a host tensor (built without naming its device, from a "
                             "CPU generator, or by 'cpu' / .cpu()) together with the data, "
                             "which would be on the accelerator")
        if func is torch.Tensor.numpy and data:
            raise DeviceLeak("numpy() of a tensor on the data's device (an accelerator tensor "
                             "has no numpy view; move it with .cpu() first)")
        out = func(*args, **kwargs)
        targets = [a for a in (*args[1:], kwargs.get("device"))
                   if isinstance(a, str | torch.device | torch.Tensor)]
        moves = func is torch.Tensor.cpu or (func is torch.Tensor.to and targets)
        if moves and out is args[0]:
            out = out.clone()  # a move between devices copies: the source keeps its kind
        if func is torch.Tensor.cpu or (moves and _host_string(targets[0])):
            self._mark_host(out)
        elif moves:
            self._unmark(out)  # moved to a named device: the data's (class docstring)
        elif host and not data:
            self._mark_host(out)
        return out


@contextlib.contextmanager
def device_trap() -> Iterator[None]:
    """Run the body in a :class:`DeviceTrap`."""
    with DeviceTrap():
        yield


def _plain(value) -> object:
    """A metric's value as nested Python floats/ints/strings (tensors moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().double().tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    return float(value)


def _close(a, b, rtol: float, atol: float, path: str = "") -> None:
    """``a`` and ``b`` (from :func:`_plain`) agree: same structure, numbers within
    ``|a − b| ≤ atol + rtol·|b|`` (NaN equals NaN)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b:
            _close(a[k], b[k], rtol, atol, f"{path}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(b, float):
        assert isinstance(a, float | int), path
        if math.isnan(b):
            assert math.isnan(a), path
        else:
            assert abs(a - b) <= atol + rtol * abs(b), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


CE = nn.CrossEntropyLoss()


def _data(device, n=6, d=8, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return X.to(device), y.to(device)


def _rev(device, seed=0, d=8, c=3):
    return build_model("gnrev.revmlp", dict(hidden=16, num_blocks=2, init_std=0.3),
                       in_features=d, num_classes=c, seed=seed).double().to(device)


def _mlp(device, seed=0, d=8, c=3):
    return build_model("gnrev.mlp", dict(hidden=[5], activation="tanh"), in_features=d,
                       num_classes=c, seed=seed).double().to(device)


def _model_for(name: str, device, seed=0):
    return (_mlp if name == "gnrev.dense_gn" else _rev)(device, seed=seed)
