"""Launch a training job on ``N`` local processes (``gnrev train --nproc N``): launch and shards.

:func:`launch` starts ``N`` processes through torch.distributed's own launcher
(:func:`torch.distributed.launcher.api.elastic_launch`, as ``torchrun --standalone`` does: a c10d
rendezvous on a free local port), initialises the default process group in each (gloo on CPU,
NCCL on CUDA, one GPU per local rank) and calls the entry point. Every rank builds the same model
from the registry with the same seed and walks the same batch order; each step, rank ``r`` takes
the contiguous shard ``r`` of the global batch (:func:`local_rows`), and the Gauss-Newton
optimizers step on the union of the shards (:mod:`gnrev_plugin.optim.distributed`), i.e. on the
global batch, exactly as one process would. Only rank 0 writes the run directory and prints.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

import torch

from gnrev_plugin.optim.distributed import contiguous_shard

__all__ = ["launch", "local_rows", "check_batching", "rank_and_world", "is_root",
           "backend_for"]


def rank_and_world() -> tuple[int, int]:
    """The position of this process.

    Returns:
        ``(rank, world size)`` of the default process group, ``(0, 1)`` when not initialised.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_root() -> bool:
    """Whether this process writes the run's files.

    Returns:
        ``True`` on rank 0 or the only process.
    """
    return rank_and_world()[0] == 0


def local_rows(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous shard of a global batch's indices.

    Args:
        idx: the global batch's sample indices.

    Returns:
        The shard of this rank (all of ``idx`` on one process).
    """
    rank, world = rank_and_world()
    return idx if world == 1 else idx[contiguous_shard(len(idx), rank, world)]


def check_batching(n: int, batch_size: int, nproc: int) -> None:
    """Refuse a global batch that ``nproc`` ranks cannot share evenly.

    Args:
        n: training samples per epoch.
        batch_size: the global batch size.
        nproc: number of processes.

    Raises:
        ValueError: ``batch_size`` is not divisible by ``nproc``, or the last batch of an epoch
            (``n mod batch_size`` samples) would leave a rank without samples.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be ≥ 1, got {nproc}")
    if batch_size % nproc:
        raise ValueError(f"the global batch size {batch_size} is not divisible by --nproc "
                         f"{nproc}: each of the {nproc} processes takes an equal contiguous "
                         "shard of every batch")
    rest = n % batch_size
    if rest and rest < nproc:
        raise ValueError(f"the last batch of each epoch has {rest} samples ({n} mod "
                         f"{batch_size}), fewer than --nproc {nproc}; change --train-size or "
                         "--batch-size")


def backend_for(device: str) -> str:
    """The process-group backend of a device.

    Args:
        device: a torch device string.

    Returns:
        ``"nccl"`` for a CUDA device, ``"gloo"`` otherwise.
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _entry(fn: Callable, backend: str, quiet: bool, *args):
    """Runs in each launched process: initialise the process group (``env://``), silence
    non-root stdout if ``quiet``, call ``fn(*args)``, tear down."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    if quiet and dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, nproc: int, *args, backend: str = "gloo", quiet: bool = True) -> dict:
    """Run ``fn(*args)`` on ``nproc`` local processes (module docstring); ``fn`` must be a
    module-level function (the processes are spawned).

    Args:
        fn: the entry point.
        nproc: number of processes.
        *args: ``fn``'s arguments.
        backend: the process-group backend (:func:`backend_for`).
        quiet: silence the stdout of ranks other than 0.

    Returns:
        ``{rank: fn's return value}``.

    Raises:
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a process failed
            (its traceback was printed by that process).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          run_id=f"gnrev-{uuid.uuid4().hex[:8]}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, _entry)(fn, backend, quiet, *args)
