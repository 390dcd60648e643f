"""``device``: "auto" is the CPU where torch sees no CUDA device, "cuda" there is refused before any work (exit code
2, one line naming it), an explicit device moves every tensor as it is read and gives the table of the default
route, and a GPU with worker processes is refused. The CUDA route itself runs in benchmarks/gpu_scale.sh."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import rankscope.cli
from rankscope.analysis import analyze_full, resolve_device
from rankscope.cli import app
from rankscope.commands.analyze import cli_device
from rankscope.errors import InputError
from test_jobs import assert_same_table, gpt2, two_cores  # noqa: F401 (fixtures)


def test_devices_resolve_and_bad_ones_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) is None
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    for bad in ("tpu", "auto:0", 3, "cuda0"):
        with pytest.raises(InputError, match="device must be one of auto, cpu, cuda"):
            resolve_device(bad)
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(InputError, match="there are 1 CUDA devices"):
        resolve_device("cuda:1")
    assert cli_device("auto", 2) == "cpu"  # worker processes share the CPU's cores
    with pytest.raises(InputError, match="--jobs 2 with --device cuda"):
        cli_device("cuda", 2)


def test_an_explicit_device_gives_the_table_of_the_default(gpt2):  # noqa: F811
    plain = analyze_full(str(gpt2), spectra=True).table
    moved = analyze_full(str(gpt2), spectra=True, device="cpu").table
    assert_same_table(plain, moved)


def test_cuda_without_one_exits_2_before_any_work(monkeypatch, gpt2):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rankscope.cli.console, "width", 200)

    def must_not_run(*a, **k):
        raise AssertionError("analysis started")

    monkeypatch.setattr("rankscope.analysis.analyze_full", must_not_run)
    result = CliRunner().invoke(app, ["analyze", str(gpt2), "--device", "cuda"], prog_name="rankscope")
    assert result.exit_code == 2
    assert "no CUDA device" in result.output and len(result.output.strip().splitlines()) == 1
