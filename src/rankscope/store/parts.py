"""The files of one ``metrics/`` directory: parts, commits, the format marker, and what a reader may trust.

    metrics/store.json                      the format marker, written when a writer creates the directory
    metrics/<table>-<stamp>.parquet         a part: one table's rows of one flush (page checksums on)
    metrics/commit-<stamp>.json             a commit: the parts of one flush, with their sizes and row counts
    metrics/quarantine/                     what ``rankscope store check --repair`` moved aside (never deleted)
    metrics/.tmp-*                          a file being written (renamed into place when whole)

A flush writes its parts, then its commit (each to a temporary name, fsynced, renamed, the directory fsynced):
a part is visible only once a commit names it, so a kill at any instant leaves whole flushes or nothing of one.
A commit is a unit: when one of its parts is missing, of another size than recorded, or unreadable, none of its
parts is read (a step's rows in one table are never visible without its rows in the others).

A directory with neither a marker nor a commit was written by an earlier version (no commits): each of its parts
is read on its own. A directory with a marker and no commit is a new store whose first commit did not finish: it
has no rows yet. The first flush into an earlier version's directory commits the parts it finds (``adopt``).

Every path here is a Python path handed to ``os`` and pyarrow; none is ever pasted into SQL or expanded as a glob.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "store.json"
QUARANTINE = "quarantine"
TMP_PREFIX = ".tmp-"
FORMAT = 2  # earlier versions: no marker, no commits (format 1)
TABLES = ("attention", "weights", "spectra", "repr", "train")
LEGACY_PREFIXES = {"qk": "attention"}  # part-name prefixes of earlier versions → the table they belong to
_PART = re.compile(r"^([a-z]+)-([^/\\]+)\.parquet$")  # what earlier versions' readers took; never a path
_COMMIT = re.compile(r"^commit-(\d{20}-[0-9a-f]{8})\.json$")
REQUIRED = ("run", "step")  # every row of every table carries these


class StoreWarning(UserWarning):
    """A part or commit of a run store that a reader skipped (named in the message)."""


def part_table(name: str) -> str | None:
    """The table a part file name belongs to, or None when the name is not a part's."""
    match = _PART.match(name)
    if match is None:
        return None
    prefix = match.group(1)
    return prefix if prefix in TABLES else LEGACY_PREFIXES.get(prefix)


def stamp() -> str:
    """A name stamp that sorts in time order and does not collide between writers."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


# ---- writing ------------------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """``write(binary file)`` into a hidden temporary name beside ``path``, fsync, rename: all of it or nothing."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")  # two writers never share one
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_part(directory: Path, table: str, arrow_table) -> dict:
    """One part of ``table`` (a pyarrow Table) in ``directory``, atomically; its commit entry."""
    import pyarrow.parquet as pq

    path = directory / f"{table}-{stamp()}.parquet"
    write_atomic(path, lambda fh: pq.write_table(arrow_table, fh, write_page_checksum=True))
    return {"name": path.name, "table": table, "rows": arrow_table.num_rows, "bytes": path.stat().st_size}


def write_commit(directory: Path, entries: list[dict]) -> Path:
    """The commit naming ``entries`` (from ``write_part``): after it is renamed into place, they are visible."""
    path = directory / f"commit-{stamp()}.json"
    body = json.dumps({"format": FORMAT, "parts": entries}, indent=1).encode()
    write_atomic(path, lambda fh: fh.write(body))
    return path


def ensure_store(directory: Path) -> None:
    """Create ``directory`` as a committed store (the marker first), or adopt an earlier version's parts."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MARKER).exists():
        return
    found = scan(directory)
    if not found.committed:
        adopt(found)
    body = json.dumps({"format": FORMAT, "about": "rankscope run store: only parts named by a commit-*.json "
                                                 "are read"}).encode()
    write_atomic(directory / MARKER, lambda fh: fh.write(body))


def adopt(found: Layout) -> list[Path]:
    """Commit the readable parts of an earlier version's directory (before its marker is written), so they stay
    visible once it is a committed store: one commit per part, as an earlier reader took each part on its own, so
    a part that goes bad later hides only itself. A part that does not read whole (every page, checksums where
    written) stays out (``store check`` lists it)."""
    commits = []
    for name, table in sorted(found.parts.items()):
        path = found.directory / name
        if read_whole(path) is not None:
            continue
        entries = [{"name": name, "table": table, "rows": None, "bytes": path.stat().st_size}]
        commits.append(write_commit(found.directory, entries))
    return commits


@contextlib.contextmanager
def lock(directory: Path, exclusive: bool):
    """Writers hold the marker shared while they flush; a repair holds it exclusive (a no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / MARKER, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---- reading ------------------------------------------------------------------------------------------------------
@dataclass
class Commit:
    path: Path
    parts: list[dict]  # {"name", "table", "rows", "bytes"}


@dataclass
class Layout:
    """What one ``metrics/`` directory holds, by file name (nothing is read but the commits)."""

    directory: Path
    committed: bool  # a committed store (marker or commits); False: an earlier version's, every part on its own
    parts: dict[str, str] = field(default_factory=dict)  # part file name → table
    commits: list[Commit] = field(default_factory=list)  # in time order
    bad_commits: dict[Path, str] = field(default_factory=dict)  # commit file → why it cannot be read
    temporaries: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)  # files (and folders) that are none of the above

    def units(self) -> list[list[dict]]:
        """The units a reader takes whole or not at all: each commit's entries, or (earlier version) each part."""
        if self.committed:
            return [c.parts for c in self.commits]
        return [[{"name": n, "table": t, "rows": None, "bytes": None}] for n, t in sorted(self.parts.items())]

    def uncommitted(self) -> list[str]:
        """Part files no commit names (a flush that did not finish, or a file copied in)."""
        if not self.committed:
            return []
        named = {e["name"] for c in self.commits for e in c.parts}
        return sorted(n for n in self.parts if n not in named)


