"""Thread budgets, explicit, and worker processes of one thread each.

``thread_budget(torch=…, blas=…)`` sets torch's intra-op threads and the BLAS libraries' threads (numpy's and
scipy's OpenBLAS or MKL, through threadpoolctl) for a block and gives the caller's counts back after, errors
included. Both settings are process-wide. The heavy work of a diagnosis is BLAS and LAPACK (Gram products,
eigensolves); torch does small steps between them. With several torch threads, torch's OpenMP workers spin after
each step and take the cores the next BLAS call needs; with several BLAS threads and another process busy on one
core, every BLAS call waits for its descheduled thread. So the entry points (``analyze``, ``Monitor``, the
commands) run the numerics with one torch and one BLAS thread by default, and parallelism comes from worker
processes (``worker_pool``), one torch and one BLAS thread each. The primitives (``diagnose``) change nothing
unless asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from rankscope.errors import InputError


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cores() -> int:
    """Cores not busy right now: usable cores minus the 1-minute load average (at least 1)."""
    usable = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(usable, int(usable - busy + 0.5)))


def check_count(n, what: str) -> int:
    """``n`` as a thread count: a positive int (``InputError`` naming ``what`` otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"{what} must be a positive count; got {n!r}")
    return n


def check_jobs(jobs, what: str = "jobs") -> int:
    """``jobs`` as a number of worker processes: an int from 1 to ``usable_cores()`` (``InputError`` naming
    ``what``: more processes than cores only wait on each other)."""
    cores = usable_cores()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= cores:
        raise InputError(f"{what} must be a positive number of processes, at most the {cores} usable cores; "
                         f"got {jobs!r}")
    return jobs


@contextmanager
def thread_budget(torch: int | None = None, blas: int | None = None) -> Iterator[None]:
    """Run the block with ``torch`` intra-op threads and ``blas`` BLAS threads (None: leave it), then restore."""
    if torch is not None:
        check_count(torch, "torch threads")
    if blas is not None:
        check_count(blas, "BLAS threads")
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


def worker_context(preload: Sequence[str] = ()):
    """The multiprocessing context of fresh worker processes, no forked torch/OpenMP state: forkserver (its server
    imports the ``preload`` modules once, each worker forks from it) where the platform has it, else spawn."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rankscope.spectra.threads", *preload])
    return context


def worker_pool(jobs: int, *, blas: int = 1, context=None, initializer: Callable | None = None,
                initargs: tuple = ()):
    """A ``ProcessPoolExecutor`` of ``jobs`` worker processes (``context``: ``worker_context()``'s), each set to
    one torch thread and ``blas`` BLAS threads for its life (the process is the pool's), then
    ``initializer(*initargs)``."""
    import concurrent.futures as cf

    check_jobs(jobs)
    check_count(blas, "BLAS threads")
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context or worker_context(),
                                  initializer=_start_worker, initargs=(blas, initializer, initargs))


def _start_worker(blas: int, initializer: Callable | None, initargs: tuple) -> None:
    """A pool worker's start: one torch thread and ``blas`` BLAS threads, kept (not restored: the process is the
    pool's), then the caller's initializer."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(blas, user_api="blas")
    if initializer is not None:
        initializer(*initargs)
