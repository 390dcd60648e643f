"""The run store: atomic parts, views, readers during writes, a half-written file left by a kill."""

import threading

import pytest

from rankscope.errors import InputError
from rankscope.store import RunStore


def test_rows_round_trip_through_parts_and_views(tmp_path):
    store = RunStore(tmp_path / "run")
    key = {"layer": 0, "head_index": -1, "null": "product"}
    store.append("attention", [{"step": 0, **key, "kind": "qk", "outliers": 0},
                               {"step": 0, **key, "kind": "ov", "outliers": 1}])
    store.flush()
    store.append("attention", [{"step": 50, **key, "kind": "qk", "outliers": 3,
                                "error": "x"}])  # a later part may carry a new column
    store.flush()
    frame = store.sql('select step, outliers, error from qk where "null" = \'product\' order by step')
    assert list(frame["step"]) == [0, 50] and list(frame["outliers"]) == [0, 3]  # the qk view: no ov row
    assert frame["error"].isna().iloc[0] and frame["error"].iloc[1] == "x"
    assert list(store.sql("select outliers from ov")["outliers"]) == [1]
    assert store.sql("select count(*) n from attention")["n"][0] == 3
    assert store.steps("attention") == {0, 50} and store.steps("qk") == {0, 50} and store.steps("train") == set()
    assert (store.sql("select distinct run from attention")["run"] == ["run"]).all()


def test_parts_of_earlier_versions_are_read_as_the_attention_table(tmp_path):
    import duckdb
    import pandas as pd

    old = tmp_path / "metrics"
    old.mkdir()
    frame = pd.DataFrame([{"run": "r", "step": 5, "layer": 0, "head_index": -1, "kind": "ov", "outliers": 2}])
    duckdb.from_df(frame).write_parquet(str(old / "qk-00000000000000000001-abcdef12.parquet"))  # earlier versions
    # wrote every attention row to qk-* parts
    store = RunStore(tmp_path)
    store.append("attention", [{"step": 6, "layer": 0, "head_index": -1, "kind": "qk", "outliers": 4}])
    store.flush()
    assert sorted(store.sql("select step from attention")["step"]) == [5, 6]
    assert list(store.sql("select step from ov")["step"]) == [5]
    assert list(store.sql("select step from qk")["step"]) == [6]


def test_a_study_directory_reads_every_run(tmp_path):
    for name in ("a", "b"):
        s = RunStore(tmp_path / name)
        s.append("train", [{"step": 1, "loss": 2.0}])
        s.flush()
    frame = RunStore(tmp_path).sql("select run, loss from train order by run")
    assert list(frame["run"]) == ["a", "b"]


def test_unknown_table_and_bad_query_name_the_problem(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(InputError, match="unknown table"):
        store.append("nope", [{"x": 1}])
    with pytest.raises(InputError, match="tables with rows: none yet"):
        store.sql("select * from qk")


def test_a_half_written_part_is_invisible(tmp_path):
    store = RunStore(tmp_path)
    store.append("train", [{"step": 1, "loss": 1.0}])
    store.flush()
    (tmp_path / "metrics" / ".tmp-train-123.parquet").write_bytes(b"PAR1 truncated by kill -9")
    assert store.sql("select count(*) n from train")["n"][0] == 1


def test_readers_never_see_a_partial_file_while_a_writer_flushes(tmp_path):
    writer, reader = RunStore(tmp_path), RunStore(tmp_path)
    errors, counts = [], []
    read_once = threading.Event()  # the writer waits for a read in the middle, so reads and writes interleave

    def write():
        for step in range(60):
            writer.append("train", [{"step": step, "loss": float(step)} for _ in range(50)])
            writer.flush()
            if step == 29:
                read_once.wait(timeout=30)

    thread = threading.Thread(target=write)
    thread.start()
    while thread.is_alive():
        try:
            if reader.tables():
                counts.append(int(reader.sql("select count(*) n from train")["n"][0]))
                read_once.set()
        except Exception as exc:
            errors.append(exc)
    thread.join()
    assert not errors
    mid_write = [c for c in counts if 0 < c < 3000]
    assert mid_write, f"no read happened while the writer was writing ({len(counts)} reads)"
    assert all(c % 50 == 0 for c in counts)  # whole parts only
    assert counts == sorted(counts)
    assert reader.sql("select count(*) n from train")["n"][0] == 3000
