"""Distributed Gauss-Newton over ``torch.distributed``: the union of all ranks' batches is the batch.

A Gauss-Newton step couples every sample: :class:`~gnrev_plugin.optim.ExactGN` solves each
half-layer's system ``A Δ = E`` through the ``n×n`` Gram ``K = A Aᵀ`` (or the ``(M+1)×(M+1)``
``AᵀA``), :class:`~gnrev_plugin.optim.DenseGN` through ``J Jᵀ``. With ``W`` ranks holding local
batches ``X_r`` (``n_r`` samples, ``n = Σ_r n_r``) the step is therefore **not** an all-reduce of
local steps (DDP's gradient all-reduce would average ``W`` different local GN steps, which is not
the GN step of the union). Instead, per step:

1. **Agree** (:meth:`Comm.agree`): one ``all_gather`` of ``[failed, Σ_i ℓ_i, n_r]`` per rank:
   local validation errors become errors on every rank (no rank is left waiting in a
   collective), and every rank learns the global loss and the local batch sizes (uneven ``n_r``
   are supported: shards are padded to ``max_r n_r`` for the transfer and trimmed after).
2. **Solve, row-split** (ExactGN, :mod:`gnrev_plugin.optim.distributed_solve`): every rank runs
   the inverse-JVP sweeps on its own rows; each half-layer system's Gram is formed in tiles
   (dual: rank ``r`` its share of the lower triangle of ``S Sᵀ`` from the all-gathered
   features; primal: ``B_rᵀB_r``, reduced) and factored on one *owner* rank, the owners chosen
   so that the factorisations run in parallel; ``ΔW = Σ_r S_rᵀΛ_r`` is an all-reduce and the
   residuals ``Σ_r ‖E_r − A_r Δ‖²`` are global, so every rank takes the same decisions and
   applies bitwise the same update. ``solver="svd"`` (which factors ``A`` itself) instead
   **gathers** the rows on the *root* (group rank 0, :meth:`Comm.gather_rows`), solves there
   with the single-process code and **broadcasts** (:meth:`Comm.broadcast_result`) the report
   (or the exception, which every rank then raises) and ``Δθ``.
3. **DenseGN**: the rows of ``J`` (``jacobian="linear"``: each layer's inputs ``a`` and
   output-VJPs ``G``) are all-gathered, rank ``r`` forms its row block ``J_r Jᵀ`` of the Gram,
   the root gathers the blocks, factors ``J Jᵀ`` and broadcasts ``Λ``; ``Δθ = Σ_r J_rᵀ Λ_r`` is
   one all-reduce.

**Costs per step** (``n`` the global batch, ``M`` the width, ``p = M+1`` (or ``d/2+1`` for a
linear block), ``W`` ranks, ``b`` bytes per element), ExactGN, per half-layer system: dual
(``n ≤ p``): an all-gather of ``n·p`` features (every rank receives ``(W−1)/W·n·p·b`` bytes),
``≈ n²p/(2W)`` multiply-adds for the Gram tiles per rank, a gather of ``≈ n²/2`` Gram entries
on the owner, the ``O(n³)`` factorisation on the owner; per solve with ``c`` right-hand columns
a gather and a scatter of ``n·c`` numbers and an all-reduce of ``c·p``. Primal (``n > p``): a
reduce of ``p²`` numbers, ``n_r p²/2`` multiply-adds per rank, the ``O(p³)`` factorisation on
the owner; per solve a reduce and a broadcast of ``c·p``. The sweeps, the products ``S_rᵀΛ_r``
and the achieved changes are row-local (``1/W`` of the one-process work). DenseGN: the
all-gathered Jacobian parts (``n·C × P``, or ``n×(in_ℓ + C·out_ℓ)`` per layer), ``n_r C × nC``
Gram rows per rank, ``Λ`` is ``n·C`` numbers and ``Δθ`` one all-reduce of ``P`` numbers.

All collectives go through this module. Tensors stay on the parameters' device, so NCCL on CUDA
works like gloo on CPU (object collectives pickle small Python objects: the step report or an
exception).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
from torch import nn

from ..nn.discovery import unwrap_compiled

__all__ = ["AUTO", "Comm", "resolve_group", "unwrap_model", "DistributedStepError",
           "contiguous_shard", "mean_over_ranks"]

#: ``process_group=AUTO`` (the optimizers' default): the WORLD group when ``torch.distributed``
#: is initialised with more than one rank, otherwise a single-process step.
AUTO = "auto"


class DistributedStepError(RuntimeError):
    """A distributed Gauss-Newton step failed on another rank (its message is included)."""


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(spec) -> object | None:
    """The process group a Gauss-Newton step runs over, or ``None`` for a single-process step.

    ``spec``: :data:`AUTO` (WORLD when ``torch.distributed`` is initialised with more than one
    rank, else ``None``), ``None`` (never distributed) or a process group, which is honoured
    even with one rank (the collective path then runs with ``W = 1``).

    Raises:
        RuntimeError: a group was given but ``torch.distributed`` is not initialised.
    """
    if spec is None:
        return None
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if isinstance(spec, str):
        if spec != AUTO:
            raise ValueError(f"process_group must be {AUTO!r}, None or a process group, got "
                             f"{spec!r}")
        if not ready:
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if not ready:
        raise RuntimeError("a process_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return spec


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``
    wrappers, nested in any order (else ``model``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif (inner := unwrap_compiled(model)) is not model:
            model = inner
        else:
            return model


def contiguous_shard(n: int, rank: int, world: int) -> slice:
    """Rows of rank ``rank`` when ``n`` rows are split into ``world`` contiguous shards
    (``torch.tensor_split``'s sizes: the first ``n mod world`` shards get one row more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def mean_over_ranks(value: float, n: int, device: torch.device | str = "cpu",
                    group=None) -> float:
    """``Σ_r n_r v_r / Σ_r n_r``: the global-batch mean from each rank's mean ``v_r`` over its
    ``n_r`` samples (one ``all_reduce`` of two numbers; ``device`` must be CUDA for NCCL)."""
    dist = _dist()
    t = torch.tensor([float(value) * n, float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t[0] / t[1])


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any unpicklable exception is sent as its message
        return DistributedStepError(f"{type(err).__name__}: {err}")


class Comm:
    """The collectives of one distributed Gauss-Newton step over ``group`` (module docstring).

    Args:
        group: the process group (:func:`resolve_group`).
        device: where collective tensors live (the parameters' device; CUDA for NCCL).
    """

    def __init__(self, group, device: torch.device) -> None:
        dist = _dist()
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0)
        self.is_root = self.rank == 0
        self.sizes: list[int] = []

    # -- step 1: agreement ------------------------------------------------------------------
    def agree(self, err: BaseException | None, loss_sum: float = 0.0, n_local: int = 0
              ) -> tuple[float, int]:
        """All ranks learn whether any rank failed, the global loss sum and each ``n_r``.

        Raises the local ``err`` on its rank and :class:`DistributedStepError` (naming the first
        failing rank and its message) on the others. Returns ``(Σ_r loss_sum_r, n)`` and records
        ``sizes = [n_0, …, n_{W−1}]``.
        """
        dist = _dist()
        mine = torch.tensor([1.0 if err is not None else 0.0, float(loss_sum), float(n_local)],
                            dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        table = torch.stack(parts).cpu()
        failed = [r for r in range(self.world) if table[r, 0] > 0]
        if failed:
            errors: list = [None] * self.world
            dist.all_gather_object(errors, None if err is None else _picklable(err),
                                   group=self.group)
            if err is not None:
                raise err
            first = failed[0]
            raise DistributedStepError(f"the Gauss-Newton step failed on rank {first}: "
                                       f"{type(errors[first]).__name__}: {errors[first]}; the "
                                       "parameters were not changed")
        self.sizes = [int(v) for v in table[:, 2].tolist()]
        return float(table[:, 1].sum()), sum(self.sizes)

    def offset(self, rank: int | None = None) -> int:
        """First global row of ``rank`` (default: this rank) in the gathered batch."""
        rank = self.rank if rank is None else rank
        return sum(self.sizes[:rank])

    # -- step 2: gather ---------------------------------------------------------------------
    def gather_rows(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Concatenate each ``tensors[j]`` (``n_r × …`` on rank ``r``) over ranks on the root.

        One ``gather`` of a single packed buffer (all tensors in the dtype of the first one,
        padded to ``max_r n_r`` rows). Returns the global tensors (``n × …``, rank order) on the
        root, ``None`` elsewhere. Tensors that view the same memory (ReLU's ``h`` and ``s``) are
        sent once. Call :meth:`agree` first (it records the sizes).
        """
        dist = _dist()
        if not tensors:
            raise ValueError("gather_rows needs at least one tensor")
        uniq: list[torch.Tensor] = []
        where: list[int] = []
        for t in tensors:
            k = next((i for i, u in enumerate(uniq) if _same(u, t)), None)
            if k is None:
                uniq.append(t)
                k = len(uniq) - 1
            where.append(k)
        n_local = self.sizes[self.rank]
        dtype = uniq[0].dtype
        for t in uniq:
            if t.shape[0] != n_local:
                raise ValueError(f"gather_rows: a tensor has {t.shape[0]} rows, the local batch "
                                 f"{n_local}")
        widths = [t[0].numel() if n_local else int(torch.Size(t.shape[1:]).numel())
                  for t in uniq]
        width = sum(widths)
        rows = max(self.sizes)
        buf = torch.zeros(rows, width, dtype=dtype, device=self.device)
        col = 0
        for t, w in zip(uniq, widths, strict=True):
            buf[:n_local, col:col + w] = t.reshape(n_local, w)
            col += w
        bufs = [torch.empty_like(buf) for _ in range(self.world)] if self.is_root else None
        dist.gather(buf, bufs, dst=self.root, group=self.group)
        if not self.is_root:
            return None
        full = torch.cat([b[:s] for b, s in zip(bufs, self.sizes, strict=True)])
        out, col = [], 0
        for t, w in zip(uniq, widths, strict=True):
            out.append(full[:, col:col + w].reshape(full.shape[0], *t.shape[1:]).to(t.dtype))
            col += w
        return [out[k] for k in where]

    # -- step 3: results --------------------------------------------------------------------
    def broadcast_result(self, outcome: object, flat: torch.Tensor | None) -> tuple:
        """Send the root's ``outcome`` (a report object or an exception) and ``flat`` update.

        Non-root ranks pass ``flat=None`` and receive a tensor of the root's length and dtype.
        Raises the root's exception on every rank (the parameters are then unchanged).
        Returns ``(outcome, flat)``.
        """
        dist = _dist()
        meta = [None]
        if self.is_root:
            if isinstance(outcome, BaseException):
                outcome = _picklable(outcome)
            meta = [(outcome, None if flat is None else (flat.numel(), flat.dtype))]
        dist.broadcast_object_list(meta, src=self.root, group=self.group)
        outcome, shape = meta[0]
        if isinstance(outcome, BaseException):
            raise outcome
        if shape is None:
            return outcome, None
        if not self.is_root:
            flat = torch.empty(shape[0], dtype=shape[1], device=self.device)
        flat = flat.contiguous()
        dist.broadcast(flat, src=self.root, group=self.group)
        return outcome, flat

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``Σ_r t_r`` on every rank (in place; every rank receives bitwise the same sum)."""
        _dist().all_reduce(t, group=self.group)
        return t

    # -- the row-split solve (:mod:`gnrev_plugin.optim.distributed_solve`) --------------------
    @property
    def n_total(self) -> int:
        """The global batch ``n = Σ_r n_r`` (after :meth:`agree`)."""
        return sum(self.sizes)

    def _global(self, rank: int) -> int:
        return _dist().get_global_rank(self.group, rank)

    def check(self, err: BaseException | None) -> None:
        """Raise on every rank if any rank failed: for a failure of the *global* system (e.g. a
        Gram factored on its owner), so every rank raises the first failing rank's exception
        (its own where it failed). One all-reduce when nothing failed."""
        flag = torch.tensor([0.0 if err is None else 1.0], dtype=torch.float64,
                            device=self.device)
        _dist().all_reduce(flag, group=self.group)
        if float(flag) == 0.0:
            return
        errors: list = [None] * self.world
        _dist().all_gather_object(errors, None if err is None else _picklable(err),
                                  group=self.group)
        raise err if err is not None else next(e for e in errors if e is not None)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[t_0; t_1; …]`` (``n × w``) on every rank from each rank's ``n_r × w`` block."""
        w, n_local = t.shape[1], self.sizes[self.rank]
        buf = torch.zeros(max(self.sizes), w, dtype=t.dtype, device=self.device)
        buf[:n_local] = t
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        _dist().all_gather(parts, buf, group=self.group)
        return torch.cat([b[:s] for b, s in zip(parts, self.sizes, strict=True)])

    def gather_flat(self, vec: torch.Tensor, lengths: Sequence[int], dst: int
                    ) -> list[torch.Tensor] | None:
        """Each rank's 1-D ``vec`` (``lengths[r]`` numbers) on group rank ``dst`` (a list in rank
        order), ``None`` elsewhere."""
        buf = torch.zeros(max(max(lengths), 1), dtype=vec.dtype, device=self.device)
        buf[:vec.numel()] = vec
        bufs = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == dst else None
        _dist().gather(buf, bufs, dst=self._global(dst), group=self.group)
        return None if bufs is None else [b[:n] for b, n in zip(bufs, lengths, strict=True)]

    def gather_rows_to(self, t: torch.Tensor, dst: int) -> torch.Tensor | None:
        """``[t_0; t_1; …]`` (``n × w``) on group rank ``dst`` only (``None`` elsewhere)."""
        w = t.shape[1]
        got = self.gather_flat(t.reshape(-1), [s * w for s in self.sizes], dst)
        return None if got is None else torch.cat(got).reshape(-1, w)

    def scatter_rows(self, full: torch.Tensor | None, src: int, width: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """This rank's rows of ``full`` (``n × width``, given on group rank ``src`` only)."""
        rows, n_local = max(self.sizes), self.sizes[self.rank]
        out = torch.empty(rows, width, dtype=dtype, device=self.device)
        chunks = None
        if self.rank == src:
            chunks, start = [], 0
            for s in self.sizes:
                c = torch.zeros(rows, width, dtype=dtype, device=self.device)
                c[:s] = full[start:start + s]
                chunks.append(c)
                start += s
        _dist().scatter(out, chunks, src=self._global(src), group=self.group)
        return out[:n_local]

    def reduce_to(self, t: torch.Tensor, dst: int) -> torch.Tensor | None:
        """``Σ_r t_r`` on group rank ``dst`` (``None`` elsewhere; ``t`` is overwritten)."""
        t = t.contiguous()
        _dist().reduce(t, dst=self._global(dst), group=self.group)
        return t if self.rank == dst else None

    def broadcast_from(self, t: torch.Tensor | None, src: int, shape: Sequence[int],
                       dtype: torch.dtype) -> torch.Tensor:
        """Group rank ``src``'s ``t`` (of ``shape`` and ``dtype``) on every rank."""
        if self.rank != src:
            t = torch.empty(*shape, dtype=dtype, device=self.device)
        t = t.contiguous()
        _dist().broadcast(t, src=self._global(src), group=self.group)
        return t

    def sum_squares(self, *tensors: torch.Tensor) -> list[float]:
        """``Σ_r ‖t_r‖²`` of each of ``tensors`` over the ranks (one all-reduce)."""
        t = torch.stack([x.to(torch.float64).square().sum() for x in tensors])
        _dist().all_reduce(t, group=self.group)
        return t.tolist()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` view the same memory the same way (e.g. ReLU's ``h`` and ``s``, two
    ``detach()`` of one tensor)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype)


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat vector of ``tensors`` (in ``dtype``, default the first one's)."""
    dtype = dtype or tensors[0].dtype
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split ``flat`` back into tensors shaped like ``like``."""
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out
