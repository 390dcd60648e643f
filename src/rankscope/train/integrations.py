"""Adapters that run the ``Monitor`` inside other training loops: Hugging Face ``Trainer`` and Lightning.

    from rankscope.train.integrations import RankscopeCallback, RankscopeLightningCallback
    Trainer(model=model, args=args, train_dataset=data, callbacks=[RankscopeCallback("runs/x", every=50)])
    lightning.Trainer(callbacks=[RankscopeLightningCallback("runs/x", every=50)])

Each callback diagnoses the model when training starts (step 0 of a fresh run) and then every ``every``
optimizer steps, writes the loop's logged scalars to the store's ``train`` table, and closes the monitor at
the end. Only the main process (rank 0) writes. TensorBoard scalars come from the ``Monitor`` itself when the
``tensorboard`` package is installed.

transformers and lightning are optional: this module imports without them, and each callback class is built
on first access (``ImportError`` naming the extra to install when its package is missing).
"""

from __future__ import annotations

import numbers
from functools import cache
from pathlib import Path

import torch

from rankscope.train.monitor import Monitor

__all__ = ["RankscopeCallback", "RankscopeLightningCallback"]  # noqa: F822 (built on first access, __getattr__)


def _scalars(values: dict) -> dict[str, float]:
    """The entries of ``values`` that are real numbers (Python numbers or one-element tensors), as floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            out[key] = float(value.item())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _diagnosable(root: torch.nn.Module) -> torch.nn.Module:
    """The first module under ``root`` (itself included) that ``analyze`` understands as a whole model: a
    rankscope model (``attention_layers``) or a transformers model (a ``config`` with ``to_dict``). A
    LightningModule usually holds the model as an attribute; without such a module, ``root`` itself."""
    for module in root.modules():
        if hasattr(module, "attention_layers") or hasattr(getattr(module, "config", None), "to_dict"):
            return module
    return root


class _StepLogs:
    """Scalars logged for each step, merged (a loop may log loss and eval_loss for one step in two calls) and
    handed to ``Monitor.log`` once the step is complete, since the store writes each step's row once."""

    def __init__(self):
        self.pending: dict[int, dict[str, float]] = {}

    def add(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            self.pending.setdefault(step, {}).update(scalars)

    def write(self, monitor: Monitor, before: int | None = None) -> None:
        """Log every pending step (only those below ``before`` when given)."""
        for step in sorted(self.pending):
            if before is None or step < before:
                monitor.log(step, **self.pending.pop(step))


def _publish(cls: type) -> None:
    """Name a class built in a factory as this module's attribute, so pickle and reprs find it here."""
    cls.__module__, cls.__qualname__ = __name__, cls.__name__


def _missing(package: str, extra: str) -> ImportError:
    return ImportError(f"{package} is not installed: pip install 'rankscope[{extra}]' (or pip install {package})")


@cache
def _hf_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise _missing("transformers", "hf") from exc

    class RankscopeCallback(TrainerCallback):
        """A ``transformers.TrainerCallback`` that runs a rankscope ``Monitor`` on the trained model.

        ``RankscopeCallback(run_dir, every=50, **monitor_kwargs)``: diagnoses at the start of training and every
        ``every`` global steps; the scalars the Trainer logs (loss, learning_rate, grad_norm, eval_loss, …) go
        to the ``train`` table, one row per global step. Logs made after training ends (a later
        ``trainer.evaluate()``) are not recorded. ``self.monitor`` is the Monitor, kept after training for its
        ``seconds`` (None off the main process).
        """

        def __init__(self, run_dir: str | Path, every: int = 50, **monitor_kwargs):
            self.run_dir, self.every, self.monitor_kwargs = Path(run_dir), every, monitor_kwargs
            self.monitor: Monitor | None = None
            self._running = False
            self._logs = _StepLogs()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            if model is None:
                raise ValueError("RankscopeCallback: the Trainer passed no model to on_train_begin")
            self.monitor = Monitor(model, self.run_dir, every=self.every, **self.monitor_kwargs)
            self._running = True
            self.monitor.step(state.global_step)  # step 0 of a fresh run: the initial weights

        def on_step_end(self, args, state, control, **kwargs):
            if not self._running:
                return
            self._logs.write(self.monitor, before=state.global_step)  # earlier steps' logs are complete now
            self.monitor.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self._running:
                self._logs.add(state.global_step, _scalars(logs or {}))

        def on_train_end(self, args, state, control, **kwargs):
            if not self._running:
                return
            self._logs.write(self.monitor)
            self.monitor.close()
            self._running = False

    _publish(RankscopeCallback)
    return RankscopeCallback


def _lightning():
    """The ``lightning.pytorch`` module, or the older standalone ``pytorch_lightning``."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as exc:
            raise _missing("lightning", "lightning") from exc
    return pl


@cache
def _lightning_callback_class() -> type:
    pl = _lightning()

    class RankscopeLightningCallback(pl.Callback):
        """A Lightning ``Callback`` that runs a rankscope ``Monitor`` on the trained model.

        ``RankscopeLightningCallback(run_dir, every=50, module=None, **monitor_kwargs)``: diagnoses at the start
        of training and every ``every`` optimizer steps (``trainer.global_step``). ``module`` names the
        attribute of the LightningModule holding the model; by default the first submodule that ``analyze``
        understands (a rankscope or transformers model), else the LightningModule itself. After each optimizer
        step the numeric ``trainer.callback_metrics`` (their latest values) go to the ``train`` table.
        ``self.monitor`` is the Monitor, kept after training for its ``seconds`` (None off the main process).
        """

        def __init__(self, run_dir: str | Path, every: int = 50, module: str | None = None, **monitor_kwargs):
            super().__init__()
            self.run_dir, self.every, self.module, self.monitor_kwargs = Path(run_dir), every, module, monitor_kwargs
            self.monitor: Monitor | None = None
            self._running = False
            self._last_step: int | None = None

        def on_train_start(self, trainer, pl_module):
            if not trainer.is_global_zero:
                return
            model = getattr(pl_module, self.module) if self.module else _diagnosable(pl_module)
            self.monitor = Monitor(model, self.run_dir, every=self.every, **self.monitor_kwargs)
            self._running, self._last_step = True, trainer.global_step
            self.monitor.step(trainer.global_step)  # step 0 of a fresh run: the initial weights

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if not self._running or step == self._last_step:  # accumulating gradients: no optimizer step yet
                return
            self._last_step = step
            scalars = _scalars(trainer.callback_metrics)
            if scalars:
                self.monitor.log(step, **scalars)
            self.monitor.step(step)

        def on_train_end(self, trainer, pl_module):
            if self._running:
                self.monitor.close()
                self._running = False

    _publish(RankscopeLightningCallback)
    return RankscopeLightningCallback


def __getattr__(name: str):
    if name == "RankscopeCallback":
        return _hf_callback_class()
    if name == "RankscopeLightningCallback":
        return _lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
