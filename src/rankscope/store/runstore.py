"""The run store: diagnosis rows as Parquet parts, read through DuckDB views (DESIGN.md §6).

A run directory holds ``metrics/<table>-<stamp>.parquet`` parts. A part is written to a hidden temporary
name and renamed into place, so a reader (``rankscope sql`` while training runs) never sees half a file and
a ``kill -9`` loses at most the rows since the last flush. Rows are flushed whole steps at a time, so a
step is either fully stored or absent; ``steps(table)`` lets a resumed run skip steps already written,
and a (run, step, layer, head, kind) key is never written twice.

Tables: ``qk`` (attention forms: qk, qk_content, qk_rope, ov), ``weights`` (single matrices), ``spectra``
(eigenvalues and fitted-null quantiles of each attention form, for figures), ``repr`` (representation
metrics) and ``train`` (loss, validation loss, learning rate, throughput, monitor time).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pandas as pd

from rankscope.errors import InputError

TABLES = ("qk", "weights", "spectra", "repr", "train")


def _part_glob(root: Path, table: str) -> str:
    """The parts of ``table`` under ``root``: a run directory, or a study directory holding many runs."""
    if (root / "metrics").is_dir():
        return str(root / "metrics" / f"{table}-*.parquet")
    return str(root / "**" / "metrics" / f"{table}-*.parquet")


class RunStore:
    """Append rows to a run's Parquet parts and query them (and any run or study directory) with SQL.

    >>> store = RunStore(run_dir); store.append("qk", rows); store.flush()
    >>> store.sql("select layer, max(outliers) from qk group by layer")
    """

    def __init__(self, root: str | Path, run: str | None = None):
        self.root = Path(root)
        self.run = run if run is not None else self.root.name
        self._pending: dict[str, list[dict]] = defaultdict(list)

    # ---- writing ----------------------------------------------------------------------------------------
    def append(self, table: str, rows: list[dict] | pd.DataFrame) -> None:
        """Buffer rows for ``table`` (written at the next ``flush``); each row gets this store's ``run``."""
        if table not in TABLES:
            raise InputError(f"unknown table {table!r}; the run store has {list(TABLES)}")
        rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
        self._pending[table].extend({"run": self.run, **r} for r in rows)

    def flush(self) -> list[Path]:
        """Write every buffered table as one new part (temporary name, then an atomic rename)."""
        import duckdb

        written = []
        directory = self.root / "metrics"
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
    def tables(self) -> list[str]:
        """The tables that have at least one part."""
        import glob

        return [t for t in TABLES if glob.glob(_part_glob(self.root, t), recursive=True)]

    def connect(self):
        """A DuckDB connection with one view per table that has parts."""
        import duckdb

        con = duckdb.connect()
        for table in self.tables():
            pattern = _part_glob(self.root, table).replace("'", "''")
            con.execute(f"create view {table} as select * from read_parquet('{pattern}', union_by_name=true)")
        return con

    def sql(self, query: str) -> pd.DataFrame:
        """Run a query over the views (``qk``, ``weights``, ``spectra``, ``repr``, ``train``)."""
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
