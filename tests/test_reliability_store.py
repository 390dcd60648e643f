"""The run store never loses a row or locks itself out: commits survive kill -9 at any part, bad parts are
skipped (one warning each) and quarantined by ``store check --repair``, paths are data, ``sql`` is read-only."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import rankscope.cli
from rankscope.cli import app
from rankscope.errors import InputError
from rankscope.store import RunStore
from rankscope.store import parts as P
from rankscope.store.check import check, repair
from rankscope.store.parts import StoreWarning

TINY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=2, kv_lora_rank=16, qk_rope_dim=4, max_seq_len=32,
            max_bytes=300_000, batch_size=4, steps=6, warmup_steps=2, eval_every=6, eval_batches=1, ckpt_every=2,
            monitor_every=2, repr_every=3, threads=1)
SLOW_PART = """
import sys, time
import rankscope.store.parts as P
real, slow_table, nth, seen = P.write_part, sys.argv.pop(1), int(sys.argv.pop(1)), []
def slow(directory, table, arrow):  # a window after the nth part of one table: the kill lands inside its flush
    out = real(directory, table, arrow)
    seen.append(table)
    if seen.count(slow_table) == nth and table == slow_table:
        time.sleep(2.0)
    return out
P.write_part = slow
from rankscope.cli import run
sys.argv = ["rankscope", *sys.argv[1:]]
run()
"""


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(rankscope.cli.console, "width", 200)
    return CliRunner()


def rows(step, n=2, **extra):
    return [{"step": step, "layer": 0, "head_index": h, "kind": "qk", "null": "product", "offset": 0,
             "outliers": step + h, **extra} for h in range(n)]


def part_files(run: Path, table: str) -> list[Path]:
    return sorted((run / "metrics").glob(f"{table}-*.parquet"))


def raw_steps(paths: list[Path]) -> set[int]:
    """The steps in part files read directly, committed or not (what a reader of every file would see)."""
    return {int(s) for p in paths for s in pq.read_table(p, columns=["step"])["step"].to_pylist()}


def corpus(tmp_path: Path) -> Path:
    """A small local text corpus (this package's sources): the tokenizer trains in well under a second."""
    text = "\n".join(p.read_text() for p in sorted(Path(rankscope.cli.__file__).parent.rglob("*.py")))
    path = tmp_path / "corpus.txt"
    path.write_text(text[:300_000])
    return path


# ---- a flush commits as a whole --------------------------------------------------------------------------------
@pytest.mark.parametrize("table, nth", [("attention", 2), ("repr", 1)])
def test_kill_9_when_a_part_appears_loses_no_step_and_leaves_none_half_stored(tmp_path, table, nth):
    from rankscope.train import resolve, train
    from rankscope.train.config import monitor_schedule

    run, data = tmp_path / "run", corpus(tmp_path)
    settings = {**TINY, "data": str(data)}
    args = [a for k, v in settings.items() for a in (f"--{k}", str(v))]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PART, table, str(nth), "train", "--preset", "smoke",
                             "--attention", "mha", "--run", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while len(part_files(run, table)) < nth and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # within the sleep after the part: its flush has no commit yet
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RunStore(run)
    layout = P.scan(run / "metrics")
    newest = part_files(run, table)[nth - 1].name
    assert newest in layout.uncommitted()  # the kill landed inside a flush
    orphans = [run / "metrics" / n for n in layout.uncommitted()]
    half = raw_steps([p for p in orphans if p.name.startswith("attention-")])
    if table == "attention":  # negative control: read file by file, a monitored step has qk rows and no spectra
        assert half and not half & raw_steps(part_files(run, "spectra"))
    assert not half & store.steps("attention")  # ... and resume does not count it as stored
    assert {p.kind for p in check(run)} == {"uncommitted"}

    train(resolve("smoke", {**settings, "attention": "mha"}), run, resume=True, progress=False)
    schedule = monitor_schedule(TINY["steps"], TINY["monitor_every"])
    for name in ("attention", "weights", "spectra"):
        assert store.steps(name) == set(schedule), name
    assert store.steps("train") == set(range(1, TINY["steps"] + 1))
    assert store.steps("repr") == {3, 6}
    # every monitored step has the rows of an untouched one: layers × (heads + the layer form) × (qk, ov) × nulls
    per_step = store.sql("select step, count(*) n from attention group by step")
    assert set(per_step["n"]) == {TINY["n_layer"] * (TINY["n_head"] + 1) * 2 * 2}
    weights = store.sql("select step, count(*) n from weights group by step")
    assert weights["n"].nunique() == 1 and weights["n"].iloc[0] > 0
    assert not [p for p in check(run) if p.kind == "duplicate keys"]
    dup = store.sql('select step, layer, head_index, kind, "null", "offset", name, count(*) n from attention '
                    'group by all having n > 1')
    assert dup.empty


def test_a_flush_that_fails_half_way_commits_nothing_and_keeps_its_rows(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    store.append("attention", rows(0))
    store.append("train", [{"step": 0, "loss": 1.0}])
    real, calls = P.write_part, []

    def second_fails(directory, table, arrow):
        calls.append(table)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(directory, table, arrow)

    monkeypatch.setattr(P, "write_part", second_fails)
    with pytest.raises(OSError, match="disk full"):
        store.flush()
    assert store.tables() == [] and store.steps("attention") == set()  # the attention part has no commit
    monkeypatch.setattr(P, "write_part", real)
    store.flush()  # the buffered rows, once
    assert store.sql("select count(*) n from attention")["n"][0] == 2
    assert store.sql("select count(*) n from train")["n"][0] == 1


def test_earlier_versions_stores_are_read_and_a_new_store_without_a_commit_is_empty(tmp_path):
    old = tmp_path / "old" / "metrics"
    old.mkdir(parents=True)
    frame = pd.DataFrame([{"run": "old", "step": 5, "layer": 0, "head": 1, "kind": "ov", "outliers": 2}])
    duckdb.from_df(frame).write_parquet(str(old / "qk-00000000000000000001-abcdef12.parquet"))  # no commits
    store = RunStore(tmp_path / "old")
    assert store.tables() == ["attention", "qk", "ov"] and store.steps("attention") == {5}
    assert list(store.sql("select head_index from ov")["head_index"]) == [1]  # the old column, renamed
    store.append("attention", rows(6))  # a new writer adopts the old parts, then commits its own
    store.flush()
    both = store.sql("select step, head_index from attention order by step, head_index")
    assert list(both["step"]) == [5, 6, 6] and list(both["head_index"]) == [1, 0, 1]
    assert "head" not in store.sql("select * from attention").columns
    assert check(tmp_path / "old") == []

    new = RunStore(tmp_path / "new")  # the marker, then a part, then the kill before the commit
    P.ensure_store(tmp_path / "new" / "metrics")
    P.write_part(tmp_path / "new" / "metrics", "attention", pa.Table.from_pylist([{"run": "new", "step": 1}]))
    assert new.tables() == [] and new.steps("attention") == set()


def test_an_adopted_legacy_part_that_goes_bad_hides_only_itself(tmp_path):
    """Adoption commits each earlier-version part on its own (as an earlier reader took it): a page of one going
    bad later hides that part's rows only, and repair quarantines that part only. A part already bad when adopted
    is left out (check lists it)."""
    old = tmp_path / "run" / "metrics"
    old.mkdir(parents=True)
    for part in range(4):  # part k holds steps 10000k … 10000k + 4999 (one data page of distinct values)
        frame = pd.DataFrame([{"run": "run", "step": 10000 * part + i, "loss": float(i) / 7} for i in range(5000)])
        pq.write_table(pa.Table.from_pandas(frame), old / f"train-{part:020d}-abcdef12.parquet",
                       write_page_checksum=True)

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))

    def parts_seen():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            seen = RunStore(tmp_path / "run").sql("select step // 10000 k, count(*) n, sum(loss) s from train "
                                                  "group by k order by k")
        return dict(zip(seen["k"], seen["n"], strict=True))

    first_bad, later_bad = old / f"train-{3:020d}-abcdef12.parquet", old / f"train-{1:020d}-abcdef12.parquet"
    flip(first_bad)  # bad before adoption
    store = RunStore(tmp_path / "run")
    store.append("train", [{"step": 90000, "loss": 0.1}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        store.flush()  # adopts parts 0, 1, 2 (one commit each); part 3 stays out
    assert parts_seen() == {0: 5000, 1: 5000, 2: 5000, 9: 1}
    flip(later_bad)  # goes bad after adoption
    P._SCHEMAS.clear(), P._WHOLE.clear()  # a new process: nothing remembered
    assert parts_seen() == {0: 5000, 2: 5000, 9: 1}  # only part 1 hidden, its neighbours kept
    repair(tmp_path / "run")
    quarantined = sorted(p.name for p in (old / "quarantine").iterdir() if p.suffix == ".parquet")
    assert quarantined == sorted([first_bad.name, later_bad.name])
    assert parts_seen() == {0: 5000, 2: 5000, 9: 1} and check(tmp_path / "run") == []


# ---- a bad part never locks a run ------------------------------------------------------------------------------
def _three_flushes(root: Path) -> RunStore:
    store = RunStore(root)
    for step in range(3):
        store.append("attention", rows(step))
        store.append("train", [{"step": step, "loss": float(step)}])
        store.flush()
    return store


def test_a_truncated_or_empty_part_is_skipped_with_one_warning_and_its_step_is_not_stored(tmp_path):
    store = _three_flushes(tmp_path)
    attention, train = part_files(tmp_path, "attention"), part_files(tmp_path, "train")
    attention[1].write_bytes(attention[1].read_bytes()[:200])  # truncated (step 1)
    train[2].write_bytes(b"")  # zero bytes (step 2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert store.steps("attention") == store.steps("train") == {0}  # a commit is read whole or not at all
        assert store.sql("select count(*) n from attention")["n"][0] == 2
    named = sorted(str(w.message).split(":")[0] for w in said if issubclass(w.category, StoreWarning))
    assert named == sorted([str(attention[1]), str(train[2])])  # one each, though read four times
    # a resumed run writes the steps again: each once
    store.append("attention", rows(1) + rows(2))
    store.append("train", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}])
    store.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        counts = store.sql("select step, count(*) n from attention group by step order by step")
    assert list(counts["step"]) == [0, 1, 2] and set(counts["n"]) == {2}


