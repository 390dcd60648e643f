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


def test_the_numerics_run_on_one_torch_thread_and_give_the_callers_count_back():
    # in a fresh process with torch's default of several threads, so the restore is not a no-op
    code = """
import torch
torch.set_num_threads(2)
import rankscope as rs
from rankscope.spectra import kernels
seen = []
squared = kernels.squared_singular_values
def spy(X):
    seen.append(torch.get_num_threads())
    return squared(X)
kernels.squared_singular_values = spy
rs.diagnose([torch.randn(30, 4), torch.randn(4, 30)])
rs.analyze(torch.nn.Sequential(torch.nn.Linear(8, 6)))
try:
    rs.diagnose(torch.full((3, 3), float("nan")))
except rs.InputError:
    pass
assert seen and set(seen) == {1}, seen
assert torch.get_num_threads() == 2, torch.get_num_threads()  # restored, after an error too
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
