"""Thread budgets, explicit: the caller opens one; nothing in rankscope changes a process's threads on its own.

``thread_budget(torch=…, blas=…)`` sets torch's intra-op threads and the BLAS libraries' threads (numpy's and
scipy's OpenBLAS or MKL, through threadpoolctl) for a block and gives the caller's counts back after, errors
included. Both settings are process-wide, so open it where you own the process: a command, a training run, a
script. The heavy work of a diagnosis is BLAS and LAPACK (Gram products, eigensolves); torch does small steps
between them, and with several torch threads its OpenMP workers spin after each step and take the cores the
next BLAS call needs. So the commands run the numerics with one torch thread and ``free_cores()`` BLAS threads
(README, "Speed").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch


def free_cores() -> int:
    """Cores not busy right now: usable cores minus the 1-minute load average (at least 1)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(usable, int(usable - busy + 0.5)))


@contextmanager
def thread_budget(torch: int | None = None, blas: int | None = None) -> Iterator[None]:
    """Run the block with ``torch`` intra-op threads and ``blas`` BLAS threads (None: leave it), then restore."""
    with ExitStack() as stack:
        if torch is not None:
            stack.enter_context(_torch_threads(torch))
        if blas is not None:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(blas, user_api="blas"))
        yield


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
