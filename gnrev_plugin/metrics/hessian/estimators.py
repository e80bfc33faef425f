"""Matrix-free estimators on the decomposition's operators, with seeded randomness.

Trace estimators (curvlinops' Hutchinson, Hutch++, XTrace) and extreme eigenvalues by ARPACK
Lanczos (scipy's ``eigsh`` on ``op.to_scipy()``, counting the products). Estimators that draw from
torch's global RNG run inside :func:`torch.random.fork_rng` seeded per call (:func:`_seeded`), so
the caller's RNG state is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from curvlinops import hutchinson_trace, hutchpp_trace, xtrace
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from ...compat.curvlinops import PyTorchLinearOperator

__all__ = ["TRACE_ESTIMATORS", "estimate_trace"]

#: curvlinops trace estimators by name, with the divisor their matvec budget must respect.
TRACE_ESTIMATORS: dict[str, tuple[Callable, int]] = {
    "hutchinson": (hutchinson_trace, 1),
    "hutchpp": (hutchpp_trace, 3),
    "xtrace": (xtrace, 2),
}


@contextmanager
def _seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body with torch's global generator of the CPU (and of ``device`` when it is a GPU)
    seeded by ``seed``, inside :func:`torch.random.fork_rng`: the caller's RNG state is restored
    afterwards, and no other device's generator is touched."""
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(int(seed))
        yield


def _draw_seed(gen: torch.Generator) -> int:
    """The next per-call seed of a summary's seed sequence."""
    return int(torch.randint(2**31 - 1, (1,), generator=gen, device="cpu"))


def estimate_trace(op: PyTorchLinearOperator, estimator: str = "hutchpp", num_matvecs: int = 90,
                   seed: int | None = None) -> tuple[float, int]:
    r"""``tr(op)`` by a curvlinops estimator; returns ``(estimate, matvecs used)``.

    Hutchinson's estimator with Rademacher probes ``v_i`` is

    .. math::

        \widehat{\operatorname{tr}}(A) = \frac{1}{m} \sum_{i=1}^m v_i^\top A v_i,

    Hutch++ and XTrace add a low-rank sketch to reduce its variance. ``num_matvecs`` is rounded
    down to the estimator's divisor (Hutch++: 3, XTrace: 2) and kept below the dimension, as
    curvlinops requires. With a ``seed`` the probe vectors are drawn in a forked RNG state seeded
    by it (the caller's RNG is left as it was); without one they continue the caller's global
    RNG stream.

    Args:
        op: a square curvlinops operator.
        estimator: ``"hutchinson"``, ``"hutchpp"`` or ``"xtrace"`` (:data:`TRACE_ESTIMATORS`).
        num_matvecs: the matrix-vector product budget.
        seed: the probes' seed, or ``None`` for the caller's global RNG.

    Returns:
        ``(estimate, matvecs used)``.

    Raises:
        ValueError: an unknown estimator, or an operator too small for it.
    """
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"trace estimator must be one of {sorted(TRACE_ESTIMATORS)}")
    fn, div = TRACE_ESTIMATORS[estimator]
    dim = op.shape[0]
    if dim < div + 1:
        raise ValueError(f"operator of size {dim} is too small for {estimator}; use exact traces")
    nmv = max(div, (min(num_matvecs, dim - 1) // div) * div)
    if seed is None:
        return fn(op, nmv).item(), nmv
    with _seeded(seed, op.device):
        return fn(op, nmv).item(), nmv


class _CountingScipy(LinearOperator):
    """Wrap a scipy LinearOperator and count matrix-vector products (columns)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.count = op, 0

    def _matvec(self, x):
        self.count += 1
        return self.op.matvec(x)

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.op.matmat(X)

    def _adjoint(self):
        return self


def _eigsh(op: PyTorchLinearOperator, k: int, which: str, tol: float, maxiter: int | None
           ) -> tuple[list[float], int, bool]:
    """Extreme eigenvalues by ARPACK Lanczos on ``op.to_scipy()``: (values, matvecs, converged)."""
    sop = _CountingScipy(op.to_scipy(dtype=np.float64))
    try:
        vals = eigsh(sop, k=k, which=which, tol=tol, maxiter=maxiter, return_eigenvectors=False)
        ok = True
    except ArpackNoConvergence as err:
        vals, ok = err.eigenvalues, False
    vals = sorted((float(v) for v in vals), reverse=(which == "LA"))
    return vals, sop.count, ok
