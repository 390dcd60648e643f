"""rankscope: rank collapse in neural networks, measured with random-matrix theory."""

from rankscope.errors import CheckpointError, InputError, RankscopeError

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "Diagnosis", "InputError", "Monitor", "RankscopeError", "RunStore", "analyze", "capture",
    "describe", "diagnose", "diagnose_batch", "diff", "summary",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str):  # everything but the errors is imported on first use (torch, pandas, the probes), so
    # ``rankscope --help`` and ``import rankscope.errors`` stay fast
    if name in ("diagnose", "diagnose_batch", "Diagnosis"):
        import rankscope.spectra as spectra

        found = getattr(spectra, name)
    elif name == "analyze":
        from rankscope.analysis import analyze as found
    elif name == "summary":
        from rankscope.analysis.summary import summary as found
    elif name == "describe":
        from rankscope.analysis.describe import describe as found
    elif name == "diff":
        from rankscope.analysis.diff import diff as found
    elif name == "Monitor":  # training-time diagnostics (docs/design.md §3)
        from rankscope.train.monitor import Monitor as found
    elif name == "RunStore":
        from rankscope.store import RunStore as found
    elif name == "capture":
        from rankscope.representations.capture import capture as found
    else:
        raise AttributeError(f"module 'rankscope' has no attribute {name!r}")
    return found
