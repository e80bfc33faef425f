"""BackPACK adapter: the additive coupling block and the RevMLP as BackPACK leaf modules.

Usage (copy-paste)::

    from gnrev_plugin.hosts.backpack import enable
    enable()          # every BackPACK extension instance, anywhere (Cockpit's too), now handles
                      # AdditiveCoupling/RevMLP; disable() undoes it

or, per instance::

    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact, KFAC
    from gnrev_plugin.hosts.backpack import register

    model, lossf = extend(copy.deepcopy(revmlp)), extend(nn.CrossEntropyLoss())
    with backpack(*register(BatchGrad(), DiagGGNExact(), KFAC())):
        lossf(model(X), y).backward()
    model.blocks[0].f.linear.weight.grad_batch       # (N, d/2, M)
    model.blocks[0].f.linear.weight.diag_ggn_exact   # (d/2, M)
    model.blocks[0].f.linear.weight.kfac             # [G, A]

Why a leaf. BackPACK's second-order extensions backpropagate a quantity through *every* module
of the graph; a coupling block's forward is slicing, fixed projections, activations, additions
and ``torch.cat``, which are not modules. So the block (and the whole :class:`RevMLP`, whose
readout ``F = X^(L) U`` is a plain matmul) is one leaf: its parts carry ``_backpack_extend =
True`` and are not hooked by ``backpack.extend``, and :func:`register` gives each extension a
module extension for :class:`AdditiveCoupling` and :class:`RevMLP`.

What the leaf extension computes. For a block ``Y1 = X1 + u_f``, ``u_f = σ(X2 C_f) W_fᵀ + b_f``,
``Y2 = X2 + u_g``, ``u_g = σ(Y1 C_g) W_gᵀ + b_g``, the quantity ``V`` that BackPACK hands to the
block's output (the output gradient for first-order extensions, ``[K, N, d]`` square-root factors
``S`` of the GGN / MC-Fisher / KFAC, the signed factor lists of ``DiagHessian``) is pulled back
by the block's exact transposed Jacobians, computed with ``torch.func.vjp`` on the block's own
functional forward: ``V ↦ (V_{u_f}, V_{u_g}, V_X) = (J_{u_f}ᵀV, J_{u_g}ᵀV, J_Xᵀ V)``, and
``V_{u_f} = V1 + J_g(Y1)ᵀ V2``, ``V_{u_g} = V2``. Each inner ``nn.Linear`` ``u = s Wᵀ + b`` then gets
its quantity from **BackPACK's own nn.Linear rule** of the same extension, evaluated with input
``s = σ(Z C)`` and output quantity ``V_u`` (e.g. ``DiagGGNExact``:
``diag_W = Σ_{k,n} (V_u[k,n] ⊗ s[n])²``; ``KFAC``: ``[Σ_{k,n} V_u V_uᵀ, sᵀs/N]``), so conventions
(scaling, savefields, subsampling) are BackPACK's. ``V_X`` is stored for the block input, so
blocks compose with any BackPACK-supported module before them.

``DiagHessian``/``BatchDiagHessian`` backpropagate BackPACK's signed lists of square-root
factors of the per-sample loss Hessian ``H_n = Σ_i ε_i S_i[:, n]ᵀ S_i[:, n]``. The block is linear
in each single parameter, so ``∂²L/∂W_{ab}² = Σ_n s_n[b]² (H_{u,n})_{aa}`` needs the Hessian
``H_u`` in each inner output ``u``; it is the pulled-back output Hessian plus, for every
half-layer ``h = Z C`` after ``u`` with ``σ'' ≠ 0``, the residual ``C diag(σ''(h) ⊙ ∂L/∂s) Cᵀ`` in
that half-layer's input ``Z`` (``∂L/∂s = (∂L/∂u) W``). For a block: the ``g`` residual sits at
``Y1`` (it enters ``H_{u_f}`` and the block input), the ``f`` residual at ``X2`` (block input
only). Each residual is added as two factors ``√(±r)_+ ⊙ C`` (``[M, N, d/2]``, signs ``±1``), and a
list with more columns than twice the feature width is compressed exactly, per sample, to
``H_n = L_n L_nᵀ − c_n I`` (:func:`compress`; ``docs/hosts/backpack.md`` has the derivation). With ``σ'' = 0``
(ReLU, identity) there is no residual. ``DiagHessian − DiagGGNExact`` is then exactly the
diagonal of the NME, ``diag(H − G)``, carried by the ``σ''`` terms.

``KFRA`` raises ``NotImplementedError`` naming the extension (its batch-averaged
backpropagation has no transposed-Jacobian form here), and :func:`register` refuses extensions
that have no ``nn.Linear`` rule (e.g. the ``curvmatprod`` ones).

Process-wide set-up. :func:`enable` makes *every* BackPACK extension instance, including the ones
a tool such as Cockpit creates internally, use :class:`CouplingLeafExtension` for
:class:`AdditiveCoupling`/:class:`RevMLP` (unless the instance has its own entry for them), and
runs BackPACK's ``extension_hook`` (Cockpit's per-parameter hooks) on the inner ``nn.Linear`` s of
a leaf instead of on the leaf itself. :func:`disable` undoes both. Both are idempotent and
guarded by a lock.

Never hand an ``extend``-ed module or loss to curvlinops (functorch cannot trace BackPACK's
backward hooks): extend a ``copy.deepcopy`` of the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from backpack.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn.functional import linear

from ..compat import backpack as _compat
from ..compat.backpack import module_extensions
from ..nn import AdditiveCoupling, RevMLP
from ..nn.coupling import CouplingFunction

__all__ = ["register", "all_extensions", "enable", "disable", "is_enabled", "enabled",
           "SUPPORTED_EXTENSIONS", "CouplingLeafExtension", "UNSUPPORTED_MESSAGE"]

#: Extensions :func:`register` accepts (all of BackPACK's with an ``nn.Linear`` rule and a
#: transposed-Jacobian backpropagation).
SUPPORTED_EXTENSIONS: tuple[type[BackpropExtension], ...] = (
    BatchGrad, BatchL2Grad, SumGradSquared, Variance,
    DiagGGNExact, DiagGGNMC, BatchDiagGGNExact, BatchDiagGGNMC, SqrtGGNExact, SqrtGGNMC,
    KFAC, KFLR, DiagHessian, BatchDiagHessian,
)
_DIAG_HESSIAN = (DiagHessian, BatchDiagHessian)
#: Activations with ``σ'' = 0`` (almost everywhere): no second-derivative residual.
_ZERO_CURVATURE_ACTIVATIONS = ("relu", "identity")
UNSUPPORTED_MESSAGE = ("{ext} is not supported on gnrev's AdditiveCoupling/RevMLP leaf modules; "
                       "supported: {supported}")


def _supported_names() -> str:
    return ", ".join(e.__name__ for e in SUPPORTED_EXTENSIONS)


def _linear_rule(ext: BackpropExtension) -> ModuleExtension:
    """BackPACK's own module extension for ``nn.Linear`` inside ``ext``."""
    table = module_extensions(ext)
    rule = table.get(nn.Linear)
    if rule is None or isinstance(rule, CouplingLeafExtension):
        raise NotImplementedError(UNSUPPORTED_MESSAGE.format(ext=type(ext).__name__,
                                                             supported=_supported_names()))
    return rule


