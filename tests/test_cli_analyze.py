"""``rankscope analyze`` on the command line: options checked before any work (one line, exit 2), output where it
was asked for (``--out`` alone writes Parquet that pandas reads; ``--format csv`` alone prints CSV), a table for
every kind asked, ``-h`` and ``--version``."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from formtools import save_tiny_gpt2
from rankscope.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "200"}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's console is made at import; under xdist it has no terminal: one line a row, as on a wide one."""
    import rankscope.cli

    monkeypatch.setattr(rankscope.cli.console, "width", 200)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A safetensors file of two plain matrices, no config: no attention layout."""
    path = tmp_path_factory.mktemp("plain") / "w.safetensors"
    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(40, 30), "b.weight": torch.randn(30, 20)}, path)
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=2)


def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--null", "bogus"], "null must be one of product, mp, tw, permutation; got 'bogus'"),
    (["--null", "tw"], "--null tw (the Tracy–Widom edge) is defined for a single matrix"),
    (["--null", "tw", "--kinds", "qk"], "--null tw (the Tracy–Widom edge) is defined for a single matrix"),
    (["--format", "xml"], "--format must be one of table, csv, parquet, json; got 'xml'"),
    (["--format", "parquet"], "--format parquet writes a file: give --out DIR"),
    (["--kinds", "mlp,nope"], "unknown kinds ['nope']"),
    (["--fpr", "0.9"], "fpr must be a number in (0, 0.5]"),
    (["--experts", "sample:x"], "experts must be all, none or sample:K"),
    (["--jobs", "0"], "--jobs must be a positive number of processes"),
    (["--format", "table", "--out", "unused"], "--format table prints, it writes no rows file"),
])
def test_bad_options_exit_2_with_one_line_before_any_work(monkeypatch, plain, args, message):
    import rankscope.analysis as analysis

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was read before the options were checked")

    monkeypatch.setattr(analysis, "_source", must_not_run)
    result = runner.invoke(app, ["analyze", str(plain), *args], env=ENV)
    assert result.exit_code == 2
    assert message in _one_line(result)


def test_attention_kinds_on_a_model_without_a_layout_exit_2(plain):
    result = runner.invoke(app, ["analyze", str(plain), "--kinds", "qk"], env=ENV)
    assert result.exit_code == 2
    line = _one_line(result)
    assert "no config.json (model_type unknown)" in line and "per-head attention forms need a layout" in line


def test_without_a_layout_one_note_says_why_and_every_matrix_is_analysed(plain, tmp_path):
    result = runner.invoke(app, ["analyze", str(plain), "--out", str(tmp_path)], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.output.count("note:") == 1 and "analysed as single matrices" in result.output
    rows = pd.read_parquet(tmp_path / "analysis.parquet")  # --out alone: Parquet, read back by pandas (pyarrow)
    assert sorted(rows["name"]) == ["a.weight", "b.weight"] and rows["stable_rank"].notna().all()


def test_the_table_shows_every_kind_asked(gpt2):
    result = runner.invoke(app, ["analyze", str(gpt2), "--kinds", "mlp,weights"], env=ENV)
    assert result.exit_code == 0, result.output
    assert "Model summary" in result.output
    for kind in ("mlp_in", "mlp_out", "embedding", "attn_weight"):
        assert kind in result.output
    assert "spikiest head" not in result.output  # no attention kind was asked


def test_csv_alone_goes_to_stdout_and_the_rest_to_stderr(gpt2):
    cmd = [sys.executable, "-m", "rankscope.cli", "analyze", str(gpt2), "--kinds", "qk", "--format", "csv"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(io.StringIO(done.stdout))  # stdout is the CSV and nothing else
    assert set(rows["kind"]) == {"qk"} and sorted(set(rows["layer"])) == [0, 1]
    assert len(rows) == 2 * (1 + 4) and "Per layer" in done.stderr


def test_help_and_version():
    from importlib.metadata import version

    assert runner.invoke(app, ["--version"]).output.strip() == f"rankscope {version('rankscope')}"
    for args in (["-h"], ["analyze", "-h"]):
        result = runner.invoke(app, args, env=ENV)
        assert result.exit_code == 0 and "Usage" in result.output


def test_a_directory_of_checkpoints_is_a_series_with_a_step_column(tmp_path):
    import transformers

    from rankscope.store import RunStore

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=16)
    for step in (10, 20):
        torch.manual_seed(step)
        transformers.LlamaModel(cfg).save_pretrained(tmp_path / "trainer" / f"checkpoint-{step}")
    result = runner.invoke(app, ["analyze", str(tmp_path / "trainer"), "--kinds", "qk"], env=ENV)
    assert result.exit_code == 2 and "give --out DIR" in _one_line(result)
    result = runner.invoke(app, ["analyze", str(tmp_path / "trainer"), "--out", str(tmp_path / "s"), "--format", "csv"],
                           env=ENV)
    assert result.exit_code == 2 and "a series is a run store" in _one_line(result)
    result = runner.invoke(app, ["analyze", str(tmp_path / "trainer"), "--kinds", "qk", "--out",
                                 str(tmp_path / "series")], env=ENV)
    assert result.exit_code == 0, result.output
    qk = RunStore(tmp_path / "series").sql("SELECT step, layer, head_index FROM qk")
    assert sorted(set(qk["step"])) == [10, 20] and len(qk) == 2 * 2 * (1 + 4)
