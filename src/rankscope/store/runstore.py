"""The run store: diagnosis rows as Parquet parts, read through DuckDB views (docs/design.md §6).

A run directory holds ``metrics/<table>-<stamp>.parquet`` parts. A part is written to a hidden temporary name
and renamed into place, so a reader (``rankscope sql`` while training runs) never sees half a file. A flush
writes one part per table, one after the other: the parts of one flush are not written atomically together, so
a ``kill -9`` between two of them can leave a step with some tables' rows and not others' (the monitor keeps
whole steps per table, and a resumed run skips a step found in any of its tables).

Tables: ``attention`` (every attention form: qk, qk_content, qk_rope, ov), ``weights`` (single matrices),
``spectra`` (eigenvalues and fitted-null quantiles of each attention form, for figures), ``repr``
(representation metrics) and ``train`` (loss, validation loss, learning rate, throughput, monitor time); views
``qk`` (the query–key kinds of ``attention``) and ``ov``. Parts named ``qk-*`` (earlier versions kept every
attention row there) are read as ``attention``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pandas as pd

from rankscope.errors import InputError
from rankscope.rundir import METRICS
from rankscope.vocab import OV, QK_KINDS

TABLES = ("attention", "weights", "spectra", "repr", "train")
VIEWS = {  # views over the tables, by kind
    "qk": ("attention", "kind in (" + ", ".join(f"'{k}'" for k in QK_KINDS) + ")"),
    "ov": ("attention", f"kind = '{OV}'"),
}
_LEGACY_PARTS = {"attention": ("qk",)}  # part-name prefixes of earlier versions read into a table


def _part_globs(root: Path, table: str) -> list[str]:
    """The part globs of ``table`` under ``root``: a run directory, or a study directory holding many runs."""
    base = root / METRICS if (root / METRICS).is_dir() else root / "**" / METRICS
    return [str(base / f"{prefix}-*.parquet") for prefix in (table, *_LEGACY_PARTS.get(table, ()))]


class RunStore:
    """Append rows to a run's Parquet parts and query them (and any run or study directory) with SQL.

    >>> store = RunStore(run_dir); store.append("attention", rows); store.flush()
    >>> store.sql("select layer, max(outliers) from qk group by layer")
    """

    def __init__(self, root: str | Path, run: str | None = None, sweep: str | None = None):
        self.root = Path(root)
        self.run = run if run is not None else self.root.name
        self._tags = {"run": self.run} if sweep is None else {"run": self.run, "sweep": sweep}  # every row's
        self._pending: dict[str, list[dict]] = defaultdict(list)

    # ---- writing ----------------------------------------------------------------------------------------
    def append(self, table: str, rows: list[dict] | pd.DataFrame) -> None:
        """Buffer rows for ``table`` (written at the next ``flush``); each row gets this store's ``run`` (and
        ``sweep``, when the store was given one)."""
        if table not in TABLES:
            raise InputError(f"unknown table {table!r}; the run store has {list(TABLES)}")
        rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
        self._pending[table].extend({**self._tags, **r} for r in rows)

    def flush(self) -> list[Path]:
        """Write every buffered table as one new part (temporary name, then an atomic rename)."""
        import duckdb

        written = []
        directory = self.root / METRICS
        directory.mkdir(parents=True, exist_ok=True)
        with duckdb.connect() as con:
            for table, rows in list(self._pending.items()):
                if not rows:
                    continue
                frame = pd.DataFrame(rows)
                stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
                final = directory / f"{table}-{stamp}.parquet"
                tmp = directory / f".tmp-{table}-{stamp}.parquet"
                con.register("frame", frame)
                con.execute(f"copy (select * from frame) to '{tmp}' (format parquet)")
                con.unregister("frame")
                with open(tmp, "rb") as fh:  # the bytes are on disk before the name appears
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
                written.append(final)
                self._pending[table] = []
        return written

    # ---- reading ----------------------------------------------------------------------------------------
    def _parts(self) -> dict[str, list[str]]:
        """Table → its part globs that match at least one file (tables without parts are left out)."""
        import glob

        found = {t: [g for g in _part_globs(self.root, t) if glob.glob(g, recursive=True)] for t in TABLES}
        return {t: globs for t, globs in found.items() if globs}

    def tables(self) -> list[str]:
        """The tables and views that have at least one part."""
        have = list(self._parts())
        return have + [v for v, (base, _) in VIEWS.items() if base in have]

    def connect(self):
        """A DuckDB connection with one view per table that has parts, and the kind views over them."""
        import duckdb

        con = duckdb.connect()
        parts = self._parts()
        for table, globs in parts.items():
            patterns = ", ".join("'" + g.replace("'", "''") + "'" for g in globs)
            con.execute(f"create view {table} as select * from read_parquet([{patterns}], union_by_name=true)")
        for view, (base, where) in VIEWS.items():
            if base in parts:
                con.execute(f"create view {view} as select * from {base} where {where}")
        return con

    def sql(self, query: str) -> pd.DataFrame:
        """Run a query over the views (``attention``, ``qk``, ``ov``, ``weights``, ``spectra``, ``repr``, ``train``)."""
        import duckdb

        with self.connect() as con:
            try:
                return con.execute(query).df()
            except duckdb.Error as exc:
                have = ", ".join(self.tables()) or "none yet"
                raise InputError(f"{self.root}: {str(exc).splitlines()[0]} (tables with rows: {have})") from None

    def steps(self, table: str) -> set[int]:
        """The steps of this run already stored in ``table`` (a resumed run skips them)."""
        if table not in self.tables():
            return set()
        run = self.run.replace("'", "''")
        frame = self.sql(f"select distinct step from {table} where run = '{run}'")
        return set(int(s) for s in frame["step"])
