"""Corpora, the BPE tokenizer and token streams."""

import numpy as np
import pytest

from rankscope.data import documents, prepare, stdlib_root
from rankscope.data.corpus import fingerprint
from rankscope.errors import InputError


def test_stdlib_corpus_is_deterministic_and_split_without_overlap():
    train = list(documents("stdlib", "train", max_bytes=400_000))
    val = list(documents("stdlib", "val", max_bytes=400_000))
    again = list(documents("stdlib", "train", max_bytes=400_000))
    assert [d.name for d in train] == [d.name for d in again]
    assert not {d.name for d in train} & {d.name for d in val}
    assert all(d.name.endswith(".py") and "site-packages" not in d.name for d in train)
    assert sum(len(d.text.encode()) for d in train) <= 400_000
    assert (stdlib_root() / train[0].name).read_text(errors="replace") == train[0].text
    assert fingerprint(train) == fingerprint(again) != fingerprint(val)


def test_local_folder_and_file(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.txt").write_text(f"document {i}\n" * 20)
    docs = list(documents(str(tmp_path), "train", val_percent=25)) + list(documents(str(tmp_path), "val", 25))
    assert sorted(d.name for d in docs) == sorted(f"f{i}.txt" for i in range(40))
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(100)))
    (train,), (val,) = documents(str(one), "train", 10), documents(str(one), "val", 10)
    assert train.text + val.text == one.read_text() and val.text.startswith("line 90\n")


def test_bad_corpus_paths_are_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(documents(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no text files"):
        list(documents(str(tmp_path / "empty")))


def test_tokenizer_round_trips_and_streams_are_memory_mapped():
    data = prepare("stdlib", vocab_size=300, max_bytes=300_000)
    assert data.vocab_size == 300
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert data.train.max() < 300 and data.val.size > 0
    tok = data.tokenizer()
    text = "def f(x):\n    return x ** 2  # é\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless on any UTF-8
    assert 1.0 < data.bytes_per_token < 4.0  # 44 merges on Python source
    with pytest.raises(InputError, match="vocab_size"):
        prepare("stdlib", vocab_size=100_000, max_bytes=300_000)
