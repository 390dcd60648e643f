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
