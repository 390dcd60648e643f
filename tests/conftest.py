import os
from pathlib import Path

import pytest

# Simulated nulls go to a cache inside the repo (ignored by git), shared by the test workers.
os.environ.setdefault("RANKSCOPE_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "nulls"))
# Tokenizers and token streams too (keyed by the corpus fingerprint, so sharing them between tests is safe).
os.environ.setdefault("RANKSCOPE_DATA_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "data"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread and one BLAS thread each, whatever OPENBLAS_NUM_THREADS says,
    # or the threads of the two workers fight over the cores.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")


@pytest.fixture
def one_thread():
    """One torch intra-op thread and one BLAS thread for a test (small matrices: threads only add contention),
    then the counts it found."""
    from rankscope.spectra import thread_budget

    with thread_budget(torch=1, blas=1):
        yield


# ---- scheduling under pytest-xdist ------------------------------------------------------------------------------
# `-n 2` means `--dist load`: each test goes to whichever worker is free, so a module fixture is built on every worker
# that runs one of the module's tests (the toy study of test_study.py was trained twice, once per worker). The modules
# named here run whole on one worker; every other test is still scheduled one by one. (xdist's own `xdist_group` mark
# does nothing under pytest 9: its `--dist loadgroup` renames items through `item._nodeid`, which pytest 9 ignores.)
ONE_WORKER = {"tests/test_study.py"}  # its module fixture trains six toy runs and writes their report


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """(pytest-xdist) Under `--dist load`: the tests of a module in ``ONE_WORKER`` as one unit of work, the largest
    units first, every other test a unit of its own."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER else nodeid

    return ModulesOnOneWorker(config, log)
