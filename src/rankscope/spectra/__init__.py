"""Pure numerics on tensors: forms, their spectra, random-matrix laws, nulls, metrics and ``diagnose``."""

from rankscope.spectra.diagnose import Diagnosis, diagnose, diagnose_batch, diagnose_nulls
from rankscope.spectra.form import Chain, Form, Structure, Sum, stack
from rankscope.spectra.kernels import prepare, spectrum
from rankscope.spectra.threads import thread_budget

__all__ = ["Chain", "Diagnosis", "Form", "Structure", "Sum", "diagnose", "diagnose_batch", "diagnose_nulls",
           "prepare", "spectrum", "stack", "thread_budget"]