def test_a_corrupt_page_is_found_by_its_checksum_and_skipped(tmp_path):
    store = RunStore(tmp_path)
    store.append("train", [{"step": 0, "loss": 0.5}])
    store.flush()
    store.append("train", [{"step": 1, "loss": float(i) / 7} for i in range(5000)])  # one big data page
    store.flush()
    bad = part_files(tmp_path, "train")[1]
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0xFF  # the footer and the size are intact
    bad.write_bytes(bytes(data))
    with pytest.warns(StoreWarning, match=bad.name):  # the scan trips on the page, the part is read whole once
        frame = store.sql("select step, sum(loss) loss from train group by step")
    assert list(frame["step"]) == [0] and list(frame["loss"]) == [0.5]
    assert [p.kind for p in check(tmp_path)] == ["unreadable"]


def test_foreign_parts_in_an_earlier_versions_store_are_skipped(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    good = pd.DataFrame([{"run": "r", "step": 1, "loss": 1.0}])
    duckdb.from_df(good).write_parquet(str(metrics / "train-00000000000000000001-00000001.parquet"))
    (metrics / "train-00000000000000000002-00000002.parquet").write_text("run,step,loss\nr,2,2.0\n")  # a CSV
    pq.write_table(pa.table({"x": [1]}), metrics / "train-00000000000000000003-00000003.parquet")  # another schema
    with pytest.warns(StoreWarning) as said:
        assert RunStore(tmp_path, run="r").steps("train") == {1}
    assert sorted(Path(str(w.message).split(":")[0]).name for w in said) == [
        "train-00000000000000000002-00000002.parquet", "train-00000000000000000003-00000003.parquet"]
    assert sorted(p.kind for p in check(tmp_path)) == ["foreign part", "unreadable"]


def test_a_forged_part_in_a_committed_store_is_not_read(tmp_path):
    store = _three_flushes(tmp_path)
    forged = pd.DataFrame([{"run": tmp_path.name, "step": 99, "loss": -1.0}])
    duckdb.from_df(forged).write_parquet(str(tmp_path / "metrics" / "train-09999999999999999999-deadbeef.parquet"))
    assert store.steps("train") == {0, 1, 2}
    assert [p.kind for p in check(tmp_path)] == ["uncommitted"]


def test_store_check_lists_problems_and_repair_quarantines_them_without_deleting(tmp_path, cli):
    run = tmp_path / "run"
    _three_flushes(run)
    metrics = run / "metrics"
    part_files(run, "attention")[1].write_bytes(b"PAR1 truncated")
    (metrics / "notes.csv").write_text("a,b\n")
    (metrics / ".tmp-train-1.parquet").write_bytes(b"half")
    pq.write_table(pa.table({"run": ["run"], "step": [7]}), metrics / "train-00000000000000000007-00000007.parquet")
    before = {p.name for p in metrics.iterdir()}
    result = cli.invoke(app, ["store", "check", str(run)])
    assert result.exit_code == 1, result.output
    for kind in ("unreadable", "held back", "foreign file", "temporary", "uncommitted"):
        assert kind in result.output
    assert {p.name for p in metrics.iterdir()} == before  # check alone changes nothing
    result = cli.invoke(app, ["store", "check", str(run), "--repair"])
    assert result.exit_code == 0, result.output
    kept = {p.name for p in metrics.iterdir()} - {"quarantine"}
    moved = {p.name for p in (metrics / "quarantine").iterdir()}
    assert kept | moved == before and not kept & moved  # every file is somewhere, none twice
    assert {"notes.csv", ".tmp-train-1.parquet", "train-00000000000000000007-00000007.parquet"} <= moved
    assert cli.invoke(app, ["store", "check", str(run)]).exit_code == 0
    assert RunStore(run).steps("attention") == {0, 2}
    assert cli.invoke(app, ["store", "check", str(tmp_path / "missing")]).exit_code == 2
    assert cli.invoke(app, ["store", "check", str(tmp_path)]).exit_code == 0  # a study directory holding the run
    (tmp_path / "empty").mkdir()
    assert cli.invoke(app, ["store", "check", str(tmp_path / "empty")]).exit_code == 2


def test_duplicate_keys_are_found_and_repair_keeps_every_row_once(tmp_path):
    store = RunStore(tmp_path)
    store.append("attention", rows(0) + rows(1))
    store.flush()
    store.append("attention", rows(1) + rows(2))  # step 1 again (what a resume that forgot would write)
    store.flush()
    problems = check(tmp_path)
    assert [(p.kind, p.detail.split()[0]) for p in problems] == [("duplicate keys", "2")]
    repair(tmp_path)
    frame = store.sql("select step, head_index, count(*) n from attention group by all order by all")
    assert list(frame["step"]) == [0, 0, 1, 1, 2, 2] and set(frame["n"]) == {1}
    assert check(tmp_path) == []
    assert len(list((tmp_path / "metrics" / "quarantine").glob("attention-*"))) == 1


# ---- paths are data, never SQL ---------------------------------------------------------------------------------
NAMES = ["bob's run", "exp[1]", "a*b", "what?", "two  spaces", "naïve-ü-日本", "{a,b}", "100%",
         "x'); copy (select 1) to 'pwned.csv'; --"]


@pytest.mark.parametrize("name", NAMES)
def test_any_run_directory_name_writes_reads_and_queries(tmp_path, name, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / name
    store = RunStore(run)
    store.append("attention", rows(3))
    store.flush()
    assert store.tables() == ["attention", "qk", "ov"] and store.steps("attention") == {3}
    assert store.sql("select distinct run from attention")["run"].tolist() == [name]
    result = cli.invoke(app, ["sql", str(run), "select count(*) as n from qk", "--format", "csv"])
    assert result.exit_code == 0 and result.output.split() == ["n", "2"], result.output
    assert not list(tmp_path.rglob("pwned.csv"))


def test_glob_characters_in_a_name_match_only_that_directory(tmp_path):
    for name, step in (("exp[1]", 1), ("exp1", 10), ("a*", 2), ("ab", 20), ("?", 3), ("x", 30)):
        s = RunStore(tmp_path / name)
        s.append("train", [{"step": step, "loss": 0.0}])
        s.flush()
    assert RunStore(tmp_path / "exp[1]").steps("train") == {1}
    assert RunStore(tmp_path / "a*").steps("train") == {2}
    assert RunStore(tmp_path / "?").steps("train") == {3}
    assert RunStore(tmp_path).sql("select count(*) n from train")["n"][0] == 6  # a study reads each run once


def test_steps_filter_by_the_run_tag_as_a_parameter(tmp_path):
    for run in ("a", "b's run", "x' or '1'='1"):
        s = RunStore(tmp_path, run=run)
        s.append("train", [{"step": len(run), "loss": 0.0}])
        s.flush()
    assert RunStore(tmp_path, run="b's run").steps("train") == {7}
    assert RunStore(tmp_path, run="x' or '1'='1").steps("train") == {12}
    assert RunStore(tmp_path, run="c").steps("train") == set()
    with pytest.raises(InputError, match="unknown table"):
        RunStore(tmp_path).steps("train; drop view train")


# ---- sql is read-only by default -------------------------------------------------------------------------------
WRITES = ["copy (select 1) to 'out.csv'", "copy attention to 'out.csv'", "attach 'other.db' as o",
          "install httpfs", "load httpfs", "select * from read_csv('/etc/passwd')",
          "select * from read_text('/etc/hostname')", "export database 'dump'", "create table t as select 1",
          "set enable_external_access = true", "select 1; copy (select 1) to 'out.csv'"]


def test_sql_refuses_writes_and_file_access_but_reads_the_run(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _three_flushes(tmp_path / "run")
    run = str(tmp_path / "run")
    for query in WRITES:
        result = cli.invoke(app, ["sql", run, query])
        assert result.exit_code == 2 and "read-only" in result.output, (query, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not [p.name for p in tmp_path.iterdir() if p.name != "run"]  # nothing written
    result = cli.invoke(app, ["sql", run, "select count(*) as n from attention", "--format", "json"])
    assert result.exit_code == 0 and result.output.strip() == '[{"n":6}]'
    result = cli.invoke(app, ["sql", run, "copy (select step from train) to 'out.csv'", "--allow-writes"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.csv").read_text().split() == ["step", "0", "1", "2"]
    with pytest.raises(InputError, match="read-only"):
        RunStore(tmp_path / "run").sql("copy (select 1) to 'api.csv'")
    assert RunStore(tmp_path / "run").sql("select count(*) n from train", allow_writes=True)["n"][0] == 3


def test_sql_format_is_checked(tmp_path, cli):
    _three_flushes(tmp_path)
    result = cli.invoke(app, ["sql", str(tmp_path), "select 1", "--format", "xml"])
    assert result.exit_code == 2 and "table, csv, json" in result.output


def test_the_cli_says_a_skipped_part_in_one_line(tmp_path, cli):
    store = _three_flushes(tmp_path)
    part_files(tmp_path, "train")[0].write_bytes(b"")
    result = cli.invoke(app, ["sql", str(tmp_path), "select count(*) as n from train", "--format", "csv"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("warning:")] and lines[-2:] == ["n", "2"]
    assert store.steps("train") == {1, 2}



def test_report_on_a_run_with_a_bad_part_warns_in_one_line_and_writes_the_report(tmp_path):
    """The console script prints a skipped part as one ``warning:`` line (no Python file/line prefix) and the
    report is written from the rest."""
    import torch

    import rankscope as rs
    from rankscope.nn import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, n_layer=2, d_model=32, n_head=2, max_seq_len=16))
    mon = rs.Monitor(model, tmp_path / "run", every=1, tensorboard=False, kinds=("qk",))
    for step in (0, 1):
        mon.step(step)
        mon.flush()
    bad = part_files(tmp_path / "run", "spectra")[1]
    bad.write_bytes(bad.read_bytes()[:100])
    code = "import sys; from rankscope.cli import run; sys.argv[0] = 'rankscope'; run()"
    done = subprocess.run([sys.executable, "-c", code, "report", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    said = [ln for ln in done.stderr.splitlines() if str(bad) in ln]
    assert len(said) == 1 and said[0].startswith("warning: ") and ".py:" not in said[0], done.stderr
    assert (tmp_path / "run" / "report.html").exists()
