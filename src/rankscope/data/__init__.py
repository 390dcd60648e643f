"""Corpora, tokenizer and memory-mapped token streams."""

from rankscope.data.corpus import Document, documents, stdlib_root
from rankscope.data.tokenizer import TokenData, prepare

__all__ = ["Document", "TokenData", "documents", "prepare", "stdlib_root"]
