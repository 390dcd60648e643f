"""Thread counts: ``analyze`` (the command, ``rs.analyze``) and the ``Monitor`` run their numerics on one torch and
one BLAS thread by default and give the caller's counts back after; ``diagnose`` changes nothing unless asked;
a worker process of ``worker_pool`` has one torch and the asked BLAS threads. The counts are observed inside
the numerics by a spy on ``diagnose._diagnose_form`` (every diagnosis passes through it), starting from two
torch and two BLAS threads, so a change or a missed restore shows."""

from __future__ import annotations

import importlib

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits
from typer.testing import CliRunner

import rankscope as rs
from rankscope.cli import app
from rankscope.errors import InputError
from rankscope.spectra.threads import check_jobs, thread_budget, usable_cores, worker_pool

diagnose_module = importlib.import_module("rankscope.spectra.diagnose")  # (the package's ``diagnose`` is the function)
pytestmark = pytest.mark.filterwarnings("ignore:.*no config.json")  # the models here have no attention layout


def blas() -> frozenset[int]:
    return frozenset(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.fixture
def seen(monkeypatch):
    """Two torch and two BLAS threads for the test (the caller's), and the (torch, BLAS) counts each diagnosis ran
    with; the counts from before the test are restored after it."""
    found: list[tuple[int, frozenset[int]]] = []
    inner = diagnose_module._diagnose_form

    def spy(*args, **kwargs):
        found.append((torch.get_num_threads(), blas()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(diagnose_module, "_diagnose_form", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            assert torch.get_num_threads() == 2 and blas() == {2}
            yield found
    finally:
        torch.set_num_threads(before)


def ran_with(found: list, counts: tuple[int, int]) -> bool:
    """Every diagnosis ran with these (torch, BLAS) counts, and the caller's two and two are back."""
    ok = bool(found) and set(found) == {(counts[0], frozenset({counts[1]}))}
    found.clear()
    return ok and torch.get_num_threads() == 2 and blas() == {2}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


def test_analyze_runs_on_one_thread_each_by_default_and_gives_the_counts_back(seen):
    rs.analyze(mlp(), null="mp")
    assert ran_with(seen, (1, 1))
    rs.analyze(mlp(), null="mp", threads=2)  # an override of the BLAS threads; torch keeps one
    assert ran_with(seen, (1, 2))
    rs.analyze(mlp(), null="mp", threads=None)  # the process's own counts
    assert ran_with(seen, (2, 2))


def test_the_analyze_command_runs_on_one_thread_each_and_gives_the_counts_back(seen, tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(40, 30), "b.weight": torch.randn(30, 20)}, tmp_path / "w.safetensors")
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "w.safetensors"), "--null", "mp"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert ran_with(seen, (1, 1))


def test_the_monitor_runs_on_one_thread_each_and_leaves_the_loops_counts_alone(seen, tmp_path):
    model = mlp()
    monitor = rs.Monitor(model, tmp_path / "run", every=1, tensorboard=False, nulls=("mp",))
    for step in range(2):  # a training loop's steps between the monitor's calls keep the loop's counts
        assert torch.get_num_threads() == 2 and blas() == {2}
        monitor.step(step)
        assert ran_with(seen, (1, 1))
    own = rs.Monitor(model, tmp_path / "own", every=1, tensorboard=False, nulls=("mp",), threads=None)
    own.step(0)
    assert ran_with(seen, (2, 2))
    with pytest.raises(InputError, match="Monitor: threads must be a positive count; got 0"):
        rs.Monitor(model, tmp_path / "bad", threads=0)


def test_diagnose_changes_nothing_unless_asked(seen):
    torch.manual_seed(0)
    w, heads = torch.randn(30, 20), torch.randn(3, 30, 20)  # (B, n, m)
    rs.diagnose(w, null="mp")
    rs.diagnose_batch(heads, null="mp")
    diagnose_module.diagnose_nulls(w, ("mp",))
    assert ran_with(seen, (2, 2))
    rs.diagnose(w, null="mp", threads=1)
    rs.diagnose_batch(heads, null="mp", threads=1)
    diagnose_module.diagnose_nulls(w, ("mp",), threads=1)
    assert ran_with(seen, (1, 1))
    with pytest.raises(InputError):  # after an error too
        rs.diagnose(torch.full((3, 3), float("nan")), threads=1)
    assert torch.get_num_threads() == 2 and blas() == {2}
    with pytest.raises(InputError, match="BLAS threads must be a positive count; got 0"):
        rs.diagnose(w, threads=0)


def test_a_pool_worker_has_one_torch_thread_and_the_asked_blas_threads():
    with worker_pool(1, blas=1) as pool:
        torch_threads = pool.submit(torch.get_num_threads).result()
        info = pool.submit(threadpool_info).result()
    assert torch_threads == 1
    assert {p["num_threads"] for p in info if p["user_api"] == "blas"} == {1}


def test_counts_are_checked():
    for bad in (0, -1, True, 1.5, None):
        with pytest.raises(InputError, match="--jobs must be a positive number of processes"):
            check_jobs(bad, "--jobs")
    with pytest.raises(InputError, match=f"at most the {usable_cores()} usable cores; got {usable_cores() + 1}"):
        check_jobs(usable_cores() + 1, "--jobs")
    assert check_jobs(usable_cores()) == usable_cores()
    with pytest.raises(InputError, match="torch threads must be a positive count"), thread_budget(torch=0):
        pass
