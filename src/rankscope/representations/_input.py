"""Input checks shared by the representation metrics: features become float64 torch tensors, labels int64.

Every failure raises InputError naming the argument and the problem; nothing returns a silent NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from rankscope.errors import InputError


def features(X, name: str = "H", min_rows: int = 1) -> torch.Tensor:
    """X (N, D) as a float64 CPU tensor, after checking it is 2-D, finite and has at least `min_rows` rows."""
    if isinstance(X, np.ndarray) or not isinstance(X, torch.Tensor):
        try:
            X = torch.as_tensor(np.asarray(X))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: cannot be read as a numeric array ({exc})") from exc
    if X.dtype.is_complex or X.dtype == torch.bool:
        raise InputError(f"{name}: expected real numbers, got dtype {X.dtype}")
    X = X.detach().to(device="cpu", dtype=torch.float64)
    if X.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (N, D) matrix, got shape {tuple(X.shape)}")
    if X.shape[0] < min_rows or X.shape[1] == 0:
        raise InputError(f"{name}: needs at least {min_rows} rows and 1 column, got shape {tuple(X.shape)}")
    bad = ~torch.isfinite(X)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name}: {int(bad.sum())} NaN/Inf entries (first at row {r}, column {c})")
    return X


def labels(y, n: int, name: str = "y", min_classes: int = 2) -> torch.Tensor:
    """y (N,) as int64, checked: same length as the features, integer-valued, ≥ `min_classes` distinct values."""
    try:
        t = torch.as_tensor(np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as integer labels ({exc})") from exc
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
    if t.ndim != 1:
        raise InputError(f"{name}: expected a 1-D vector of labels, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise InputError(f"{name}: has {t.shape[0]} labels but the features have {n} rows")
    if t.dtype.is_floating_point:
        if not torch.isfinite(t).all():
            raise InputError(f"{name}: contains NaN/Inf")
        if not torch.equal(t, t.round()):
            raise InputError(f"{name}: labels must be integers, got non-integer values")
    elif t.dtype == torch.bool or t.dtype.is_complex:
        raise InputError(f"{name}: labels must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    k = int(torch.unique(t).numel())
    if k < min_classes:
        raise InputError(f"{name}: needs at least {min_classes} distinct classes, got {k}")
    return t


def same_width(A: torch.Tensor, B: torch.Tensor, a: str, b: str) -> None:
    """Raise unless A and B have the same number of columns (feature dimension)."""
    if A.shape[1] != B.shape[1]:
        raise InputError(f"{b}: has {B.shape[1]} columns but {a} has {A.shape[1]}; they must share the feature dim")
