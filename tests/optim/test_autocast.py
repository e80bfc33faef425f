"""The drop-in Gauss-Newton step under ``torch.autocast`` (bf16/fp16 on CPU and on CUDA).

What the step computes (``gnrev_plugin.optim.capture``, "Mixed precision"): the loss and
``backward`` run in the autocast dtype, but the Gauss-Newton system is built from a forward pass
recomputed on the captured inputs in the parameter dtype (float32 here) with autocast disabled. So

* the step equals the drop-in step of the same loop *without* autocast, bitwise on CPU (the same
  eager float32 forward feeds the same solves);
* against a float64 oracle (``torch.func`` Jacobian of a float64 copy of the model, Newton target
  from a float64 forward; no package code) the linearised output change ``J Δθ`` reproduces
  ``−α ε`` to float32 accuracy. ``TOL_F32 = 1e-4``: the float32 step's observed error is ~1e-6
  (``O(κ·eps32)``, ``eps32 = 1.2e-7``); a system built from bf16 activations (``eps = 7.8e-3``)
  misses by ~1e-2, an fp16 one (``eps = 9.8e-4``) by ~1e-3, so the bound separates them.
"""

import copy

import pytest
import torch
from oracles import dense_jacobian, flat_params, oracle_ce_target, rel, snapshot
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN, LossCaptureError
from gnrev_plugin.optim.capture import OutputCapture

TOL_F32 = 1e-4
LR = 0.7

CASES = [  # (loss, linear first block)
    ("mse", False),
    ("cross_entropy", True),
]


def _model(lin: bool, device: str) -> RevMLP:
    return RevMLP(16, 48, 2, 4, linear_first_block=lin, init_std=0.3, seed=3).to(device)


def _batch(loss: str, device: str, n: int = 8):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 16, generator=g)
    y = torch.randn(n, 4, generator=g) if loss == "mse" else torch.randint(0, 4, (n,), generator=g)
    return x.to(device), y.to(device)


def _crit(loss: str) -> nn.Module:
    return nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()


def _dropin_step(model, opt, x, y, loss, amp: torch.dtype | None, scaler=None):
    """One unmodified training-loop step; the forward and the loss under ``amp`` if given."""
    opt.zero_grad()
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(x)
        value = _crit(loss)(out, y)
    if amp is not None:
        assert out.dtype == amp              # the loop really ran in low precision
    if scaler is None:
        value.backward()
        opt.step()
    else:
        scaler.scale(value).backward()
        scaler.step(opt)
        scaler.update()


def _oracle_residual(model_before: RevMLP, delta: torch.Tensor, x, y, loss: str) -> float:
    """``‖J Δθ + α ε‖ / ‖α ε‖`` with ``J`` and ``ε`` from a float64 copy (no package code)."""
    m64 = copy.deepcopy(model_before).cpu().double()
    x64 = x.cpu().double()
    J = dense_jacobian(m64, x64)
    with torch.no_grad():
        F64 = m64(x64)
    eps = F64 - y.cpu().double() if loss == "mse" else oracle_ce_target(F64, y.cpu(), "identity")
    return rel(J @ delta.cpu().double(), -LR * eps.reshape(-1))


def _check_autocast_step(device: str, amp: torch.dtype, loss: str, lin: bool,
                         scaler: bool = False) -> None:
    x, y = _batch(loss, device)
    a, b = _model(lin, device), _model(lin, device)
    before = copy.deepcopy(a)
    opt_a = ExactGN(a.parameters(), lr=LR, loss=loss)
    opt_b = ExactGN(b.parameters(), lr=LR, loss=loss, model=b)
    grad_scaler = torch.amp.GradScaler(device) if scaler else None
    p0 = flat_params(a)
    _dropin_step(a, opt_a, x, y, loss, amp, grad_scaler)
    _dropin_step(b, opt_b, x, y, loss, None)
    assert opt_a.last_step_exact
    delta = flat_params(a) - p0
    assert _oracle_residual(before, delta, x, y, loss) <= TOL_F32
    if device == "cpu":
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    else:  # cuBLAS may pick other kernels for the two forwards: equal to float32 rounding
        assert rel(delta, flat_params(b) - p0) <= TOL_F32


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("loss", "lin"), CASES)
def test_autocast_dropin_step_is_the_float32_step(amp, loss, lin):
    """bf16 (CPU autocast's dtype) and fp16 with a GradScaler (scaled g; ``scaler.step(opt)``)."""
    _check_autocast_step("cpu", amp, loss, lin, scaler=amp == torch.float16)


def test_autocast_dense_gn_dropin_step_is_the_float32_step():
    x, y = _batch("cross_entropy", "cpu", n=4)
    a, b = _model(False, "cpu"), _model(False, "cpu")
    opt_a = DenseGN(a.parameters(), lr=LR, loss="cross_entropy", model=a)
    opt_b = DenseGN(b.parameters(), lr=LR, loss="cross_entropy", model=b)
    _dropin_step(a, opt_a, x, y, "cross_entropy", torch.bfloat16)
    _dropin_step(b, opt_b, x, y, "cross_entropy", None)
    assert opt_a.last_step_exact
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_extra_loss_term_under_autocast_is_still_refused():
    """The gradient check's tolerance is widened only to g's bf16 rounding (3.1e-2; a plain bf16
    loop measures ~1e-3): an extra term on the output that moves g by 6.6e-2 still raises (the
    float32 check catches terms 20× smaller, down to 3.5e-3); parameters unchanged."""
    x, y = _batch("mse", "cpu")
    model = _model(False, "cpu")
    opt = ExactGN(model.parameters(), lr=LR, loss="mse")
    snap = snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        value = nn.functional.mse_loss(out, y) + 0.2 * out.float().square().mean()
    value.backward()
    with pytest.raises(LossCaptureError, match="not that of the recorded mse loss alone"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap, strict=True))


def test_capture_refuses_to_be_consumed_inside_the_autocast_region():
    """The capture's safety net: consumed inside autocast, the GN system would be built in bf16
    (an unpatched optimizer then takes a rank-1 step), so it raises instead."""
    x, y = _batch("mse", "cpu")
    model = _model(False, "cpu")
    capture = OutputCapture(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.mse_loss(model(x), y).backward()
        with pytest.raises(LossCaptureError, match="inside torch.autocast"):
            capture.consume("mse")
    capture.close()


@pytest.mark.parametrize("path", ["exact drop-in", "exact explicit", "dense drop-in",
                                  "dense explicit"])
def test_step_called_inside_the_autocast_region_is_the_float32_step(path):
    x, y = _batch("cross_entropy", "cpu", n=4)
    cls = ExactGN if path.startswith("exact") else DenseGN
    a, b = _model(False, "cpu"), _model(False, "cpu")
    opt_a = cls(a.parameters(), lr=LR, loss="cross_entropy", model=a)
    opt_b = cls(b.parameters(), lr=LR, loss="cross_entropy", model=b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path.endswith("drop-in"):
            nn.functional.cross_entropy(a(x), y).backward()
            opt_a.step()
        else:
            opt_a.step_on_batch(x, y)
    if path.endswith("drop-in"):
        nn.functional.cross_entropy(b(x), y).backward()
        opt_b.step()
    else:
        opt_b.step_on_batch(x, y)
    assert opt_a.last_step_exact
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("loss", "lin"), CASES)
def test_cuda_autocast_dropin_step_is_the_float32_step(amp, loss, lin):
    _check_autocast_step("cuda", amp, loss, lin, scaler=amp == torch.float16)
