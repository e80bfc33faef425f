"""The device trap's own check (``tests/device_trap.py``): each kind of device bug is caught,
its fix passes."""

from __future__ import annotations

import pytest
import torch
from device_trap import (
    DeviceLeak,
    device_trap,
)


def test_the_trap_catches_each_kind_of_device_bug_and_passes_the_fixes():
    """The trap's own check, each bug beside its fix: a constructor without a device meeting the
    data (also through ``@``, which torch alone lets through with garbage), a CPU generator's
    draw used without moving it, ``.cpu()`` / ``.to("cpu")`` results meeting the data,
    ``.numpy()`` of data."""
    X = torch.randn(3, 3, dtype=torch.float64)
    with device_trap():
        with pytest.raises(DeviceLeak):
            torch.kron(X, torch.eye(2, dtype=X.dtype))
        with pytest.raises(DeviceLeak):
            X @ torch.eye(3, dtype=X.dtype)
        assert torch.equal(X @ torch.eye(3, dtype=X.dtype, device=X.device), X)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(3, 3, generator=gen, dtype=X.dtype)
        with pytest.raises(DeviceLeak):
            X + noise.mean(0)                       # host-derived, not moved
        assert (X + noise.mean(0).to(X.device)).shape == (3, 3)
        with pytest.raises(DeviceLeak):
            X - X.cpu()
        with pytest.raises(DeviceLeak):
            X - torch.ones(3, dtype=X.dtype, device="cpu")
        with pytest.raises(DeviceLeak):
            X.sum(0).to("cpu") * X
        assert float((X * X.sum().cpu()).sum()) == float((X * X.sum()).sum())  # CPU scalar: ok
        with pytest.raises(DeviceLeak):
            X.numpy()
        assert X.cpu().numpy().shape == (3, 3)