# ------------------------------------------------------------------------------ functional blocks
def _block_forward(block: AdditiveCoupling, x: Tensor, du_f, du_g):
    """The block's forward as a function of its input and of (zero) offsets on the inner outputs
    ``u_f``, ``u_g``, so that one VJP gives the transposed Jacobians to all three. Returns the
    output and, as auxiliary data, ``(s_f, u_f, s_g, u_g)``. Module ``__call__`` s are avoided
    (no hooks fire inside BackPACK's backward pass)."""
    x1, x2 = block.split(x)
    f, g = block.f, block.g
    s_f = f.features(x2)[1]
    u_f = linear(s_f, f.linear.weight.detach(), f.linear.bias.detach())
    y1 = x1 + u_f + du_f
    s_g = g.features(y1)[1]
    u_g = linear(s_g, g.linear.weight.detach(), g.linear.bias.detach())
    return torch.cat([y1, x2 + u_g + du_g], dim=-1), (s_f, u_f, s_g, u_g)


def _inner_io(block: AdditiveCoupling, x: Tensor) -> tuple[Tensor, list[tuple[nn.Linear, Tensor,
                                                                               Tensor]]]:
    """Block output and ``(linear, input s, output u)`` of both inner layers (detached)."""
    with torch.no_grad():
        y, (s_f, u_f, s_g, u_g) = _block_forward(block, x, 0.0, 0.0)
    return y, [(block.f.linear, s_f, u_f), (block.g.linear, s_g, u_g)]


