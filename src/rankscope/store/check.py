"""``check`` and ``repair`` of a run store: what in ``metrics/`` a reader skips or doubts, and moving it aside.

Problems: a part that does not read whole (truncated, zero bytes, not Parquet, a bad page checksum) or is not a
run-store part (no ``run``/``step`` column); a part no commit names (a flush that did not finish); a commit that
does not read, or names a missing part; the other parts of a commit with a bad one (held back: a reader skips
the whole commit); temporaries left by an interrupted write; foreign files; rows whose key (run, step, layer,
head_index, kind, null, offset, … as the table has them) an earlier part already holds.

``repair`` moves every such file into ``metrics/quarantine/`` (it never deletes one); a commit holding duplicate
rows among new ones has its new rows committed again first, so no row is lost. Both hold the store's lock
exclusively while they list its files, so a flush in progress is never taken for a dead one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from rankscope.rundir import METRICS
from rankscope.store import parts as P

KEY = ("run", "sweep", "step", "stack", "name", "layer", "head_index", "expert", "kind", "null", "offset")
RENAMED = {"head": "head_index"}  # earlier versions' column names


@dataclass(frozen=True)
class Problem:
    kind: str  # unreadable | foreign part | uncommitted | held back | missing | bad commit | temporary |
    #            foreign file | duplicate keys
    path: Path
    detail: str


def _locked(directory: Path):
    """The store's lock, exclusive (nothing to hold in an earlier version's directory, which has no marker)."""
    return P.lock(directory, exclusive=True) if (directory / P.MARKER).exists() else contextlib.nullcontext()


def _key_frame(path: Path):
    """The key columns of a part as a pandas frame (earlier versions' names renamed)."""
    import pyarrow.parquet as pq

    schema = P.read_schema(path)
    columns = [n for n in schema.names if RENAMED.get(n, n) in KEY]
    with open(path, "rb") as fh:
        frame = pq.read_table(fh, columns=columns).to_pandas()
    return frame.rename(columns=RENAMED)


def _duplicates(directory: Path, units: list[list[dict]]) -> dict[str, object]:
    """Part name → a boolean mask of its rows whose key an earlier part (or an earlier row) of its table holds;
    parts without such rows are left out. ``units`` in commit order."""
    import numpy as np
    import pandas as pd

    frames: dict[str, list] = {}
    for unit in units:
        for entry in unit:
            frames.setdefault(entry["table"], []).append((entry["name"], _key_frame(directory / entry["name"])))
    out = {}
    for members in frames.values():
        both = pd.concat([f for _, f in members], ignore_index=True)  # int and float keys compare by value
        repeated = both.duplicated().to_numpy()
        for (name, _), piece in zip(members, np.split(repeated, np.cumsum([len(f) for _, f in members])[:-1]),
                                    strict=True):
            if piece.any():
                out[name] = piece
    return out


def _problems(directory: Path, layout: P.Layout) -> tuple[list[Problem], list[list[dict]]]:
    """The problems of one ``metrics/`` directory, and the units a reader takes (in commit order)."""
    problems = [Problem("bad commit", p, why) for p, why in layout.bad_commits.items()]
    problems += [Problem("temporary", p, "left by an interrupted write") for p in layout.temporaries]
    problems += [Problem("foreign file", p, "not a file of the run store") for p in layout.foreign]
    bad = {}
    for name in layout.parts:
        reason = P.read_whole(directory / name)
        if reason is not None:
            bad[name] = reason
            kind = "foreign part" if "not a run-store part" in reason else "unreadable"
            problems.append(Problem(kind, directory / name, reason))
    problems += [Problem("uncommitted", directory / n, "no commit names it (a flush that did not finish)")
                 for n in layout.uncommitted() if n not in bad]
    commits = layout.commits if layout.committed else [None] * len(layout.parts)
    live = []
    for unit, commit in zip(layout.units(), commits, strict=True):
        problem = P.unit_problem(directory, unit, deep=True)
        if problem is None:
            live.append(unit)
            continue
        name, reason = problem
        if not (directory / name).is_file():
            problems.append(Problem("missing", commit.path, f"names {name}, which is not there"))
        elif name not in bad:  # e.g. another size than its commit says
            problems.append(Problem("unreadable", directory / name, reason))
            bad[name] = reason
        if commit is not None:
            problems += [Problem("held back", directory / e["name"], f"its commit {commit.path.name} has a bad "
                                 f"part ({name}), so readers skip all of it")
                         for e in unit if e["name"] not in bad and (directory / e["name"]).is_file()]
    problems += [Problem("duplicate keys", directory / name, f"{int(mask.sum())} rows repeat keys an earlier "
                         f"part holds") for name, mask in _duplicates(directory, live).items()]
    return problems, live


def check(root: str | Path) -> list[Problem]:
    """Every problem of the run store(s) under ``root`` (a run or a study directory); reads every part whole."""
    out = []
    for directory in P.metrics_dirs(Path(root), METRICS):
        with _locked(directory):
            layout = P.scan(directory)  # a snapshot with no flush in progress
        out += _problems(directory, layout)[0]
    return out


def quarantine(path: Path) -> Path:
    """Move ``path`` into its ``metrics/quarantine/`` (a new name when one is taken); returns where it went."""
    directory = path.parent / P.QUARANTINE
    directory.mkdir(exist_ok=True)
    target, i = directory / path.name, 1
    while target.exists():
        target, i = directory / f"{path.name}.{i}", i + 1
    os.replace(path, target)
    return target


def repair(root: str | Path) -> list[str]:
    """Quarantine everything ``check`` finds (for duplicate rows: after committing their part's new rows again);
    returns one line per file moved or commit written."""
    actions = []
    for directory in P.metrics_dirs(Path(root), METRICS):
        with _locked(directory):
            actions += _set_aside(directory)
            actions += _deduplicate(directory)
    return actions


def _move(path: Path, why: str) -> list[str]:
    if not (path.exists() or path.is_symlink()):
        return []
    return [f"{path.name}: {why}, moved to {quarantine(path).relative_to(path.parent)}"]


def _set_aside(directory: Path) -> list[str]:
    """Quarantine every problem but duplicates; a commit with a bad or missing part goes with all its parts."""
    layout = P.scan(directory)
    problems = [p for p in _problems(directory, layout)[0] if p.kind != "duplicate keys"]
    actions = []
    doomed = {p.path for p in problems}
    for commit in layout.commits:
        if commit.path in doomed or any(directory / e["name"] in doomed for e in commit.parts):
            actions += _move(commit.path, "a commit with a bad or missing part")
    for problem in problems:
        actions += _move(problem.path, problem.kind)
    return actions


def _deduplicate(directory: Path) -> list[str]:
    """Commits holding rows an earlier commit holds: their new rows committed anew, then they are quarantined."""
    import pyarrow.parquet as pq

    if not P.scan(directory).parts:
        return []
    P.ensure_store(directory)  # an earlier version's parts (all readable by now) become one commit
    layout = P.scan(directory)
    dups = _duplicates(directory, [c.parts for c in layout.commits])
    actions = []
    for commit in layout.commits:
        if not any(e["name"] in dups for e in commit.parts):
            continue
        entries = []
        for e in commit.parts:
            keep = ~dups[e["name"]] if e["name"] in dups else None
            if keep is None or keep.any():
                with open(directory / e["name"], "rb") as fh:
                    table = pq.read_table(fh)
                entries.append(P.write_part(directory, e["table"], table if keep is None else table.filter(keep)))
        if entries:
            new = P.write_commit(directory, entries)
            actions.append(f"{commit.path.name}: duplicate keys; its {sum(e['rows'] for e in entries)} new rows "
                           f"committed again in {new.name}")
        for path in [commit.path, *(directory / e["name"] for e in commit.parts)]:
            actions += _move(path, "duplicate keys")
    return actions
