"""A form multiplied out by plain matmuls: the independent reference the kernel and probe tests compare against."""

import torch


def multiplied_out(form) -> torch.Tensor:
    """Σ over the form's terms of F1 @ F2 @ … in float64; a tuple or list of factors is one term."""
    terms = form.terms() if hasattr(form, "terms") else [form]
    total = 0
    for term in terms:
        out = term[0].double()
        for f in term[1:]:
            out = out @ f.double()
        total = total + out
    return total