class _Pullback:
    """``V ↦ (V_{u_f}, V_{u_g}, V_X)`` at a block input ``x``, for tensors ``[*lead, n, d]``."""

    def __init__(self, block: AdditiveCoupling, x: Tensor) -> None:
        zero = x.new_zeros(*x.shape[:-1], block.half)
        _, self._vjp, _ = vjp(lambda xx, a, b: _block_forward(block, xx, a, b), x, zero,
                              zero.clone(), has_aux=True)

    def __call__(self, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fn = self._vjp
        for _ in range(V.dim() - 2):  # leading dims (K columns of a square-root factor, ...)
            fn = vmap(fn)
        dx, du_f, du_g = fn(V)
        return du_f, du_g, dx


def _map(q, fn):
    """Apply ``fn`` to a backpropagated quantity: a tensor or DiagHessian's signed lists."""
    if isinstance(q, dict):
        return {"matrices": [fn(m) for m in q["matrices"]], "signs": list(q["signs"])}
    return fn(q)


# ------------------------------------------------------------------------------ DiagHessian
def second_derivative(fn: CouplingFunction, h: Tensor) -> Tensor | None:
    """``σ''(h)`` of the half-layer's activation, elementwise, by ``torch.func`` (``grad`` of
    ``grad`` of ``σ`` on every scalar); ``None`` for ``σ'' = 0`` (ReLU, identity).

    Differentiating the forward ``σ`` itself (not its stored ``σ'``) keeps the result the exact
    second derivative of what the block computes (e.g. softplus's linear branch above its
    threshold has ``σ'' = 0``).
    """
    act = fn.activation
    if act.is_linear or act.name in _ZERO_CURVATURE_ACTIVATIONS:
        return None
    flat = h.reshape(-1)
    return vmap(grad(grad(lambda t: act(t))))(flat).reshape(h.shape)


def residual_factors(fn: CouplingFunction, z: Tensor, grad_u: Tensor) -> list[tuple[Tensor, float]]:
    """Signed square-root factors of the half-layer's second-derivative term in its input ``Z``.

    For ``u = σ(Z C) Wᵀ + b`` and the loss gradient ``γ = ∂L/∂u`` (``[N, d/2]``), the term is,
    per sample ``n``, ``R_n = Σ_a γ_{n,a} ∇²_Z u_{n,a} = C diag(r_n) Cᵀ`` with
    ``r_n = σ''(h_n) ⊙ (γ_n W)`` (``h = Z C``, ``γ W = ∂L/∂s``). It is returned as
    ``[(P, +1), (Q, −1)]`` with ``P[m, n] = √max(r_{n,m}, 0) C[:, m]`` and
    ``Q[m, n] = √max(−r_{n,m}, 0) C[:, m]`` (``[M, N, d/2]``), so that
    ``R_n = P[:, n]ᵀ P[:, n] − Q[:, n]ᵀ Q[:, n]``; ``[]`` when ``σ'' = 0``.
    """
    C = fn.projection
    s2 = second_derivative(fn, z @ C)
    if s2 is None:
        return []
    r = s2 * (grad_u @ fn.linear.weight.detach())                     # [N, M]
    return [(torch.einsum("nm,jm->mnj", (sign * r).clamp(min=0).sqrt(), C), sign)
            for sign in (1.0, -1.0)]


def _dense_per_sample(bp: dict) -> Tensor:
    """``H_n = Σ_i ε_i S_i[:, n]ᵀ S_i[:, n]`` for all ``n``: ``[N, w, w]``."""
    mats = [m.flatten(2) for m in bp["matrices"]]
    return sum(sign * torch.einsum("kni,knj->nij", m, m)
               for m, sign in zip(mats, bp["signs"], strict=True))


def compress(bp: dict) -> dict:
    """The same per-sample Hessians ``H_n`` with at most twice the feature width ``w`` columns.

    When the lists hold more than ``2w`` columns in all, ``H_n = Σ_i ε_i S_iᵀ S_i`` is formed
    (``[N, w, w]``) and refactored exactly as ``H_n = L_n L_nᵀ − c_n I``: ``c_n`` is ``1.001``
    times the Gershgorin bound ``max_i Σ_j |H_{n,ij}|`` on ``−λ_min(H_n)`` (1 for ``H_n = 0``), so
    ``H_n + c_n I`` is positive definite and ``L_n`` its Cholesky factor. The lists become
    ``[(L_nᵀ, +1), (√c_n I, −1)]`` (``[w, N, *features]`` each); otherwise ``bp`` is returned
    unchanged. Rounding: ``O(ε c_n)`` per entry, like an eigendecomposition's ``O(ε‖H_n‖)``, at a
    fraction of its cost (a batched ``eigh`` is ~50× slower here).
    """
    mats = bp["matrices"]
    if not mats:
        return bp
    shape = mats[0].shape[1:]                                          # (N, *features)
    width = mats[0][0, 0].numel()
    if sum(m.shape[0] for m in mats) <= 2 * width:
        return bp
    H = _dense_per_sample(bp)
    H = 0.5 * (H + H.mT)                                               # [N, w, w]
    bound = H.abs().sum(-1).amax(-1)                                   # ≥ −λ_min(H_n)
    c = torch.where(bound > 0, bound * 1.001, torch.ones_like(bound))
    eye = torch.eye(width, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + c[:, None, None] * eye)
    if bool((info != 0).any()):  # not expected (H + cI ≥ 0.001·c·I); fall back to eigh
        lam, Q = torch.linalg.eigh(H)
        out = [torch.einsum("nik,nk->kni", Q, (sign * lam).clamp(min=0).sqrt())
               for sign in (1.0, -1.0)]
    else:
        out = [L.permute(2, 0, 1),                                     # S[k, n, i] = L[n, i, k]
               eye[:, None, :] * c.sqrt()[None, :, None]]
    return {"matrices": [m.reshape(width, *shape) for m in out], "signs": [1.0, -1.0]}


# ------------------------------------------------------------------------------ module extension
class CouplingLeafExtension(ModuleExtension):
    """One BackPACK module extension for :class:`AdditiveCoupling` and :class:`RevMLP` leaves.

    It replaces :meth:`ModuleExtension.__call__`: fetch the quantity BackPACK stored for the
    leaf's output, pull it back block by block (the readout ``U`` first, for a RevMLP),
    evaluate the extension's own ``nn.Linear`` rule on every inner layer and store the result on
    its parameters, then store the quantity for the leaf's input. For ``DiagHessian`` and
    ``BatchDiagHessian`` the pulled-back factor lists gain the ``σ''`` residuals of
    :func:`residual_factors` and are kept short by :func:`compress`.
    """

    def __init__(self) -> None:
        super().__init__(params=None)

    # -- structure
    @staticmethod
    def _blocks_and_input(module: nn.Module) -> tuple[list[AdditiveCoupling], Tensor]:
        x = module.input0.detach()
        if isinstance(module, RevMLP):
            return list(module.blocks), x.reshape(x.shape[0], -1)
        return [module], x

    @staticmethod
    def _check(ext: BackpropExtension, x: Tensor) -> None:
        name = type(ext).__name__
        if x.dim() != 2:
            raise NotImplementedError(f"{name} on AdditiveCoupling supports inputs (N, d) only, "
                                      f"got shape {tuple(x.shape)}")
        if isinstance(ext, KFRA):
            raise NotImplementedError(UNSUPPORTED_MESSAGE.format(ext=name,
                                                                 supported=_supported_names()))

    def __call__(self, ext: BackpropExtension, module: nn.Module, g_inp, g_out) -> None:
        blocks, x = self._blocks_and_input(module)
        self._check(ext, x)
        rule = _linear_rule(ext)
        second_order = ext.expects_backpropagation_quantities()
        sub = ext.get_subsampling()

        grad_out = g_out[0].detach()
        bp = None
        if second_order:
            out = module.output
            keep = out.grad_fn is None or getattr(out, "retains_grad", False)
            bp = ext.saved_quantities.retrieve_quantity(out.data_ptr(), not keep)
            if bp is None:
                raise AssertionError(
                    f"BackPACK extension {type(ext).__name__} expects a backpropagation quantity "
                    f"for the output of {type(module).__name__}, but none was stored: is the "
                    "loss extend()-ed and everything between them a supported module?")

        readout = getattr(module, "readout", None) if isinstance(module, RevMLP) else None
        if readout is not None:  # F = Z U  ⇒  V_Z = V Uᵀ
            grad_out = grad_out @ readout.T
            bp = None if bp is None else _map(bp, lambda v: v @ readout.T)

        # inputs of every block (full batch) and their subsampled versions for the pull-backs
        inputs = [x]
        ios = []
        for b in blocks:
            y, io = _inner_io(b, inputs[-1])
            ios.append(io)
            inputs.append(y)
        for idx in reversed(range(len(blocks))):
            b, xin = blocks[idx], inputs[idx]
            g_f, g_g, grad_out = _Pullback(b, xin)(grad_out)
            bp_f = bp_g = None
            if bp is not None:
                xs = xin if sub is None else xin[sub]
                pull = _Pullback(b, xs)
                if isinstance(bp, dict):  # DiagHessian: signed lists of square-root factors
                    bp_f, bp_g, bp = self._pull_diag_hessian(b, xs, inputs[idx + 1], pull, bp,
                                                             g_f, g_g, sub)
                else:
                    bp_f, bp_g, bp = pull(bp)
            for (lin, s, u), gu, bu in zip(ios[idx], (g_f, g_g), (bp_f, bp_g), strict=True):
                self._apply_linear_rule(rule, ext, lin, s, u, gu, bu)

        if second_order and module.input0.requires_grad:
            shape = module.input0.shape
            bp = _map(bp, lambda v: v.reshape(*v.shape[:-2], *shape) if sub is None
                      else v.reshape(*v.shape[:-2], len(sub), *shape[1:]))
            ext.saved_quantities.save_quantity(module.input0.data_ptr(), bp,
                                               ext.accumulate_backpropagated_quantities)

    @staticmethod
    def _pull_diag_hessian(block: AdditiveCoupling, xs: Tensor, y: Tensor, pull: _Pullback,
                           bp: dict, g_f: Tensor, g_g: Tensor, sub) -> tuple[dict, dict, dict]:
        """Pull DiagHessian's signed lists back through one block, adding the ``σ''`` residuals.

        ``bp`` holds factors of the output Hessian ``H_Y``. Returned: the lists for ``u_f``,
        ``u_g`` and the block input ``X``:

        * ``H_{u_g} = [H_Y]_{Y2 Y2}``;
        * ``H_{u_f} = J_{Y,u_f}ᵀ H_Y J_{Y,u_f} + R_g`` with ``R_g`` the ``g`` residual at ``Y1``
          (:func:`residual_factors` with ``γ = ∂L/∂u_g``); a factor ``F`` at ``Y1`` pulls back
          exactly like the output factor ``[F, 0]`` (it reaches ``u_f`` and ``X`` through ``Y1``
          and nothing reaches ``u_g``);
        * ``H_X = J_Xᵀ H_Y J_X + [R_g pulled back to X] + [0, R_f]`` with ``R_f`` the ``f``
          residual at ``X2`` (``γ = ∂L/∂u_f``).
        """
        half = block.half
        y1 = block.split(y if sub is None else y[sub])[0]
        x2 = block.split(xs)[1]
        gf, gg = (g_f, g_g) if sub is None else (g_f[sub], g_g[sub])
        res_g = residual_factors(block.g, y1, gg)
        res_f = residual_factors(block.f, x2, gf)
        lists: list[list[Tensor]] = [[], [], []]
        signs: list[list[float]] = [[], [], []]
        for m, sign in zip(bp["matrices"], bp["signs"], strict=True):
            for i, t in enumerate(pull(m)):
                lists[i].append(t)
                signs[i].append(sign)
        for F, sign in res_g:                                  # at Y1: reaches u_f and X
            F_u, _, F_x = pull(torch.cat([F, F.new_zeros(F.shape)], dim=-1))
            for i, t in ((0, F_u), (2, F_x)):
                lists[i].append(t)
                signs[i].append(sign)
        for F, sign in res_f:                                  # at X2: reaches X only
            lists[2].append(torch.cat([F.new_zeros(*F.shape[:-1], half), F], dim=-1))
            signs[2].append(sign)
        return tuple(compress({"matrices": lst, "signs": sg})
                     for lst, sg in zip(lists, signs, strict=True))

    @staticmethod
    def _apply_linear_rule(rule: ModuleExtension, ext: BackpropExtension, lin: nn.Linear,
                           s: Tensor, u: Tensor, grad_u: Tensor, bp_u) -> None:
        """Evaluate BackPACK's ``nn.Linear`` rule of ``ext`` on one inner layer and save it."""
        lin.input0, lin.output = s, u
        try:
            for name in ("weight", "bias"):
                p = getattr(lin, name)
                if p is not None and p.requires_grad:
                    value = getattr(rule, name)(ext, lin, (None,), (grad_u,), bp_u)
                    setattr(p, ext.savefield, value)
        finally:
            del lin.input0, lin.output


# ------------------------------------------------------------------------------ public helpers
def register(*extensions: BackpropExtension) -> tuple[BackpropExtension, ...]:
    """Give each BackPACK extension instance the module extension for gnrev's leaf modules.

    ``register(*exts)`` sets (``set_module_extension(..., overwrite=True)``) a
    :class:`CouplingLeafExtension` for :class:`~gnrev_plugin.nn.AdditiveCoupling` and
    :class:`~gnrev_plugin.nn.RevMLP` on every extension and returns the same instances, for
    ``with backpack(*register(DiagGGNExact(), BatchGrad())):``.

    Raises:
        NotImplementedError: for an extension outside :data:`SUPPORTED_EXTENSIONS` (the
            message names it and lists the supported ones).
        ValueError: for something that is not a BackPACK extension instance.
    """
    leaf = CouplingLeafExtension()
    for ext in extensions:
        if not isinstance(ext, BackpropExtension):
            raise ValueError(f"register expects BackPACK extension instances, got {ext!r}")
        if not isinstance(ext, SUPPORTED_EXTENSIONS) or isinstance(ext, KFRA):
            raise NotImplementedError(UNSUPPORTED_MESSAGE.format(
                ext=type(ext).__name__, supported=_supported_names()))
        _linear_rule(ext)
        for cls in (AdditiveCoupling, RevMLP):
            ext.set_module_extension(cls, leaf, overwrite=True)
    return extensions


def all_extensions(first_order: bool = True, second_order: bool = True,
                   diag_hessian: bool = False, mc_samples: int = 1) -> list[BackpropExtension]:
    """Fresh, registered instances of the supported extensions, to enable in one call.

    ``with backpack(*all_extensions()):`` computes ``grad_batch``, ``batch_l2``,
    ``sum_grad_squared``, ``variance``, ``diag_ggn_exact``, ``diag_ggn_mc``, ``sqrt_ggn_exact``,
    ``kfac`` and ``kflr`` (plus ``diag_h`` with ``diag_hessian=True``).
    """
    exts: list[BackpropExtension] = []
    if first_order:
        exts += [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()]
    if second_order:
        exts += [DiagGGNExact(), DiagGGNMC(mc_samples=mc_samples), SqrtGGNExact(),
                 KFAC(mc_samples=mc_samples), KFLR()]
    if diag_hessian:
        exts.append(DiagHessian())
    return list(register(*exts))


# ------------------------------------------------------------------------------ process-wide
_LEAF_CLASSES = (AdditiveCoupling, RevMLP)
_STATE_LOCK = threading.Lock()
_uninstallers: list[Callable[[], None]] = []
_FALLBACK_LEAF = CouplingLeafExtension()


def _fallback(ext: BackpropExtension, module: nn.Module) -> ModuleExtension | None:
    """The leaf rule for a gnrev leaf module; ``None`` (BackPACK decides) for anything else, and
    for an extension gnrev cannot support whose fail mode is not ``"ERROR"`` (it keeps warning
    or skipping as it did before :func:`enable`)."""
    if not isinstance(module, _LEAF_CLASSES):
        return None
    supported = isinstance(ext, SUPPORTED_EXTENSIONS) and not isinstance(ext, KFRA)
    if not supported and _compat.fail_mode(ext) != "ERROR":
        return None
    return _FALLBACK_LEAF  # raises NotImplementedError naming an unsupported extension


def _inner_parameter_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The childless modules with parameters inside a gnrev leaf (its inner ``nn.Linear`` s)."""
    for m in module.modules():
        if m is not module and not any(True for _ in m.children()) \
                and any(True for _ in m.parameters(recurse=False)):
            yield m


def _dispatch_hook(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """BackPACK's ``extension_hook``, run on the inner ``nn.Linear`` s of a gnrev leaf (whose
    quantities the leaf extension stored) instead of on the leaf; unchanged on other modules.
    Cockpit's hooks skip modules with children, so without this they would never see the
    RevMLP's parameters."""
    def dispatched(module: nn.Module) -> None:
        if isinstance(module, _LEAF_CLASSES):
            for inner in _inner_parameter_modules(module):
                hook(inner)
        else:
            hook(module)
    return dispatched


