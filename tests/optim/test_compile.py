"""The Gauss-Newton optimizers with ``torch.compile``'d models (Inductor on CPU; CUDA variants).

What is claimed (``gnrev_plugin.optim.capture``, "torch.compile"; ``docs/scaling.md``):

* the optimizers find the eager module behind ``torch.compile(model)`` (``_orig_mod``), from the
  wrapper's parameters or the wrapper itself;
* the drop-in step on a compiled model, with the optimizer built after compiling (with
  ``fullgraph=True``; or after a first compiled call), equals the eager drop-in step on the same
  batch;
* an optimizer built *before* ``torch.compile`` still captures the compiled calls (one graph break
  at the end of the forward) — here together with bf16 autocast, where it equals the eager
  float32 step bitwise;
* the explicit ``step_on_batch`` always runs the eager module, so it equals the eager step.

Tolerances: float64 models, where Inductor's reordered sums change results by ``O(eps64·κ)``:
``rtol = 1e-10``. Each compiling test resets Dynamo (``torch.compiler.reset()``) so no cache limit
turns compilation off silently, and counts the graphs Inductor compiled (at least one).
"""

import copy

import pytest
import torch
from oracles import dense_jacobian, flat_params, rel
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.nn.discovery import compiled_wrappers_of, find_module_owning, unwrap_compiled
from gnrev_plugin.optim import DenseGN, ExactGN

LR = 0.6


@pytest.fixture
def graphs():
    """A fresh Dynamo and an Inductor backend that records each graph it compiles."""
    torch.compiler.reset()
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    yield backend, compiled
    torch.compiler.reset()


def _model(lin: bool = True, device: str = "cpu", dtype=torch.float64) -> RevMLP:
    return RevMLP(8, 16, 2, 3, linear_first_block=lin, init_std=0.3, seed=4,
                  dtype=dtype).to(device)


def _batch(loss: str, device: str = "cpu", dtype=torch.float64, n: int = 5):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = (torch.randn(n, 3, generator=g, dtype=dtype) if loss == "mse"
         else torch.randint(0, 3, (n,), generator=g))
    return x.to(device), y.to(device)


def _loop(model, opt, x, y, loss: str, steps: int = 1, amp: torch.dtype | None = None) -> None:
    crit = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            value = crit(model(x), y)
        value.backward()
        opt.step()


def _assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 1e-10) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2)


def test_optimizers_find_the_eager_module_behind_a_compiled_one():
    """Discovery unwraps ``OptimizedModule`` (no compilation runs here: nothing is called)."""
    model = _model()
    compiled = torch.compile(model)
    assert unwrap_compiled(compiled) is model and unwrap_compiled(model) is model
    assert compiled_wrappers_of(model, scan=True) == [compiled]
    assert find_module_owning(compiled.parameters()) is model
    assert compiled_wrappers_of(model) == [compiled]      # remembered by that discovery scan
    assert ExactGN(compiled.parameters(), lr=LR).model is model
    assert DenseGN(compiled.parameters(), lr=LR).model is model
    # the explicit path runs the eager module: the same step as an eager twin
    twin = copy.deepcopy(model)
    x, y = _batch("mse")
    ExactGN(compiled.parameters(), lr=LR).step_on_batch(x, y)
    ExactGN(twin.parameters(), lr=LR, model=twin).step_on_batch(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(),
                                                 strict=True))


def test_the_compiled_model_itself_can_be_passed_as_model():
    model = _model()
    compiled = torch.compile(model)
    assert ExactGN(compiled.parameters(), lr=LR, model=compiled).model is model
    assert DenseGN(compiled.parameters(), lr=LR, model=compiled).model is model


def _check_fullgraph_dropin(device: str, backend, compiled_graphs) -> None:
    model, eager = _model(device=device), _model(device=device)
    x, y = _batch("mse", device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opt = ExactGN(compiled.parameters(), lr=LR, loss="mse")
    before = copy.deepcopy(model).cpu()
    p0 = flat_params(model)
    _loop(compiled, opt, x, y, "mse")
    assert opt.last_step_exact and compiled_graphs
    # the step is the Gauss-Newton step: J Δθ = −α (F − Y), J from torch.func in float64
    J = dense_jacobian(before, x.cpu())
    with torch.no_grad():
        target = -LR * (before(x.cpu()) - y.cpu())
    assert rel(J @ (flat_params(model) - p0).cpu(), target.reshape(-1)) <= 1e-8
    _loop(compiled, opt, x, y, "mse")
    _loop(eager, ExactGN(eager.parameters(), lr=LR, loss="mse", model=eager), x, y, "mse",
          steps=2)
    _assert_same_params(model, eager)


@pytest.mark.slow
def test_fullgraph_compiled_model_dropin_step_equals_eager(graphs):
    _check_fullgraph_dropin("cpu", *graphs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()


@pytest.mark.slow
def test_dense_gn_finds_and_steps_a_compiled_model(graphs):
    """An ``nn.Sequential``: Dynamo inlines a torch.nn container's hooks into the wrapper's graph
    and ignores hooks added after its first call, so only the wrapper's eager hook sees the loop."""
    backend, compiled_graphs = graphs
    model, eager = _mlp(), _mlp()
    x, y = _batch("cross_entropy")
    compiled = torch.compile(model, backend=backend)
    compiled(x)           # a first compiled call (grad mode on, as in the loop) before the
    opt = DenseGN(compiled.parameters(), lr=LR, loss="cross_entropy")        # optimizer exists
    assert opt.model is model
    _loop(compiled, opt, x, y, "cross_entropy")
    assert compiled_graphs and opt.last_step_exact
    _loop(eager, DenseGN(eager.parameters(), lr=LR, loss="cross_entropy", model=eager), x, y,
          "cross_entropy")
    _assert_same_params(model, eager)


def _check_built_before_compile_with_autocast(device: str, backend, compiled_graphs) -> None:
    model, eager = (_model(device=device, dtype=torch.float32) for _ in range(2))
    x, y = _batch("cross_entropy", device, torch.float32)
    opt = ExactGN(model.parameters(), lr=LR, loss="cross_entropy")   # before torch.compile
    compiled = torch.compile(model, backend=backend)
    _loop(compiled, opt, x, y, "cross_entropy", steps=2, amp=torch.bfloat16)
    assert compiled_graphs and opt.last_step_exact
    _loop(eager, ExactGN(eager.parameters(), lr=LR, loss="cross_entropy", model=eager), x, y,
          "cross_entropy", steps=2)
    if device == "cpu":   # both steps solve from the same eager float32 recomputation
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters(),
                                                     strict=True))
    else:
        _assert_same_params(model, eager, rtol=1e-4)


@pytest.mark.slow
def test_optimizer_built_before_compile_captures_compiled_autocast_calls(graphs):
    _check_built_before_compile_with_autocast("cpu", *graphs)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_fullgraph_compiled_model_dropin_step_equals_eager(graphs):
    _check_fullgraph_dropin("cuda", *graphs)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_optimizer_built_before_compile_captures_compiled_autocast_calls(graphs):
    _check_built_before_compile_with_autocast("cuda", *graphs)
