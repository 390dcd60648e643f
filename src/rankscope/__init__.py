"""rankscope: rank collapse in neural networks, measured with random-matrix theory."""

from rankscope.errors import CheckpointError, InputError, RankscopeError
from rankscope.spectra import Diagnosis, diagnose, diagnose_batch

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "Diagnosis", "InputError", "Monitor", "RankscopeError", "RunStore", "analyze", "capture",
    "diagnose", "diagnose_batch",
]


def __getattr__(name: str):
    if name == "analyze":  # imported on first use: it brings pandas
        from rankscope.analysis import analyze

        return analyze
    if name == "Monitor":  # training-time diagnostics (docs/design.md §3), on first use
        from rankscope.train.monitor import Monitor

        return Monitor
    if name == "RunStore":
        from rankscope.store import RunStore

        return RunStore
    if name == "capture":  # the representations package, on first use
        from rankscope.representations.capture import capture

        return capture
    raise AttributeError(f"module 'rankscope' has no attribute {name!r}")
