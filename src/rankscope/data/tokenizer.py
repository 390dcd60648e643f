"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) and memory-mapped token streams, both cached.

The tokenizer is trained on the training split only. Each split is encoded once into a flat ``uint16``
array (documents joined by the end-of-text token), saved as ``.npy`` and opened with ``mmap_mode="r"``:
drawing a batch is an index into the page cache, nothing measurable per step. Cache folders are keyed by
the corpus fingerprint and the vocabulary size; every file is written under a temporary name and renamed, and
``meta.json``, written last, records the size and SHA-256 of the others. A file that does not match it (or, in a
cache of an earlier version, does not load) is rebuilt with a warning, so a damaged cache heals. One process
builds a folder at a time (an OS lock on its ``.lock``); a complete cache in a read-only folder is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankscope.data.corpus import Document, documents, fingerprint
from rankscope.errors import InputError

EOT = "<|endoftext|>"
TOKENIZER, META = "tokenizer.json", "meta.json"
STREAMS = ("train.npy", "val.npy")


def data_cache_dir() -> Path:
    """$RANKSCOPE_DATA_DIR, else ``<user cache dir>/rankscope/data``."""
    env = os.environ.get("RANKSCOPE_DATA_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("rankscope")) / "data"


def train_tokenizer(docs: list[Document], vocab_size: int, path: Path):
    """A byte-level BPE with ``vocab_size`` tokens (256 bytes + merges + end-of-text), saved to ``path``."""
    from tokenizers import ByteLevelBPETokenizer

    if not 257 <= vocab_size <= 65536:
        raise InputError(f"vocab_size={vocab_size}: a byte-level BPE needs 257 to 65536 tokens (uint16 streams)")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator((d.text for d in docs), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                            show_progress=False)
    def write(tmp: Path) -> None:
        try:
            tok.save(str(tmp))
        except Exception as exc:  # tokenizers raises a bare Exception for an I/O error
            raise OSError(str(exc)) from None

    _atomic(path, write)
    return load_tokenizer(path)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _encode(tok, docs: list[Document], path: Path) -> None:
    eot = tok.token_to_id(EOT)
    chunks = []
    for start in range(0, len(docs), 256):
        for enc in tok.encode_batch([d.text for d in docs[start:start + 256]]):
            chunks.append(np.asarray(enc.ids, dtype=np.uint16))
            chunks.append(np.asarray([eot], dtype=np.uint16))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, tokens)

    _atomic(path, write)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary name beside ``path``, then rename: a reader never sees half a file. A folder this
    process cannot write is an InputError naming it."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"data cache {path.parent}: cannot write {path.name} ({exc.strerror or exc}); set "
                         f"RANKSCOPE_DATA_DIR to a writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)


def _digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _loads(path: Path) -> str | None:
    """Why a cache file of an earlier version (no recorded digest) is unusable, None when it loads."""
    try:
        if path.name == TOKENIZER:
            load_tokenizer(path)
        else:
            stream = np.load(path, mmap_mode="r")
            if stream.ndim != 1 or stream.dtype != np.uint16:
                return f"a {stream.dtype} array of shape {stream.shape}, not a uint16 token stream"
    except Exception as exc:  # tokenizers raises a bare Exception on a broken file
        return f"does not load: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    return None


def _read_meta(folder: Path) -> tuple[dict | None, str | None]:
    """meta.json's record, and why it is unusable when it is (None, None: there is none yet)."""
    path = folder / META
    if not path.exists():
        return None, None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{META} is unreadable ({str(exc)[:120]})"
    if not isinstance(meta, dict):
        return None, f"{META} is not a record"
    return meta, None


def _stale(folder: Path, meta: dict | None) -> dict[str, str]:
    """The cache files to rebuild, each with why: missing, or not what meta.json recorded (size, SHA-256), or,
    where meta.json records none (an earlier version's cache), not loadable."""
    recorded = meta.get("files") if isinstance(meta, dict) and isinstance(meta.get("files"), dict) else {}
    out = {}
    for name in (TOKENIZER, *STREAMS):
        path = folder / name
        if not path.exists():
            out[name] = "missing"
        elif name in recorded:
            if _digest(path) != recorded[name]:
                out[name] = f"not the file {META} recorded (size or SHA-256 differ)"
        elif (why := _loads(path)) is not None:
            out[name] = why
    return out


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Hold an OS lock on ``folder/.lock`` (one process builds a cache folder at a time; others wait). A folder
    that cannot be made is an InputError; one that cannot be written is only read (no lock is needed then).
    Without ``flock`` (Windows; some network mounts) the build goes unlocked: the files are still written
    atomically and verified on read, so two builders cost time, not correctness."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"data cache {folder}: cannot make it ({exc.strerror or exc}); set RANKSCOPE_DATA_DIR "
                         f"to a writable folder") from None
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock
                pass
        yield
    finally:
        os.close(fd)


