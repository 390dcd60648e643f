"""``analyze --jobs N`` of one checkpoint: N worker processes over its layers give the table of one process (the
same rows in the same order, the same numbers), the progress bar ticks once per layer and matrix, ``--jobs`` and
``--threads`` are checked before any work, a model in memory is refused, and the null cache the workers share is
written atomically (a reader never sees half a file)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import rankscope.spectra.threads as threads
from formtools import save_tiny_gpt2
from rankscope.analysis import analyze_full
from rankscope.cli import app
from rankscope.errors import InputError

ENV = {"COLUMNS": "200"}
# float64 eigensolves of these 32-wide forms agree to about n·ε ≈ 1e-14 relative between two processes (the same
# BLAS, one thread each: in practice to the bit); 1e-9 leaves room for the ratios and fits built on them, and is far
# below any difference a wrong row or a wrong matrix would make (O(1)).
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A 3-layer GPT-2 of width 32 (4 heads), saved as model.safetensors with its config.json."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=3)


@pytest.fixture
def two_cores(monkeypatch):
    """Two jobs are allowed whatever this machine's core count (the tables' equality does not depend on it)."""
    cores = threads.usable_cores()
    monkeypatch.setattr(threads, "usable_cores", lambda: max(2, cores))


def assert_same_table(one: pd.DataFrame, two: pd.DataFrame) -> None:
    """Same columns and rows in the same order; numbers within float64 rounding, everything else exactly."""
    assert list(one.columns) == list(two.columns) and len(one) == len(two)
    for col in one.columns:
        a, b = one[col], two[col]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=col)
        elif col == "eigenvalues":
            for x, y in zip(a, b, strict=True):
                np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=col)
        else:
            assert a.dtype == b.dtype or a.dtype.kind not in "iub", col  # (a Parquet file's strings read back
            #   as pandas' string dtype)
            assert a.astype(str).tolist() == b.astype(str).tolist(), col  # ints, strings, nullable ints


def test_two_jobs_give_the_table_of_one_and_tick_once_per_layer_and_matrix(gpt2, two_cores):
    ticks_one, ticks_two = [], []
    one = analyze_full(gpt2, spectra=True, progress=lambda d, n, what: ticks_one.append((d, n, what)))
    two = analyze_full(gpt2, spectra=True, jobs=2, progress=lambda d, n, what: ticks_two.append((d, n, what)))
    assert_same_table(one.table, two.table)
    assert set(one.table["kind"]) >= {"qk", "ov", "attn_weight", "mlp_in", "mlp_out", "embedding"}
    assert sorted(one.table["layer"].unique()) == [-1, 0, 1, 2]
    assert sorted(one.diagnoses) == sorted(two.diagnoses)  # the diagnoses by row index: the same rows
    for i, d in one.diagnoses.items():
        torch.testing.assert_close(two.diagnoses[i].eigenvalues, d.eigenvalues, rtol=RTOL, atol=ATOL)
    # every layer and matrix ticks once, in whatever order the workers finish; the last tick is done == total
    total = 3 + len(one.table[one.table["kind"].isin(["attn_weight", "mlp_in", "mlp_out", "embedding"])]
                    .drop_duplicates("name"))
    assert [d for d, _, _ in ticks_one] == list(range(1, total + 1)) == [d for d, _, _ in ticks_two]
    assert {n for _, n, _ in ticks_two} == {total}
    assert sorted(w for _, _, w in ticks_two) == sorted(w for _, _, w in ticks_one)


def test_jobs_on_the_command_line_write_the_rows_of_one_process(gpt2, two_cores, tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(gpt2), "--per-layer", "--jobs", "2", "--out", str(tmp_path),
                                      "--no-figure"], env=ENV)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(tmp_path / "analysis.parquet")
    one = analyze_full(gpt2, per_head=False).table
    assert_same_table(one.reset_index(drop=True), rows)


@pytest.mark.parametrize(("args", "option"), [
    (["--jobs", "0"], "--jobs"), (["--jobs", str(threads.usable_cores() + 1)], "--jobs"),
    (["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"),
])
def test_jobs_and_threads_are_checked_before_any_work(monkeypatch, gpt2, args, option):
    import rankscope.analysis as analysis

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was read before the options were checked")

    monkeypatch.setattr(analysis, "_source", must_not_run)
    result = CliRunner().invoke(app, ["analyze", str(gpt2), *args], env=ENV)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and option in lines[0], result.output
    assert f"got {args[1]}" in lines[0]


def test_a_model_in_memory_is_refused_with_jobs_and_a_bad_count_names_jobs(two_cores):
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    with pytest.raises(InputError, match=r"jobs=2: worker processes open a checkpoint by its path.*Sequential"):
        analyze_full(model, jobs=2)
    for jobs in (0, True, 2.0, threads.usable_cores() + 1):
        with pytest.raises(InputError, match="jobs must be a positive number of processes"):
            analyze_full(model, jobs=jobs)
    assert len(analyze_full(model, jobs=1).table) == 1  # jobs=1: in this process, as before


# ---- the null cache the workers share ------------------------------------------------------------------------------

WRITER = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("nullcache", sys.argv[1])
nullcache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nullcache)
path, key, fill = sys.argv[2], sys.argv[3], float(sys.argv[4])
from pathlib import Path
for _ in range(int(sys.argv[5])):
    nullcache._save(Path(path), key, {"draws": np.full(1 << 19, fill)})  # 4 MB: a write takes a while
"""


def test_two_processes_writing_the_same_null_never_leave_half_a_file(tmp_path):
    # Two writers store the same key over and over (as two workers that simulated the same null do) while this
    # process reads it: every read finds either no file yet or one whole file, with one writer's values.
    from rankscope.spectra import nullcache

    path, key = tmp_path / "null.npz", "the same null"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, nullcache.__file__, str(path), key, str(fill), "15"])
               for fill in (1.0, 2.0)]
    reads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file would warn ("a damaged cached null")
        while True:
            running = any(w.poll() is None for w in writers)
            found = nullcache._load(path, key)
            if found is not None:
                values = np.unique(found["draws"])
                assert len(values) == 1 and values[0] in (1.0, 2.0) and found["draws"].size == 1 << 19
                reads += 1
            if not running:
                break
    assert [w.wait() for w in writers] == [0, 0]
    assert reads > 1  # read while they wrote, and after
    assert sorted(os.listdir(tmp_path)) == ["null.npz"]  # no temporary file left behind
