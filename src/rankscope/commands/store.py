"""``rankscope sql`` and ``rankscope store check``: a run store's rows, and what in it a reader skips."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape

from rankscope.errors import InputError
from rankscope.rundir import METRICS
from rankscope.store import RunStore
from rankscope.store.check import check, repair
from rankscope.store.parts import StoreWarning, metrics_dirs


def query_store(console: Console, root: Path, query: str, allow_writes: bool = False) -> pd.DataFrame:
    """The rows of ``query`` over the run store(s) under ``root``; each part skipped is said in one line."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", StoreWarning)
        try:
            return RunStore(root).sql(query, allow_writes=allow_writes)
        finally:
            for w in said:
                if issubclass(w.category, StoreWarning):
                    console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", soft_wrap=True)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_store(console: Console, root: Path, *, fix: bool = False) -> int:
    """Print the problems of the store(s) under ``root`` (and, with ``fix``, what was moved to quarantine); the
    exit code: 0 clean (or clean after the repair), 1 problems left."""
    if not root.is_dir():
        raise InputError(f"{root}: no such run directory")
    directories = metrics_dirs(root, METRICS)
    if not directories:
        raise InputError(f"{root}: no {METRICS}/ directory here or below: not a run or study directory")
    problems = check(root)
    for p in problems:
        console.print(f"[yellow]{p.kind}[/yellow]: {escape(str(p.path))}: {escape(p.detail)}", soft_wrap=True)
    if not fix:
        if problems:
            console.print(f"{len(problems)} problems in {escape(str(root))}; `rankscope store check "
                          f"{escape(str(root))} --repair` moves them to {METRICS}/quarantine/", soft_wrap=True)
            return 1
        console.print(f"{escape(str(root))}: clean ({len(directories)} store{'s' * (len(directories) > 1)})")
        return 0
    for line in repair(root):
        console.print(escape(line), soft_wrap=True)
    left = check(root)
    if left:
        console.print(f"[red]{len(left)} problems left after the repair[/red]")
        return 1
    console.print(f"{escape(str(root))}: clean" + (" after the repair" if problems else ""))
    return 0

