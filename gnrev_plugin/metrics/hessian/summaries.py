"""What a Hessian summary reports: traces, eigenvalues, norms, ratios and per-block shares.

Plain frozen dataclasses (JSON-ready through :meth:`HessianSummary.to_dict`) and the arithmetic
that derives the ratios and the within/cross-layer split of the NME from measured quantities.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .estimators import TRACE_ESTIMATORS

__all__ = ["OPERATORS", "HessianSummary", "TraceEstimate", "EigsInfo", "Ratios", "BlockSummary",
           "NMESplit", "SurrogateCheck"]

OPERATORS = ("hessian", "ggn", "nme")


@dataclass(frozen=True)
class TraceEstimate:
    r"""``tr(A)``: its ``value``, the ``estimator`` (``exact``, ``hutchinson``, ``hutchpp`` or
    ``xtrace``) and the matrix-vector products it cost (an NME product through ``H − G`` costs 2).

    Attributes:
        value: The estimate of :math:`\operatorname{tr}(A)`.
        estimator: How it was computed.
        num_matvecs: Matrix-vector products spent.
    """

    value: float
    estimator: str
    num_matvecs: int


@dataclass(frozen=True)
class EigsInfo:
    """How extreme eigenvalues were found: ``method`` (``eigvalsh`` on the dense matrix, or ARPACK
    ``eigsh(LA)``/``eigsh(SA)``), its matrix-vector products and whether it converged.

    Attributes:
        method: ``"eigvalsh"``, ``"eigsh(LA)"`` or ``"eigsh(SA)"``.
        num_matvecs: Matrix-vector products spent.
        converged: Whether ARPACK converged.
    """

    method: str
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class Ratios:
    r"""``‖NME‖_F/‖H‖_F``, ``tr(NME)/tr(H)`` and ``λ_min(H)/λ_max(H)`` (``nan`` when undefined).

    Attributes:
        nme_fro_over_hessian_fro: :math:`\lVert H - G \rVert_F / \lVert H \rVert_F`.
        nme_trace_over_hessian_trace: :math:`\operatorname{tr}(H - G) / \operatorname{tr}(H)`.
        lambda_min_over_lambda_max_hessian: :math:`\lambda_{\min}(H) / \lambda_{\max}(H)`.
    """

    nme_fro_over_hessian_fro: float
    nme_trace_over_hessian_trace: float
    lambda_min_over_lambda_max_hessian: float


@dataclass(frozen=True)
class BlockSummary:
    r"""One parameter block ``b`` (by default one module): ``tr(A_bb)`` for ``A`` ∈ {H, G, NME},
    its share ``tr(A_bb)/tr(A)`` and ``‖NME_bb‖_F``, exact or by Hutchinson (``estimator``).

    Attributes:
        num_params: Parameters in the block.
        estimator: ``"exact"`` or ``"hutchinson"``.
        trace_hessian: :math:`\operatorname{tr}(H_{bb})`.
        trace_ggn: :math:`\operatorname{tr}(G_{bb})`.
        trace_nme: :math:`\operatorname{tr}(\mathrm{NME}_{bb})`.
        share_trace_hessian: :math:`\operatorname{tr}(H_{bb}) / \operatorname{tr}(H)`.
        share_trace_ggn: :math:`\operatorname{tr}(G_{bb}) / \operatorname{tr}(G)`.
        share_trace_nme: :math:`\operatorname{tr}(\mathrm{NME}_{bb}) / \operatorname{tr}(\mathrm{NME})`.
        nme_within_fro: :math:`\lVert \mathrm{NME}_{bb} \rVert_F`.
    """

    num_params: int
    estimator: str
    trace_hessian: float
    trace_ggn: float
    trace_nme: float
    share_trace_hessian: float
    share_trace_ggn: float
    share_trace_nme: float
    nme_within_fro: float


@dataclass(frozen=True)
class NMESplit:
    r"""``within = Σ_b ‖NME_bb‖_F²`` (the activation part, where ``φ''`` enters),
    ``cross = ‖NME‖_F² − within`` (clipped at 0) and ``within_share = within / ‖NME‖_F²``.

    Attributes:
        within_fro2: :math:`\sum_b \lVert \mathrm{NME}_{bb} \rVert_F^2`.
        cross_fro2: :math:`\lVert \mathrm{NME} \rVert_F^2 - \text{within}`.
        within_share: within :math:`/ \lVert \mathrm{NME} \rVert_F^2`.
    """

    within_fro2: float
    cross_fro2: float
    within_share: float


@dataclass(frozen=True)
class SurrogateCheck:
    r"""``max |NME_surrogate V − (H − G) V|`` over ``num_probes`` Gaussian probe columns ``V``, and
    that maximum relative to ``max |(H − G) V|``.

    Attributes:
        max_abs_diff: :math:`\max \lvert \mathrm{NME}_{\mathrm{surr}} V - (H - G) V \rvert`.
        relative: That maximum over :math:`\max \lvert (H - G) V \rvert`.
        num_probes: Number of probe columns of :math:`V`.
    """

    max_abs_diff: float
    relative: float
    num_probes: int


@dataclass
class HessianSummary:
    """What :meth:`HessianDecomposition.summary` measured (operators keyed ``hessian``, ``ggn``,
    ``nme``).

    Attributes:
        num_params: ``P``.
        mode: ``"exact"`` (dense matrices) or ``"estimated"`` (curvlinops estimators, Lanczos).
        trace: ``{op: TraceEstimate}``.
        top_eigenvalues: ``{op: [λ_1 ≥ λ_2 ≥ …]}`` (top-k).
        eigs_info: ``{op: EigsInfo}`` (plus ``hessian_min`` for ``λ_min(H)`` when estimated).
        lambda_min_hessian: ``λ_min(H)``; ``None`` when it was not computed.
        lambda_min_nme: ``λ_min(NME)`` (exact mode only, else ``None``).
        frobenius: ``{op: ‖A‖_F}`` (``nan`` when skipped); ``frobenius_estimator`` says how.
        ratios: :class:`Ratios`.
        surrogate_check: :class:`SurrogateCheck`.
        blocks: ``{block: BlockSummary}`` and ``nme_split`` (:class:`NMESplit`) when per-block
            summaries were requested, else ``None``.
        spectral_density: ``{op: (grid, density)}`` (Papyan's Lanczos) when requested.
    """

    num_params: int
    mode: str
    trace: dict[str, TraceEstimate]
    top_eigenvalues: dict[str, list[float]]
    eigs_info: dict[str, EigsInfo]
    lambda_min_hessian: float | None
    lambda_min_nme: float | None
    frobenius: dict[str, float]
    frobenius_estimator: str
    ratios: Ratios
    surrogate_check: SurrogateCheck
    blocks: dict[str, BlockSummary] | None = None
    nme_split: NMESplit | None = None
    spectral_density: dict[str, tuple[list[float], list[float]]] | None = None

    def to_dict(self) -> dict:
        """The summary as nested plain dicts and lists (JSON-ready).

        Returns:
            ``dataclasses.asdict`` of the summary.
        """
        return dataclasses.asdict(self)


def _check_summary_options(trace_estimator: str, nme_operator: str) -> None:
    if trace_estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"trace_estimator must be one of {sorted(TRACE_ESTIMATORS)}")
    if nme_operator not in ("difference", "surrogate"):
        raise ValueError("nme_operator must be 'difference' (H − G) or 'surrogate'")


def _ratios(trace: dict[str, TraceEstimate], fro: dict[str, float], top: dict[str, list[float]],
            lambda_min_hessian: float | None) -> Ratios:
    lam_max_h = top["hessian"][0] if top["hessian"] else float("nan")
    lam_min_h = float("nan") if lambda_min_hessian is None else lambda_min_hessian
    return Ratios(_safe_div(fro["nme"], fro["hessian"]),
                  _safe_div(trace["nme"].value, trace["hessian"].value),
                  _safe_div(lam_min_h, lam_max_h))


def _blocks_and_split(rows: dict[str, tuple[int, str, dict[str, float]]], fro2: dict[str, float],
                      trace: dict[str, TraceEstimate], nme_fro: float
                      ) -> tuple[dict[str, BlockSummary], NMESplit]:
    """Block summaries (shares ``tr(A_bb)/tr(A)``) and the within/cross split of ``‖NME‖_F²``
    from per-block ``(num_params, estimator, {op: tr(A_bb)})`` and ``‖NME_bb‖_F²``."""
    blocks = {}
    for name, (n, estimator, tr) in rows.items():
        blocks[name] = BlockSummary(
            num_params=n, estimator=estimator, trace_hessian=tr["hessian"], trace_ggn=tr["ggn"],
            trace_nme=tr["nme"],
            share_trace_hessian=_safe_div(tr["hessian"], trace["hessian"].value),
            share_trace_ggn=_safe_div(tr["ggn"], trace["ggn"].value),
            share_trace_nme=_safe_div(tr["nme"], trace["nme"].value),
            nme_within_fro=math.sqrt(fro2[name]))
    within = sum(fro2.values())
    total = nme_fro ** 2
    return blocks, NMESplit(within, max(total - within, 0.0), _safe_div(within, total))


def _safe_div(a: float, b: float) -> float:
    return a / b if b not in (0, 0.0) and math.isfinite(b) else float("nan")
