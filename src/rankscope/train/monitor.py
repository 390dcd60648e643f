"""``Monitor``: spectral diagnostics of a model while it trains, written to the run store.

Every ``every`` steps (or at the steps of a ``schedule``, e.g. ``train.config.monitor_schedule``: dense early, so
onsets are resolved) it diagnoses each layer's and each head's attention forms (query–key, and OV) under
both nulls (the structure-matched product null and the naive MP fit, side by side), and the other weight
matrices, under ``torch.no_grad``; per-head query–key forms also at the relative ``offsets`` Δ (an ``offset``
column; layer forms at Δ = 0); rows go to the store's ``attention``/``weights`` tables, eigenvalues and the
fitted null's quantiles to ``spectra``. It records its own wall time, so its overhead is measured. Its numerics
run under ``thread_budget(torch=1, blas=threads)``, ``threads`` = 1 by default, and each call gives the caller's
counts back after, so a training loop's own thread settings are untouched between calls (``threads=None``: the
numerics run on whatever the process has).

    mon = rs.Monitor(model, "runs/x", every=50)   # rows reach disk every 30 s, at checkpoints and at close
    for step in range(steps): ...; mon.step(step)
    mon.close()
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch

from rankscope.analysis import analyze_full, spectra_rows
from rankscope.spectra.threads import check_count, thread_budget
from rankscope.store import RunStore
from rankscope.vocab import ATTENTION_KINDS, MONITOR_NULLS, QK, variant_of


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


class Monitor:
    """Training-time diagnostics; ``step(step)`` in any loop, ``log(step, loss=…)`` for scalars."""

    def __init__(self, model: torch.nn.Module, run_dir: str | Path, every: int = 50, *,
                 nulls: tuple[str, ...] = MONITOR_NULLS, per_head: bool = True,
                 kinds: tuple[str, ...] | None = None, fpr: float = 0.01,
                 run: str | None = None, store: RunStore | None = None, flush_seconds: float = 30.0,
                 tensorboard: bool = True, threads: int | None = 1, schedule: Iterable[int] | None = None,
                 offsets: Iterable[int] = (0,), sweep: str | None = None):
        if threads is not None:
            check_count(threads, "Monitor: threads")
        self.model = model
        self.schedule = None if schedule is None else frozenset(int(s) for s in schedule)  # replaces ``every``
        self.offsets = tuple(int(o) for o in offsets)
        self.every, self.nulls, self.per_head, self.fpr = every, tuple(nulls), per_head, fpr
        self.kinds = None if kinds is None else tuple(kinds)  # None: every kind group; a model with no attention
        #   layout is then read as plain matrices, with one warning (attention kinds asked of it: an InputError)
        self._warned = False
        self.threads = threads
        self.store = store or RunStore(run_dir, run=run, sweep=sweep)
        self.flush_seconds = flush_seconds  # write a Parquet part when the last one is this old (0: every step)
        self._last_flush = time.perf_counter()
        self.seconds = 0.0  # wall time spent in diagnostics and writing
        self.calls = 0
        self._done = self.store.steps("attention") | self.store.steps("weights")  # resumed runs skip these steps
        self._logged = self.store.steps("train")
        self._repr_done = self.store.steps("repr")
        self._tb = _tensorboard(Path(run_dir) / "events") if tensorboard else None

    def due(self, step: int) -> bool:
        if step in self._done:
            return False
        if self.schedule is not None:
            return step in self.schedule
        return self.every > 0 and step % self.every == 0

    def step(self, step: int, force: bool = False) -> bool:
        """Diagnose the model now if ``step`` is a multiple of ``every`` (or ``force``); True if it did."""
        if not (self.due(step) or (force and step not in self._done)):
            return False
        start = time.perf_counter()
        self.diagnose(step)
        if time.perf_counter() - self._last_flush >= self.flush_seconds:
            self.flush()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return True

    @torch.no_grad()
    def diagnose(self, step: int) -> None:
        model = _unwrap(self.model)
        config = getattr(model, "config", None)
        variant = getattr(config, "attention", None)
        if isinstance(variant, str):  # a rankscope model: the one name of train, study, store and report
            variant = variant_of(variant, getattr(config, "rope_mode", None))
        found = analyze_full(model, per_head=self.per_head, kinds=self.kinds, null=self.nulls, fpr=self.fpr,
                             threads=self.threads, offsets=self.offsets)
        if found.notes and not self._warned:
            for note in found.notes:
                warnings.warn(f"Monitor: {note}", stacklevel=3)
            self._warned = True
        table = found.table
        if not table.empty:
            table = table.assign(step=step)
            if variant is not None:
                table["variant"] = table["variant"].where(table["variant"].astype(bool), variant)
            attention = table["kind"].isin(ATTENTION_KINDS)
            self.store.append("attention", table[attention])
            self.store.append("weights", table[~attention])
            self.store.append("spectra", spectra_rows(found, step=step))
            if self._tb is not None:
                layers = table[attention & (table["head_index"] < 0) & (table["kind"] == QK)]
                for r in layers.itertuples():
                    for key in ("outliers", "spikes", "spike_strength", "stable_rank", "effective_rank"):
                        self._tb.add_scalar(f"qk_{r.null}/layer{r.layer}/{key}", float(getattr(r, key)), step)
        self._done.add(step)

    @torch.no_grad()
    def representations(self, step: int, features: torch.Tensor, next_tokens: torch.Tensor, W=None,
                        top_k: int = 256) -> dict[str, float]:
        """Linguistic collapse of top-layer features (N, D) classed by their next token (Wu & Papyan 2024), plus
        RankMe and stable rank of the features; written to the ``repr`` table. Timed like the spectra."""
        from rankscope import representations as rr

        if step in self._repr_done:
            return {}
        start = time.perf_counter()
        H = features.detach().reshape(-1, features.shape[-1]).double().cpu()  # (N, D)
        y = next_tokens.detach().reshape(-1).cpu()  # (N,)
        with self._budget():
            values = rr.linguistic_collapse(H, y, top_k=top_k, W=None if W is None else W.detach().double().cpu())
            values.update(rankme=float(rr.rankme(H)), stable_rank=float(rr.stable_rank(H)))
        self.store.append("repr", [{"step": step, "layer": "final", **values}])
        self._repr_done.add(step)
        self.seconds += time.perf_counter() - start
        return values

    def _budget(self):
        """The thread budget of the numerics: one torch and ``threads`` BLAS threads, restored after (None: none)."""
        return nullcontext() if self.threads is None else thread_budget(torch=1, blas=self.threads)

    def log(self, step: int, **scalars: float) -> None:
        """Scalars for the ``train`` table (loss, val_loss, lr, …); a step already stored is not written again."""
        if step in self._logged:
            return
        self._logged.add(step)
        self.store.append("train", [{"step": step, **{k: float(v) for k, v in scalars.items()}}])
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", float(value), step)

    def flush(self) -> None:
        """Write the buffered rows as Parquet parts (the trainer also calls this before every checkpoint)."""
        self.store.flush()
        self._last_flush = time.perf_counter()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        start = time.perf_counter()
        self.flush()
        self.seconds += time.perf_counter() - start
        if self._tb is not None:
            self._tb.close()


def _tensorboard(path: Path):
    """A TensorBoard writer when ``tensorboard`` is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
