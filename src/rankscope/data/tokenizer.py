"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) and memory-mapped token streams, both cached.

The tokenizer is trained on the training split only. Each split is encoded once into a flat ``uint16``
array (documents joined by the end-of-text token), saved as ``.npy`` and opened with ``mmap_mode="r"``:
drawing a batch is an index into the page cache, nothing measurable per step. Cache files are keyed by
the corpus fingerprint and the vocabulary size, written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankscope.data.corpus import Document, documents, fingerprint
from rankscope.errors import InputError

EOT = "<|endoftext|>"


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
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tok.save(str(tmp))
    os.replace(tmp, path)
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
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        np.save(fh, tokens)
    os.replace(tmp, path)


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
    folder.mkdir(parents=True, exist_ok=True)
    tok_path = folder / "tokenizer.json"
    tok = load_tokenizer(tok_path) if tok_path.exists() else train_tokenizer(train_docs, vocab_size, tok_path)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not (folder / f"{split}.npy").exists():
            _encode(tok, docs, folder / f"{split}.npy")
    meta_path = folder / "meta.json"
    train = np.load(folder / "train.npy", mmap_mode="r")
    if not meta_path.exists():
        n_bytes = sum(len(d.text.encode()) for d in train_docs)
        meta = {"source": source, "train_bytes": n_bytes, "train_tokens": int(train.size),
                "val_tokens": int(np.load(folder / "val.npy", mmap_mode="r").size), "vocab_size": vocab_size}
        meta_path.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    bytes_per_token = meta["train_bytes"] / max(meta["train_tokens"], 1)
    return TokenData(train=train, val=np.load(folder / "val.npy", mmap_mode="r"), tokenizer_path=tok_path,
                     vocab_size=tok.get_vocab_size(), bytes_per_token=bytes_per_token, source=source)
