"""Pure numerics on tensors: spectra of forms, random-matrix laws, nulls, metrics and ``diagnose``."""

from rankscope.spectra.diagnose import Diagnosis, diagnose, diagnose_batch
from rankscope.spectra.kernels import as_form, spectrum

__all__ = ["Diagnosis", "as_form", "diagnose", "diagnose_batch", "spectrum"]
