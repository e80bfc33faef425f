"""Small factorisations on one intra-op thread (:class:`single_threaded`)."""

from __future__ import annotations

import threading

import torch

__all__ = ["SINGLE_THREAD_MAX", "single_threaded"]

_THREAD_LOCK = threading.RLock()
_THREAD_DEPTH = 0
_THREAD_SAVED = 1


#: Gram systems smaller than this are factored and solved on one thread; larger ones use the
#: configured thread count (a 1024×1024 float64 Cholesky gains from two threads on an idle
#: machine, and is large enough per synchronisation not to collapse when the CPU is busy).
SINGLE_THREAD_MAX = 768


class single_threaded:  # noqa: N801 - a context manager, like torch.no_grad
    """Run the enclosed (small) factorisations and solves on one intra-op thread.

    ``single_threaded(False)`` does nothing (for systems large enough to gain from threads).

    LAPACK factorisations of a few hundred rows synchronise their threads once per panel; when
    another process holds the cores each synchronisation waits for a time slice, and a 128×128
    ``eigh`` was measured at 4.6 s instead of 9 ms. One thread has no such waits. Re-entrant; the
    previous thread count is restored on exit.

    Args:
        active: ``False`` to do nothing.
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active

    def __enter__(self) -> single_threaded:
        global _THREAD_DEPTH, _THREAD_SAVED
        if not self.active:
            return self
        _THREAD_LOCK.acquire()
        if _THREAD_DEPTH == 0:
            _THREAD_SAVED = torch.get_num_threads()
            if _THREAD_SAVED != 1:
                torch.set_num_threads(1)
        _THREAD_DEPTH += 1
        return self

    def __exit__(self, *exc) -> None:
        global _THREAD_DEPTH
        if not self.active:
            return
        _THREAD_DEPTH -= 1
        if _THREAD_DEPTH == 0 and _THREAD_SAVED != 1:
            torch.set_num_threads(_THREAD_SAVED)
        _THREAD_LOCK.release()

