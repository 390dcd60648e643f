import os
from pathlib import Path

import pytest

# Simulated nulls go to a cache inside the repo (ignored by git), shared by the test workers.
os.environ.setdefault("RANKSCOPE_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "nulls"))
# Tokenizers and token streams too (keyed by the corpus fingerprint, so sharing them between tests is safe).
os.environ.setdefault("RANKSCOPE_DATA_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "data"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one intra-op thread each, or torch's spinning threads fight over the cores.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (small matrices: threads only add contention), then restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
