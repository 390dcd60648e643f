"""The run store: diagnosis rows as Parquet parts, committed per flush, read through DuckDB views (design §6).

A run directory holds ``metrics/<table>-<stamp>.parquet`` parts and ``metrics/commit-<stamp>.json`` commits
(``store.parts`` has the layout). A flush writes one part per table that has rows, then one commit naming them;
each file goes to a hidden temporary name, is fsynced and renamed. Readers, and ``steps`` (what a resumed run
skips), see a part only once its commit exists and every part of that commit reads, so a flush is visible whole
or not at all: a ``kill -9`` at any instant loses at most the rows since the last commit, and never leaves a step
with its rows in one table and not in another. A part that does not read (truncated, zero bytes, not Parquet,
another schema) is skipped with one ``StoreWarning`` naming it, together with the rest of its commit;
``rankscope store check RUN [--repair]`` lists such files and moves them to ``metrics/quarantine/``.
Directories written by earlier versions (no commits) are read part by part.

Tables: ``attention`` (every attention form: qk, qk_content, qk_rope, ov), ``weights`` (single matrices),
``spectra`` (eigenvalues and fitted-null quantiles of each attention form, for figures), ``repr``
(representation metrics) and ``train`` (loss, validation loss, learning rate, throughput, monitor time); views
``qk`` (the query–key kinds of ``attention``) and ``ov``. Parts named ``qk-*`` (earlier versions kept every
attention row there) are read as ``attention``, and their column ``head`` as ``head_index``.

Paths never reach SQL: parts are listed in Python and handed to DuckDB as Arrow datasets. ``sql`` is read-only
unless asked (only SELECT-like statements, and DuckDB's file access switched off after the views exist).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from rankscope.errors import InputError
from rankscope.rundir import METRICS
from rankscope.store import parts as P
from rankscope.store.parts import TABLES
from rankscope.vocab import OV, QK_KINDS

VIEWS = {  # views over the tables, by kind
    "qk": ("attention", "kind in (" + ", ".join(f"'{k}'" for k in QK_KINDS) + ")"),
    "ov": ("attention", f"kind = '{OV}'"),
}
RENAMED = {"head": "head_index"}  # columns of earlier versions' parts → their name now
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")  # what ``sql`` runs without ``allow_writes``


def readable_parts(root: Path, deep: bool = False) -> dict[str, list[tuple[Path, object]]]:
    """Table → (part path, Arrow schema) of every part a reader may take under ``root`` (a run or a study):
    committed, whole, and in a commit whose every part reads (its footer; ``deep``: every page). Skipped files
    get one ``StoreWarning`` each."""
    found: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for directory in P.metrics_dirs(root, METRICS):
        layout = P.scan(directory)
        for path, reason in layout.bad_commits.items():
            P.warn_once(path, f"{path}: commit skipped, {reason}; its parts are not read "
                              f"(`rankscope store check` lists them)")
        for unit in layout.units():
            problem = P.unit_problem(directory, unit, deep=deep)
            if problem is not None:
                name, reason = problem
                others = f", with the {len(unit) - 1} other parts of its commit" if len(unit) > 1 else ""
                P.warn_once(directory / name, f"{directory / name}: run-store part skipped ({reason}){others}; "
                                              f"`rankscope store check {directory.parent}` lists it, --repair "
                                              f"moves it to quarantine")
                continue
            schemas = [(directory / e["name"], e["table"], P.read_schema(directory / e["name"])) for e in unit]
            gone = next(((path, why) for path, _, why in schemas if isinstance(why, str)), None)
            if gone is not None:  # moved or damaged since it was checked (a repair running now): skip the unit
                P.warn_once(gone[0], f"{gone[0]}: run-store part skipped ({gone[1]})")
                continue
            for path, table, schema in schemas:
                found[table].append((path, schema))
    return dict(found)


def _register(con, table: str, parts: list[tuple[Path, object]]) -> None:
    """The view ``table`` over ``parts``: one Arrow dataset per distinct schema, joined by column name, with the
    columns of earlier versions renamed."""
    import pyarrow.dataset as ds
    from pyarrow import fs

    groups: dict[tuple, list[tuple[Path, object]]] = defaultdict(list)
    for path, schema in parts:
        groups[tuple(sorted((f.name, str(f.type)) for f in schema))].append((path, schema))
    selects = []
    options = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))
    for i, members in enumerate(groups.values()):
        schema = members[0][1].remove_metadata()
        dataset = ds.dataset([str(p) for p, _ in members], schema=schema, format=options,
                             filesystem=fs.LocalFileSystem())
        name = f"_{table}_{i}"
        con.register(name, dataset)
        renames = [f'"{old}" as "{new}"' for old, new in RENAMED.items()
                   if old in schema.names and new not in schema.names]
        selects.append(f"select * rename ({', '.join(renames)}) from {name}" if renames else f"select * from {name}")
    con.execute(f"create view {table} as " + " union all by name ".join(selects))


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
        """Write every buffered table as one part, then the commit naming them (each atomically): the rows of
        this flush become visible together. On an error nothing is committed and the rows stay buffered."""
        import duckdb

        todo = {t: rows for t, rows in self._pending.items() if rows}
        if not todo:
            return []
        directory = self.root / METRICS
        P.ensure_store(directory)
        with P.lock(directory, exclusive=False), duckdb.connect() as con:
            entries = []
            for table, rows in todo.items():  # DuckDB's conversion of the frame: the column types of every version
                arrow = con.from_df(pd.DataFrame(rows)).arrow()
                arrow = arrow.read_all() if hasattr(arrow, "read_all") else arrow  # a reader in DuckDB ≥ 1.4
                entries.append(P.write_part(directory, table, arrow))
            P.write_commit(directory, entries)
        for table in todo:
            self._pending[table] = []
        return [directory / e["name"] for e in entries]

    # ---- reading ----------------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        """The tables and views that have at least one readable committed part."""
        have = [t for t in TABLES if t in readable_parts(self.root)]
        return have + [v for v, (base, _) in VIEWS.items() if base in have]

    def connect(self, *, allow_writes: bool = False):
        """A DuckDB connection with one view per table that has parts, and the kind views over them. Without
        ``allow_writes`` its access to files, extensions and settings is switched off once the views exist."""
        import duckdb

        con = duckdb.connect()
        found = readable_parts(self.root)
        for table in TABLES:
            if table in found:
                _register(con, table, found[table])
        for view, (base, where) in VIEWS.items():
            if base in found:
                con.execute(f"create view {view} as select * from {base} where {where}")
        if not allow_writes:
            con.execute("set enable_external_access = false")
            con.execute("set lock_configuration = true")
        return con

    def sql(self, query: str, params: list | None = None, *, allow_writes: bool = False) -> pd.DataFrame:
        """Run a query (``?`` placeholders filled from ``params``) over the views ``attention``, ``qk``, ``ov``,
        ``weights``, ``spectra``, ``repr``, ``train``. Read-only unless ``allow_writes``: a statement other than
        SELECT/EXPLAIN, or one that reaches for files, raises an InputError."""
        import duckdb

        for attempt in range(2):
            with self.connect(allow_writes=allow_writes) as con:
                if not allow_writes:
                    _check_read_only(con, query)
                try:
                    return con.execute(query, params).df()
                except duckdb.PermissionException as exc:
                    raise InputError(f"{self.root}: refused, the query reaches outside the run's tables "
                                     f"({str(exc).splitlines()[0]}); rankscope sql is read-only unless "
                                     f"--allow-writes") from None
                except duckdb.Error as exc:
                    error = exc
            # a part whose footer reads but a page does not (checksums are verified on every scan) fails the scan:
            # read every part whole once, and ask again without the bad ones
            scan_failed = isinstance(error, duckdb.InvalidInputException) and "reading the stream" in str(error)
            if attempt or not scan_failed:
                break
            before = readable_parts(self.root)
            if readable_parts(self.root, deep=True) == before:  # no part was bad: the error is the query's
                break
        have = ", ".join(self.tables()) or "none yet"
        raise InputError(f"{self.root}: {str(error).splitlines()[0]} (tables with rows: {have})") from None

    def steps(self, table: str) -> set[int]:
        """The steps of this run (its ``run`` tag) in ``table``'s committed, readable parts (a resumed run skips
        them)."""
        if table not in TABLES and table not in VIEWS:
            raise InputError(f"unknown table {table!r}; the run store has {list(TABLES) + list(VIEWS)}")
        if table not in self.tables():
            return set()
        frame = self.sql(f"select distinct step from {table} where run = ?", [self.run])
        return set(int(s) for s in frame["step"])


def _check_read_only(con, query: str) -> None:
    """An InputError naming the first statement of ``query`` that is not SELECT-like (DuckDB's own parser)."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise InputError(f"the query does not parse: {str(exc).splitlines()[0]}") from None
    for statement in statements:
        kind = statement.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise InputError(f"refused: a {kind} statement; rankscope sql is read-only unless --allow-writes "
                             f"(it runs {' and '.join(READ_ONLY_STATEMENTS)} statements)")