def enable() -> None:
    """Make every BackPACK extension instance handle gnrev's leaf modules, process-wide.

    After ``enable()``, any ``BackpropExtension`` instance, created before or after and by any
    tool (Cockpit builds its own), runs :class:`CouplingLeafExtension` on
    :class:`~gnrev_plugin.nn.AdditiveCoupling` and :class:`~gnrev_plugin.nn.RevMLP` modules
    unless the instance has its own entry for them (``set_module_extension`` or
    :func:`register` win), and BackPACK's ``extension_hook`` runs on the leaves' inner
    ``nn.Linear`` s. Unsupported extensions whose fail mode is ``"ERROR"`` raise
    ``NotImplementedError`` naming them; with ``"WARNING"``/``"SILENT"`` they behave as before.

    Idempotent (a second call does nothing) and thread-safe (a lock guards the switch); one
    :func:`disable` undoes it. The state is per process.

    Raises:
        RuntimeError: if the installed BackPACK lacks the structures this relies on
            (:func:`gnrev_plugin.compat.backpack.check_version`).
    """
    with _STATE_LOCK:
        if _uninstallers:
            return
        _compat.check_version()
        _uninstallers.append(_compat.install_module_extension_fallback(_fallback))
        _uninstallers.append(_compat.install_extension_hook_wrapper(_dispatch_hook))


def disable() -> None:
    """Undo :func:`enable` (idempotent; instances set up with :func:`register` keep their
    entries)."""
    with _STATE_LOCK:
        while _uninstallers:
            _uninstallers.pop()()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return bool(_uninstallers)


@contextmanager
def enabled() -> Iterator[None]:
    """``with enabled():`` — :func:`enable` for the body, then back to the previous state."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()