@dataclass
class TokenData:
    """Train and validation token streams (memory-mapped uint16) and the tokenizer that made them."""

    train: np.ndarray  # (N_train,) uint16
    val: np.ndarray  # (N_val,) uint16
    tokenizer_path: Path
    vocab_size: int
    bytes_per_token: float  # training-split UTF-8 bytes per token: nats/token ÷ this = nats/byte
    source: str

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def prepare(source: str = "stdlib", vocab_size: int = 1024, max_bytes: int | None = None,
            val_percent: float = 5.0, cache: Path | None = None) -> TokenData:
    """Tokenizer and token streams of a corpus, from the cache when present (train once, reuse)."""
    train_docs = list(documents(source, "train", val_percent, max_bytes))
    val_cap = None if max_bytes is None else max(max_bytes * val_percent / 100, 65536)
    val_docs = list(documents(source, "val", val_percent, int(val_cap) if val_cap else None))
    if not train_docs or not val_docs:
        raise InputError(f"corpus {source!r} gave {len(train_docs)} training and {len(val_docs)} validation "
                         "documents; both splits need text (raise max_bytes or val_percent)")
    key = f"{fingerprint(train_docs)}-{fingerprint(val_docs)}-v{vocab_size}"
    folder = (cache or data_cache_dir()) / key
    with _building(folder):
        _heal(folder, source, vocab_size, train_docs, val_docs)
    tok = load_tokenizer(folder / TOKENIZER)
    train = np.load(folder / "train.npy", mmap_mode="r")
    bytes_per_token = sum(len(d.text.encode()) for d in train_docs) / max(int(train.size), 1)
    return TokenData(train=train, val=np.load(folder / "val.npy", mmap_mode="r"), tokenizer_path=folder / TOKENIZER,
                     vocab_size=tok.get_vocab_size(), bytes_per_token=bytes_per_token, source=source)


def _heal(folder: Path, source: str, vocab_size: int, train_docs: list[Document], val_docs: list[Document]) -> None:
    """Build what the cache folder lacks, rebuild what is damaged (with a warning), and write meta.json last."""
    meta, broken = _read_meta(folder)
    stale = _stale(folder, meta)
    writable = os.access(folder, os.W_OK)
    if (stale or broken) and not writable:
        raise InputError(f"data cache {folder}: {', '.join(stale) or META} must be rebuilt and the folder is not "
                         f"writable; set RANKSCOPE_DATA_DIR to a writable folder")
    # a file missing from a folder without meta.json is a cache being built (or interrupted), not damage
    damaged = [f"{name} ({why})" for name, why in stale.items() if why != "missing" or meta is not None]
    if broken:
        damaged.insert(0, broken)
    if damaged:
        warnings.warn(f"data cache {folder}: {'; '.join(damaged)}; rebuilding", stacklevel=3)
    if TOKENIZER in stale:  # a new tokenizer: the streams are re-encoded with it
        stale.update(dict.fromkeys(STREAMS, "re-encoded"))
        tok = train_tokenizer(train_docs, vocab_size, folder / TOKENIZER)
    else:
        tok = load_tokenizer(folder / TOKENIZER)
    for name, docs in zip(STREAMS, (train_docs, val_docs), strict=True):
        if name in stale:
            _encode(tok, docs, folder / name)
    recorded = isinstance(meta, dict) and isinstance(meta.get("files"), dict)
    if stale or broken or (not recorded and writable):  # an earlier version's meta.json gains the digests
        counts = {name: int(np.load(folder / name, mmap_mode="r").size) for name in STREAMS}
        record = {"source": source, "train_bytes": sum(len(d.text.encode()) for d in train_docs),
                  "train_tokens": counts["train.npy"], "val_tokens": counts["val.npy"], "vocab_size": vocab_size,
                  "files": {name: _digest(folder / name) for name in (TOKENIZER, *STREAMS)}}
        _atomic(folder / META, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
