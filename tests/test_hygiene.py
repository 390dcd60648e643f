"""Importing rankscope leaves the process as it found it (users asked WeightWatcher for this).

Its dependencies (scipy, pandas) add warning filters of their own when imported; they are imported first, so
the test sees what rankscope itself changes."""

import subprocess
import sys


def test_import_changes_no_warning_filter_logging_level_or_thread_count():
    code = """
import logging, warnings, torch
import numpy, pandas, scipy.linalg, scipy.optimize, scipy.special  # dependencies set their own filters on import
before = (list(warnings.filters), logging.getLogger().level, torch.get_num_threads(), torch.get_default_dtype())
import rankscope, rankscope.analysis, rankscope.cli
after = (list(warnings.filters), logging.getLogger().level, torch.get_num_threads(), torch.get_default_dtype())
assert before == after, (before, after)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_threads_change_only_when_the_caller_asks_and_come_back_after():
    # in a fresh process with two torch and two BLAS threads, so a change or a missed restore shows
    code = """
import torch
torch.set_num_threads(2)
from threadpoolctl import threadpool_info, threadpool_limits
threadpool_limits(2, user_api="blas")
import rankscope as rs
from rankscope.spectra import kernels, thread_budget

def blas():
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

seen = []
squared = kernels.squared_singular_values
def spy(X):
    seen.append((torch.get_num_threads(), frozenset(blas())))
    return squared(X)
kernels.squared_singular_values = spy
rs.diagnose([torch.randn(30, 4), torch.randn(4, 30)])
rs.analyze(torch.nn.Sequential(torch.nn.Linear(8, 6)), threads=None)
assert seen and set(seen) == {(2, frozenset({2}))}, seen  # nothing asked: nothing changed
seen.clear()
rs.analyze(torch.nn.Sequential(torch.nn.Linear(8, 6)))
assert seen and set(seen) == {(1, frozenset({1}))}, seen  # analyze's default: one torch thread, one BLAS thread
assert torch.get_num_threads() == 2 and blas() == {2}
try:
    with thread_budget(torch=1, blas=1):
        rs.diagnose(torch.full((3, 3), float("nan")))
except rs.InputError:
    pass
assert torch.get_num_threads() == 2 and blas() == {2}, (torch.get_num_threads(), blas())  # after an error too
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
