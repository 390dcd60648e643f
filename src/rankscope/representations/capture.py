"""Collect activations of named modules with forward hooks, streaming and memory-bounded.

`capture(model, layers, inputs, max_samples)` runs the model on every batch under torch.no_grad() and keeps, per
layer, at most `max_samples` rows: the first rows (`sample="first"`) or a uniform reservoir sample over all rows
seen (`sample="reservoir"`, Vitter's algorithm R, vectorised per batch). Peak memory is O(max_samples·D) per layer
plus one batch of activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from rankscope.errors import InputError


def _rows(out, name: str) -> torch.Tensor:
    """Module output → (rows, D) float64: tuple outputs take element 0; leading dims (batch, tokens) are flattened."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise InputError(f"layers: module {name!r} returned an empty tuple")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"layers: module {name!r} returned {type(out).__name__}, not a tensor")
    if out.ndim == 0:
        raise InputError(f"layers: module {name!r} returned a scalar")
    X = out.detach().reshape(-1, out.shape[-1]) if out.ndim > 1 else out.detach().reshape(-1, 1)
    return X.to(device="cpu", dtype=torch.float64)  # (B·T, D)


class _Reservoir:
    """At most `cap` rows: the first `cap`, or a uniform sample of all rows offered (algorithm R, vectorised)."""

    def __init__(self, cap: int | None, mode: str, generator: torch.Generator) -> None:
        self.cap, self.mode, self.g = cap, mode, generator
        self.parts: list[torch.Tensor] = []
        self.kept = 0  # rows in parts
        self.buf: torch.Tensor | None = None  # (cap, D) once full
        self.seen = 0  # rows offered so far

    def offer(self, X: torch.Tensor) -> None:  # X (B, D)
        if self.buf is None:  # still filling (or uncapped)
            take = X if self.cap is None else X[: self.cap - self.kept]
            self.parts.append(take)
            self.kept += take.shape[0]
            self.seen += take.shape[0]
            X = X[take.shape[0]:]
            if self.cap is not None and self.kept == self.cap:
                self.buf, self.parts = torch.cat(self.parts), []
        if X.shape[0] == 0 or self.mode == "first":
            return
        t = self.seen + torch.arange(X.shape[0], dtype=torch.float64)  # 0-based index of each row in the stream
        j = (torch.rand(X.shape[0], generator=self.g, dtype=torch.float64) * (t + 1)).floor().long()  # U{0..t}
        sel = (j < self.cap).nonzero().squeeze(1)  # rows that enter the reservoir
        slots, inv = torch.unique(j[sel], return_inverse=True)
        last = torch.full_like(slots, -1).scatter_reduce(0, inv, sel, "amax")  # later rows overwrite earlier ones
        self.buf[slots] = X[last]
        self.seen += X.shape[0]

    def result(self) -> torch.Tensor:
        if self.buf is not None:
            return self.buf
        return torch.cat(self.parts) if self.parts else torch.zeros(0, 0, dtype=torch.float64)


def capture(model: nn.Module, layers: Sequence[str], inputs: Iterable, max_samples: int | None = 10_000,
            sample: str = "first", seed: int = 0) -> dict[str, torch.Tensor]:
    """name → (N, D) float64 activations of each module in `layers` (names as in `model.named_modules()`).

    `inputs`: an iterable of batches, each a tensor (called as model(x)), a tuple (model(*x)) or a mapping
    (model(**x)). Sequence outputs (B, T, D) give B·T rows. At most `max_samples` rows per layer (None: keep all),
    the first ones or a uniform reservoir sample (`sample="reservoir"`).
    """
    if sample not in ("first", "reservoir"):
        raise InputError(f"sample: must be 'first' or 'reservoir', got {sample!r}")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples: must be positive or None, got {max_samples}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        known = [n for n in modules if n][:12]
        raise InputError(f"layers: no module named {', '.join(map(repr, missing))} in the model "
                         f"(some names: {', '.join(known)})")
    g = torch.Generator().manual_seed(seed)
    store = {n: _Reservoir(max_samples, sample, g) for n in layers}
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: store[n].offer(_rows(out, n)))
               for n in layers]
    try:
        with torch.no_grad():
            for batch in inputs:
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: store[n].result() for n in layers}