def scan(directory: Path) -> Layout:
    """The files of ``directory`` sorted into parts, commits, temporaries and foreign files."""
    names = sorted(os.listdir(directory))
    commits = [n for n in names if _COMMIT.match(n)]
    found = Layout(directory, committed=MARKER in names or bool(commits))
    for name in names:
        path = directory / name
        table = part_table(name)
        if name in (MARKER, QUARANTINE) or name in commits:
            continue
        if name.startswith(TMP_PREFIX):
            found.temporaries.append(path)
        elif table is not None and path.is_file():
            found.parts[name] = table
        else:
            found.foreign.append(path)
    for name in commits:
        path = directory / name
        try:
            body = json.loads(path.read_bytes())
            entries = [{"name": str(e["name"]), "table": str(e["table"]), "rows": e.get("rows"),
                        "bytes": e.get("bytes")} for e in body["parts"]]
            strange = [e["name"] for e in entries if part_table(e["name"]) != e["table"]]
            if strange:  # e.g. a path outside the directory: never followed
                raise ValueError(f"names {strange[0]!r}, not a part of table {entries[0]['table']!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            found.bad_commits[path] = f"not a readable commit ({type(exc).__name__})"
            continue
        found.commits.append(Commit(path, entries))
    return found


_SCHEMAS: dict[tuple, object] = {}  # (path, size, mtime) → pyarrow Schema or the reason it is unreadable


def read_schema(path: Path):
    """The part's Arrow schema from its footer, or a string saying why it is not a part (cached per file version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SCHEMAS:
        try:
            with open(path, "rb") as fh:
                schema = pq.read_schema(fh)
            missing = [c for c in REQUIRED if c not in schema.names]
            if missing:
                schema = f"not a run-store part (no {', '.join(missing)} column)"
            elif not pa.types.is_integer(schema.field("step").type):
                schema = f"not a run-store part (step is {schema.field('step').type})"
        except (OSError, pa.ArrowException) as exc:
            schema = f"not a readable Parquet file ({_short(exc)})"
        _SCHEMAS[key] = schema
    return _SCHEMAS[key]


_WHOLE: dict[tuple, str | None] = {}  # (path, size, mtime) → None when every page read, else why not


def read_whole(path: Path) -> str | None:
    """None when every page of the part reads and matches its checksum, else why not (reads all of it once per
    file version; a part found bad here is unreadable to ``read_schema`` from then on)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reason = read_schema(path)
    if isinstance(reason, str):
        return reason
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _WHOLE:
        try:
            with open(path, "rb") as fh:
                pq.ParquetFile(fh, page_checksum_verification=True).read()
            _WHOLE[key] = None
        except (OSError, pa.ArrowException) as exc:
            _WHOLE[key] = _SCHEMAS[key] = f"a page does not read ({_short(exc)})"
    return _WHOLE[key]


def _short(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= 120 else line[:119] + "…"


def unit_problem(directory: Path, unit: list[dict], deep: bool = False) -> tuple[str, str] | None:
    """(part name, why) for the first part of ``unit`` a reader cannot take, or None when all of it reads.
    ``deep`` also reads every page (``read_whole``); else only sizes and footers are checked."""
    for entry in unit:
        path = directory / entry["name"]
        if not path.is_file():
            return entry["name"], "missing"
        if entry["bytes"] is not None and path.stat().st_size != entry["bytes"]:
            return entry["name"], f"{path.stat().st_size} bytes where its commit says {entry['bytes']}"
        reason = read_whole(path) if deep else read_schema(path)
        if isinstance(reason, str):
            return entry["name"], reason
    return None


_WARNED: set[str] = set()


def warn_once(path: Path, text: str) -> None:
    """One ``StoreWarning`` per skipped file per process."""
    if str(path) in _WARNED:
        return
    _WARNED.add(str(path))
    warnings.warn(text, StoreWarning, stacklevel=4)


def metrics_dirs(root: Path, metrics: str = "metrics") -> list[Path]:
    """``root/metrics`` when it exists, else every ``metrics`` directory below ``root`` (a study), walked with
    ``os.walk``: no glob is made from the path."""
    if (root / metrics).is_dir():
        return [root / metrics]
    out = []
    for current, dirs, _ in os.walk(root):
        if Path(current).name == metrics:
            out.append(Path(current))
            dirs[:] = []  # never into quarantine/
        else:
            dirs.sort()
    return sorted(out)
