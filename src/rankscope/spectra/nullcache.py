"""The cache of simulated nulls: a bounded in-memory LRU in front of ``.npz`` files under the user cache dir.

A null is keyed by what determines it: its structure, block-norm ratios, number of draws, a format version and a
hash of the code that simulates it (editing that code can never reuse a stale null). Files are written to a
temporary name and renamed, so concurrent processes may share the directory; an unreadable file, or one
without an array its reader requires (``get(..., required=)``), is simulated again.
Override the directory with ``RANKSCOPE_CACHE_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

VERSION = 5  # 5: top_energy in the simulated arrays
MEMORY_ENTRIES = 512  # nulls kept in memory (a few kB each); the least recently used go first

# The simulation code itself is part of the key.
_SOURCES = ("form.py", "kernels.py", "sampling.py", "spikes.py", "metrics.py", "nulls.py")
_CODE_HASH = hashlib.sha256(b"".join(Path(__file__).with_name(f).read_bytes() for f in _SOURCES)).hexdigest()[:16]


def cache_dir() -> Path:
    """Where simulated nulls live on disk: $RANKSCOPE_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("RANKSCOPE_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("rankscope")) / "nulls"


def key(kind: str, structure, ratios, draws: int) -> tuple:
    """The cache key of one null: a hashable tuple (its JSON names the file on disk)."""
    return (kind, structure, tuple(float(f"{float(x):.10g}") for x in ratios), int(draws))


def _text(key: tuple) -> str:
    kind, structure, ratios, draws = key
    shape = structure.as_dict() if hasattr(structure, "as_dict") else structure
    return json.dumps({"v": VERSION, "code": _CODE_HASH, "kind": kind, "structure": shape, "ratios": list(ratios),
                       "draws": draws}, sort_keys=True)


def seed(structure, draws: int) -> int:
    """One seed per shape, whatever the ratios (common random numbers across the ratio grid) or the code."""
    shape = structure.as_dict() if hasattr(structure, "as_dict") else structure
    payload = json.dumps({"structure": shape, "draws": draws}, sort_keys=True)
    return int(hashlib.sha256(payload.encode()).hexdigest()[:8], 16)


class NullCache:
    """``get(key, make)``: the arrays of a null from memory, else disk, else ``make()`` (then stored in both)."""

    def __init__(self, entries: int = MEMORY_ENTRIES):
        self.entries = entries
        self._memory: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()

    def clear(self) -> None:
        self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: tuple, make: Callable[[], dict[str, np.ndarray]],
            required: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """``required``: the arrays a caller reads; a stored null lacking one (an older format) is made again."""
        required = tuple(required)
        if key in self._memory and all(name in self._memory[key] for name in required):
            self._memory.move_to_end(key)
            return self._memory[key]
        text = _text(key)
        path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npz"
        arrays = _load(path, text)
        if arrays is None or not all(name in arrays for name in required):
            arrays = make()
            _save(path, text, arrays)
        for a in arrays.values():
            a.flags.writeable = False
        self._memory[key] = arrays
        while len(self._memory) > self.entries:
            self._memory.popitem(last=False)
        return arrays


def _load(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored for ``key``; None when there are none, and with a warning when the file is damaged (it is
    simulated again and rewritten). A zip member's CRC is checked as it is read, so a flipped byte is found too."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in z.files if name != "key"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated, foreign: redo
        import warnings

        warnings.warn(f"{path}: a damaged cached null ({type(exc).__name__}); simulating it again", stacklevel=3)
        return None


def _save(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, key=np.array(key), **arrays)
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError:
        pass  # a read-only cache costs time, not correctness


CACHE = NullCache()
