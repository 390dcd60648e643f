"""Text corpora: the embedded default (the Python standard library's own source), local text, HF datasets.

The default works offline everywhere: every ``.py`` file of the running interpreter's standard library
(found with ``sysconfig``, ``site-packages`` excluded), a code corpus like the CodeParrot setting of
related work. Files are ordered by a hash of their relative path (deterministic, and not alphabetical, so
a byte cap samples every package), and split into train and validation by the same hash.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rankscope.errors import InputError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java", ".toml",
                 ".yaml", ".yml", ".html", ".css", ".sh", ".tex", ".csv"}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Document:
    name: str  # relative path (or dataset row id)
    text: str


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, suffixes: set[str] | None) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"}
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # pruned: a skipped folder is never walked into
        out += [p for p in (Path(folder) / n for n in names if n not in skip)
                if (suffixes is None or p.suffix in suffixes) and p.is_file()]
    return out


def documents(source: str = "stdlib", split: str = "train", val_percent: float = 5.0,
              max_bytes: int | None = None) -> Iterator[Document]:
    """The documents of one split of a corpus, in a deterministic order.

    ``source``: ``"stdlib"`` (default), a local text file or folder, or ``"hf:NAME[:CONFIG]"`` for a Hugging Face
    ``datasets`` corpus (needs the network and the ``datasets`` package). A single file is split by lines:
    the last ``val_percent`` % of its lines are validation. ``max_bytes`` caps the split's UTF-8 size.
    """
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', not {split!r}")
    budget = max_bytes if max_bytes is not None else float("inf")
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:], split, val_percent, budget)
        return
    root = stdlib_root() if source == "stdlib" else Path(source).expanduser()
    if not root.exists():
        raise InputError(f"corpus {source!r}: no such file or folder")
    if root.is_file():
        yield from _file_documents(root, split, val_percent, budget)
        return
    files = _files(root, {".py"} if source == "stdlib" else TEXT_SUFFIXES)
    if not files:
        raise InputError(f"corpus {root}: no text files found (looked for {sorted(TEXT_SUFFIXES)})")
    names = sorted((str(p.relative_to(root)), p) for p in files)
    names.sort(key=lambda item: _hash(item[0]))
    used = 0
    for name, path in names:
        in_val = _hash("split:" + name) % 10_000 < val_percent * 100
        if in_val != (split == "val"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode())
        if not text.strip() or used + size > budget:  # a file that would overflow the cap is skipped whole
            continue
        used += size
        yield Document(name, text)


def _file_documents(path: Path, split: str, val_percent: float, budget: float) -> Iterator[Document]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if len(lines) < 2:
        raise InputError(f"corpus {path}: a single-file corpus needs at least 2 lines to split")
    cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - val_percent / 100))))
    part = lines[:cut] if split == "train" else lines[cut:]
    text, used = [], 0
    for line in part:
        used += len(line.encode())
        if used > budget:
            break
        text.append(line)
    yield Document(f"{path.name}:{split}", "".join(text))


def _hf_documents(spec: str, split: str, val_percent: float, budget: float) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise InputError("corpus 'hf:…' needs the `datasets` package: pip install datasets") from None
    name, _, config = spec.partition(":")
    data = datasets.load_dataset(name, config or None, split="train", streaming=True)
    used = 0
    for i, row in enumerate(data):
        text = row.get("text") or row.get("content") or next((v for v in row.values() if isinstance(v, str)), "")
        in_val = _hash(f"split:{i}") % 10_000 < val_percent * 100
        if in_val != (split == "val") or not text:
            continue
        used += len(text.encode())
        if used > budget:
            return
        yield Document(f"{name}/{i}", text)


def fingerprint(docs: list[Document]) -> str:
    """A short hash of the documents' names and contents (the key of cached tokenizers and token streams)."""
    h = hashlib.sha1()
    for doc in docs:
        h.update(doc.name.encode())
        h.update(hashlib.sha1(doc.text.encode()).digest())
    return h.hexdigest()[:16]
