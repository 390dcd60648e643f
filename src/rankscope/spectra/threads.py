"""One torch intra-op thread while rankscope's spectral numerics run on the CPU.

The heavy work of a diagnosis is numpy's BLAS and LAPACK (Gram products, eigensolves); torch does only small
steps between them (dtype conversions, reductions, QRs of head factors). With several torch threads, torch's
OpenMP workers spin after each of those steps and take the cores that the next BLAS call's threads need: on
this 2-core machine that doubled MiniLM's analysis (1.3 s against 0.65 s) and made GPT-2-small's 1.6× slower,
while BLAS threads alone keep their speed-up on wide matrices (768-wide eigensolves 31 → 22 ms on 2 threads).
The thread count is restored on exit; nested uses cost nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the caller's count."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_one_torch_thread(fn: F) -> F:
    """``fn`` run under ``torch_threads(1)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
