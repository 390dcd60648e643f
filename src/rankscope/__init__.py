"""rankscope: rank collapse in neural networks, measured with random-matrix theory."""

from rankscope.errors import CheckpointError, InputError, RankscopeError
from rankscope.spectra import Diagnosis, diagnose, diagnose_batch

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Diagnosis", "InputError", "RankscopeError", "diagnose", "diagnose_batch"]
