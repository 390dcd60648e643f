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
