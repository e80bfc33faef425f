"""Cockpit adapter: Cockpit on reversible nets, and gnrev's curvature quantities as instruments.

`Cockpit <https://github.com/f-dangel/cockpit>`_ (``cockpit-for-pytorch`` 1.0.2) is BackPACK's
training debugger. After :func:`gnrev_plugin.hosts.backpack.enable` its ``configuration("full")``
runs unchanged on ``extend(RevMLP(...))``; this module adds four Cockpit ``Quantity`` subclasses
(they appear in ``cockpit.get_output()`` under their class names) and :func:`plot`, Cockpit's
own dashboard with a column of gnrev instruments next to it::

    from gnrev_plugin.hosts.backpack import enable
    from gnrev_plugin.hosts.cockpit import gnrev_quantities
    enable()
    cp = Cockpit(model.parameters(),
                 quantities=configuration("full") + gnrev_quantities(model, X_probe))

* :class:`GNStepExactness`: ranks, roles and a-posteriori residuals of the ExactGN step taken at
  iteration ``t`` (stored under ``t``, read at ``t + 1``);
* :class:`NMETrace`: ``tr(NME) = tr(H) − tr(G)`` of the mini-batch loss, with
  ``NME = Σ_n Σ_k [∇_F ℓ_n]_k ∇²_θ F_{n,k}``;
* :class:`NTKSimilarityToInit`: ``A(Θ₀, Θ_t) = ⟨Θ₀, Θ_t⟩_F / (‖Θ₀‖_F ‖Θ_t‖_F)`` of the structured
  RevMLP NTK on a fixed probe batch;
* :class:`CKAToInit`: linear CKA between the last block's output ``X^(L)`` on the probe batch at
  init and now.

Values are finite floats, or, where a quantity is undefined (no ExactGN step to report, e.g. for
SGD or at the first iteration), ``{"defined": False, "reason": "..."}``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

with warnings.catch_warnings():  # cockpit 1.0.2 imports pkg_resources (deprecated)
    warnings.simplefilter("ignore")
    from cockpit import Cockpit
    from cockpit.context import CockpitCTX, get_optimizer
    from cockpit.plotter import CockpitPlotter
    from cockpit.quantities.quantity import SingleStepQuantity
    from cockpit.utils import schedules

from backpack.extensions import DiagGGNExact, DiagHessian
from matplotlib.figure import Figure

from ..metrics import kernel_alignment, linear_cka, nme_trace, revmlp_ntk, revmlp_representations
from ..nn import RevMLP
from ..optim import ExactGN
from ..optim.shadow_model import copy_revmlp

__all__ = ["GNStepExactness", "NMETrace", "NTKSimilarityToInit", "CKAToInit",
           "gnrev_quantities", "plot", "GNREV_QUANTITIES", "undefined"]


def undefined(reason: str) -> dict:
    """The value a gnrev quantity logs where it is undefined: ``{"defined": False, "reason"}``.

    Args:
        reason: Why the value is undefined.

    Returns:
        ``{"defined": False, "reason": reason}``.
    """
    return {"defined": False, "reason": reason}


def _every_step() -> Callable[[int], bool]:
    return schedules.linear(interval=1, offset=0)


class _GnrevQuantity(SingleStepQuantity):
    """A Cockpit single-step quantity whose values may also be strings (``undefined``)."""

    def __init__(self, track_schedule: Callable[[int], bool] | None = None,
                 verbose: bool = False) -> None:
        super().__init__(track_schedule or _every_step(), verbose=verbose)

    def extensions(self, global_step: int) -> list:
        return []

    def _apply_save_format(self, value: Any) -> Any:
        if isinstance(value, str):
            return value
        return super()._apply_save_format(value)


# ------------------------------------------------------------------------------ GN step exactness
class GNStepExactness(_GnrevQuantity):
    """The last ExactGN step: exact or not, its ranks, roles and a-posteriori residuals.

    Read from ``info["optimizer"]`` (a :class:`~gnrev_plugin.optim.ExactGN`) when Cockpit tracks
    iteration ``t + 1``, and stored under iteration ``t``, the iteration whose ``opt.step()``
    took it (like Cockpit's ``UpdateSize``). The value, from ``last_step_exact`` and
    ``last_step_info``:

    * ``exact``: 1.0 iff every system of the exact shares met ``residual_rtol``, measured a
      posteriori as ``‖E − AΔ‖/‖E‖`` from the update as applied;
    * ``max_residual``: the largest of those relative residuals over the exact-share blocks
      (``A = [s, 1]`` the half-layer design matrix, ``E`` its target share, ``Δ`` its update);
    * ``relative_residual``: ``‖JΔθ + αε‖ / ‖αε‖`` in function space (only with
      ``ExactGN(verify=True)``; otherwise absent);
    * per participating block: ``rank_f``, ``rank_g`` (numerical ranks of ``A_f``, ``A_g``),
      ``n`` (batch size), ``full_rank`` (1.0/0.0), ``role`` (``"exact share"`` /
      ``"least squares"``); and ``alpha``.

    Undefined (``{"defined": False, "reason"}``) when the optimizer is not ExactGN or took no new
    step since the last report.

    Args:
        track_schedule: Cockpit's ``track_schedule`` (iterations to track).
        verbose: Cockpit's ``verbose``.
    """

    def __init__(self, track_schedule: Callable[[int], bool] | None = None,
                 verbose: bool = False) -> None:
        super().__init__(track_schedule, verbose)
        self._last_seen: int | None = None

    def should_compute(self, global_step: int) -> bool:
        """Whether iteration ``global_step`` reports the step of iteration ``global_step − 1``.

        Args:
            global_step: Cockpit's iteration counter.

        Returns:
            ``True`` if iteration ``global_step − 1`` is tracked.
        """
        return global_step >= 1 and self._track_schedule(global_step - 1)

    def compute(self, global_step: int, params, batch_loss) -> tuple[int, dict]:
        """The value for the step taken at iteration ``global_step − 1``.

        Args:
            global_step: Cockpit's iteration counter.
            params: Cockpit's parameters (unused).
            batch_loss: Cockpit's batch loss (unused).

        Returns:
            ``(global_step − 1, value)``; the value is :func:`undefined` where there is no ExactGN step.
        """
        step = global_step - 1
        try:
            opt = get_optimizer(global_step)
        except KeyError:
            return step, undefined("no 'optimizer' in the Cockpit info")
        if not isinstance(opt, ExactGN):
            return step, undefined(f"the optimizer is {type(opt).__name__}, not gnrev's ExactGN: "
                                   "there is no exact Gauss-Newton step to report")
        info = opt.last_step_info
        if opt.last_step_exact is None or not info:
            return step, undefined("ExactGN has not taken a step yet")
        if id(info) == self._last_seen:
            return step, undefined("ExactGN took no step since the last report")
        self._last_seen = id(info)
        return step, self.summarise(opt.last_step_exact, info)

    @staticmethod
    def summarise(exact: bool, info: dict) -> dict:
        """The logged value from ExactGN's ``last_step_exact`` and ``last_step_info``.

        Args:
            exact: ``last_step_exact``.
            info: ``last_step_info``.

        Returns:
            The logged dict (see the class docstring).
        """
        blocks = info["blocks"]
        shares = [b for b in blocks if b["role"] == "exact share"]
        residuals = [r for b in shares for r in (b["residual_f"], b["residual_g"]) if r is not None]
        out = {
            "exact": float(bool(exact)),
            "max_residual": max(residuals) if residuals else math.nan,
            "block": [int(b["block"]) for b in blocks],
            "n": [int(b["n"]) for b in blocks],
            "rank_f": [int(b["rank_f"]) for b in blocks],
            "rank_g": [int(b["rank_g"]) for b in blocks],
            "full_rank": [float(bool(b["full_rank"])) for b in blocks],
            "role": [str(b["role"]) for b in blocks],
            "alpha": float(info["alpha"]),
        }
        if info.get("relative_residual") is not None:
            out["relative_residual"] = float(info["relative_residual"])
        if not residuals:
            out.pop("max_residual")
        return out


# ------------------------------------------------------------------------------ tr(NME)
class NMETrace(_GnrevQuantity):
    """``tr(NME) = tr(H) − tr(G)`` of the mini-batch loss ``L`` the backward pass differentiates.

    ``method="backpack"`` (default): ``Σ_θ (diag_h − diag_ggn_exact)`` from BackPACK's
    ``DiagHessian`` and ``DiagGGNExact`` in Cockpit's own backward pass. Exact at any size: the
    difference is the NME's diagonal, made of the activations' ``σ''`` terms
    (``docs/hosts/backpack.md``); it is 0 for ReLU RevMLPs, whose NME is all cross-layer.
    Memory grows like ``N·d²`` per block for smooth activations.

    ``method="curvlinops"``: :func:`gnrev_plugin.metrics.nme_trace` on an un-extended copy of
    ``model`` (never the BackPACK-extended one) for ``loss_fn`` on ``info["inputs"]``,
    ``info["targets"]`` (pass them to ``cockpit(step, info={...})``): exact (dense ``H − G``)
    up to 1500 parameters, Hutch++ with 90 matrix-vector products (seeded, global RNG untouched)
    beyond.

    Args:
        track_schedule: Cockpit's ``track_schedule``.
        verbose: Cockpit's ``verbose``.
        method: ``"backpack"`` or ``"curvlinops"``.
        model: The RevMLP (``method="curvlinops"`` only).
        loss_fn: The un-extended loss (``method="curvlinops"`` only).

    Raises:
        ValueError: For an unknown ``method``, or ``"curvlinops"`` without ``model`` and ``loss_fn``.
    """

    METHODS = ("backpack", "curvlinops")

    def __init__(self, track_schedule: Callable[[int], bool] | None = None,
                 verbose: bool = False, method: str = "backpack",
                 model: RevMLP | None = None, loss_fn: nn.Module | None = None) -> None:
        super().__init__(track_schedule, verbose)
        if method not in self.METHODS:
            raise ValueError(f"NMETrace method must be one of {self.METHODS}, got {method!r}")
        if method == "curvlinops" and (not isinstance(model, RevMLP) or loss_fn is None):
            raise ValueError("NMETrace(method='curvlinops') needs model= (a RevMLP) and "
                             "loss_fn= (the un-extended nn.Module loss)")
        self.method, self.model, self.loss_fn = method, model, loss_fn

    def extensions(self, global_step: int) -> list:
        """The BackPACK extensions Cockpit must run for this quantity.

        Args:
            global_step: Cockpit's iteration counter.

        Returns:
            ``[DiagHessian(), DiagGGNExact()]`` on tracked iterations with ``method="backpack"``, else ``[]``.
        """
        if self.method == "backpack" and self.should_compute(global_step):
            return [DiagHessian(), DiagGGNExact()]
        return []

    def _compute(self, global_step: int, params, batch_loss) -> float:
        if self.method == "backpack":
            return float(sum((p.diag_h - p.diag_ggn_exact).sum() for p in params))
        X, y = (CockpitCTX.get(k, global_step) for k in ("inputs", "targets"))
        return nme_trace(plain_copy(self.model), inputs=X.detach(), targets=y.detach(),
                         loss_fn=self.loss_fn)


def plain_copy(model: RevMLP) -> RevMLP:
    """A RevMLP with ``model``'s configuration, parameters and buffers but none of its hooks
    (BackPACK's, ExactGN's output capture): what curvlinops and ``torch.func`` may trace.

    Args:
        model: The (possibly extended or hooked) RevMLP.

    Returns:
        A fresh, hook-free RevMLP.
    """
    return copy_revmlp(model)


# ------------------------------------------------------------------------------ NTK, CKA to init
class _ProbeQuantity(_GnrevQuantity):
    """A quantity evaluated on a fixed probe batch of a RevMLP, against its value at init (the
    model as it is when the quantity is constructed)."""

    def __init__(self, model: RevMLP, probe_inputs: Tensor,
                 track_schedule: Callable[[int], bool] | None = None,
                 verbose: bool = False) -> None:
        super().__init__(track_schedule, verbose)
        if not isinstance(model, RevMLP):
            raise TypeError(f"{type(self).__name__} needs a gnrev_plugin.nn.RevMLP, got "
                            f"{type(model).__name__}")
        self.model, self.probe_inputs = model, probe_inputs.detach()
        self.initial = self.evaluate()

    def evaluate(self) -> Tensor:
        raise NotImplementedError


class NTKSimilarityToInit(_ProbeQuantity):
    """``A(Θ₀, Θ_t) = ⟨Θ₀, Θ_t⟩_F / (‖Θ₀‖_F ‖Θ_t‖_F)`` with ``Θ = J Jᵀ`` (``nC × nC``) the
    empirical NTK of the logits on the probe batch, by :func:`gnrev_plugin.metrics.revmlp_ntk`
    (structured: ``Θ = Σ_l (A_l A_lᵀ ⊗ 1) ⊙ (Γ_l Γ_lᵀ)`` over half-layers, no Jacobian formed).
    ``Θ₀`` is taken when the quantity is constructed. 1 means the kernel has not moved.

    Args:
        model: The RevMLP.
        probe_inputs: The fixed probe batch.
        track_schedule: Cockpit's ``track_schedule``.
        verbose: Cockpit's ``verbose``.
    """

    @torch.no_grad()
    def evaluate(self) -> Tensor:
        r"""The probe batch's NTK now.

        Returns:
            :math:`\Theta_t = J J^\top`, ``(nC, nC)``, float64.
        """
        return revmlp_ntk(self.model, self.probe_inputs).double()

    def _compute(self, global_step: int, params, batch_loss) -> float:
        return float(kernel_alignment(self.initial, self.evaluate()))


class CKAToInit(_ProbeQuantity):
    """Linear CKA between the last block's output ``X^(L)`` on the probe batch at init and now,
    ``‖Y_cᵀ X_c‖_F² / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)`` with column-centred ``X_c, Y_c``
    (:func:`gnrev_plugin.metrics.linear_cka`).

    Args:
        model: The RevMLP.
        probe_inputs: The fixed probe batch.
        track_schedule: Cockpit's ``track_schedule``.
        verbose: Cockpit's ``verbose``.
    """

    @torch.no_grad()
    def evaluate(self) -> Tensor:
        """The last block's output on the probe batch now.

        Returns:
            :math:`X^{(L)}`, ``(n, d)``, float64.
        """
        reps = revmlp_representations(self.model, self.probe_inputs, per="block")
        return reps[f"blocks.{self.model.num_blocks - 1}"].double()

    def _compute(self, global_step: int, params, batch_loss) -> float:
        return float(linear_cka(self.initial, self.evaluate()))


#: The gnrev quantity classes (their names are the keys in ``cockpit.get_output()[step]``).
GNREV_QUANTITIES = (GNStepExactness, NMETrace, NTKSimilarityToInit, CKAToInit)


def gnrev_quantities(model: RevMLP, probe_inputs: Tensor,
                     track_schedule: Callable[[int], bool] | None = None,
                     nme_method: str = "backpack", loss_fn: nn.Module | None = None
                     ) -> list[_GnrevQuantity]:
    """All four gnrev quantities for ``model``, to add to a Cockpit configuration:
    ``Cockpit(params, quantities=configuration("full") + gnrev_quantities(model, X_probe))``.

    Args:
        model: The RevMLP Cockpit tracks.
        probe_inputs: The fixed probe batch :math:`X` of the NTK and CKA quantities.
        track_schedule: Cockpit's ``track_schedule`` for all four.
        nme_method: ``"backpack"`` or ``"curvlinops"`` (see :class:`NMETrace`).
        loss_fn: The un-extended loss, needed by ``nme_method="curvlinops"``.

    Returns:
        ``[GNStepExactness, NMETrace, NTKSimilarityToInit, CKAToInit]`` instances.
    """
    return [GNStepExactness(track_schedule),
            NMETrace(track_schedule, method=nme_method, model=model, loss_fn=loss_fn),
            NTKSimilarityToInit(model, probe_inputs, track_schedule),
            CKAToInit(model, probe_inputs, track_schedule)]


# ------------------------------------------------------------------------------ figure
def _series(output: dict, key: str, field: str | None = None) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for step in sorted(output):
        value = output[step].get(key)
        if isinstance(value, dict):
            if not value.get("defined", True) or field not in value:
                continue
            value = value[field]
        if value is None:
            continue
        steps.append(int(step))
        values.append(float(value))
    return steps, values


def plot(cockpit: Cockpit, path: str | None = None, title: str | None = None,
         dpi: int = 100) -> Figure:
    """Cockpit's own dashboard (``CockpitPlotter``) with a column of gnrev instruments to its
    right: ``tr(NME)`` next to Cockpit's ``HessTrace``, the GN step's a-posteriori residual,
    and the NTK similarity and last-block CKA to init. Returns the figure; saves it to ``path``
    if given. Needs no display (Agg backend).

    Args:
        cockpit: The Cockpit that tracked the run.
        path: File to save the figure to, or ``None``.
        title: Figure title.
        dpi: Resolution.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    plotter = CockpitPlotter()
    plotter.plot(cockpit, show_plot=False, plot_title=title)
    fig = plotter.fig
    width, height = fig.get_size_inches()
    fig.set_size_inches(width * 1.3, height)
    plotter.grid_spec.update(right=0.74)
    out = cockpit.get_output()
    grid = fig.add_gridspec(4, 1, left=0.79, right=0.98, top=0.88, bottom=0.08, hspace=0.6)
    panels = [
        ("NMETrace", None, r"tr(NME) on the batch", "linear"),
        ("GNStepExactness", "max_residual", "GN step: max ‖E − AΔ‖/‖E‖", "log"),
        ("NTKSimilarityToInit", None, "NTK similarity to init", "linear"),
        ("CKAToInit", None, "CKA to init (last block)", "linear"),
    ]
    for i, (key, field, label, scale) in enumerate(panels):
        ax = fig.add_subplot(grid[i])
        steps, values = _series(out, key, field)
        if key == "GNStepExactness":
            exact = dict(zip(*_series(out, key, "exact"), strict=True))
            ax.plot(steps, values, ".-", color="#3b7dd8")
            bad = [s for s in steps if exact.get(s, 1.0) < 1]
            ax.plot(bad, [values[steps.index(s)] for s in bad], "x", color="#d62728")
            if not steps:
                ax.text(0.5, 0.5, "undefined\n(no ExactGN step)", ha="center", va="center",
                        transform=ax.transAxes)
        else:
            ax.plot(steps, values, ".-", color="#3b7dd8")
        if scale == "log" and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("iteration")
    fig.text(0.885, 0.93, "gnrev", ha="center", fontsize="x-large", fontweight="bold")
    if path is not None:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig
