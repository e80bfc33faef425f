"""Devices: two steps of every registered optimizer compute on the device of the model and data:
in the device trap on every machine, against the CPU on a GPU (``@pytest.mark.cuda``). The trap
is described in ``tests/device_trap.py``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from device_trap import (
    CE,
    CPU,
    CUDA,
    _close,
    _data,
    _model_for,
    _plain,
    device_trap,
)

from gnrev_plugin.build import build_optimizer
from gnrev_plugin.registry import get_registry
from gnrev_plugin.stepping import train_step


# ============================================================================ optimizer steps
def _optimizer_names() -> list[str]:
    return [n for n in get_registry().names("optimizer") if n.startswith("gnrev.")]


@pytest.mark.parametrize("name", _optimizer_names())
def test_optimizer_step_builds_no_tensor_on_the_default_device(name):
    """Two steps of every registered optimizer (GN family, sharpness regularisers, SGD, Adam)
    inside the trap give the parameters of two steps outside it."""
    X, y = _data(CPU)
    results = []
    for trapped in (False, True):
        model = _model_for(name, CPU)
        opt = build_optimizer(name, model, {}, loss="cross_entropy")
        with device_trap() if trapped else contextlib.nullcontext():
            for _ in range(2):
                train_step(opt, model, CE, X, y, reevaluate=False)
        if hasattr(opt, "close"):
            opt.close()
        results.append(_plain(list(model.parameters())))
    _close(results[1], results[0], rtol=1e-12, atol=0.0)


def _steps_on(name: str, device) -> list[torch.Tensor]:
    X, y = _data(device)
    model = _model_for(name, device)
    opt = build_optimizer(name, model, {}, loss="cross_entropy")
    for _ in range(2):
        train_step(opt, model, CE, X, y, reevaluate=False)
    if hasattr(opt, "close"):
        opt.close()
    return [p.detach() for p in model.parameters()]


@pytest.mark.cuda
@pytest.mark.parametrize("name", _optimizer_names())
def test_optimizer_step_on_cuda_matches_the_cpu(name):
    """Two steps of every registered optimizer on a CUDA model stay on the GPU and give the
    CPU's parameters (float64, ``rtol = 1e-6``); the methods that draw noise or probes from a
    generator on the parameters' device (``seed`` option) draw other numbers there: finite."""
    gpu = _steps_on(name, CUDA)
    assert {p.device.type for p in gpu} == {"cuda"}
    if "seed" in get_registry().entry("optimizer", name).defaults:
        assert all(bool(torch.isfinite(p).all()) for p in gpu)
        return
    for p, q in zip(gpu, _steps_on(name, CPU), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-9)
