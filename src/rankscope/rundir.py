"""The run directory: the one place that knows its layout and reads and writes its checkpoints (design §6).

    RUN/config.json                        the resolved config (model, train, preset)
    RUN/checkpoints/step_XXXXXX.safetensors  the weights of a step (written last, so a complete checkpoint has both)
    RUN/checkpoints/step_XXXXXX.state.pt     optimizer, RNG and buffer state (read with weights_only=True)
    RUN/checkpoints/final                  the step of the finished run's last checkpoint
    RUN/metrics/                           Parquet parts of the run store (rankscope.store)
    RUN/events/                            TensorBoard events (optional)

A study is a directory with ``study.json`` (the plan) and one run directory per (sweep point, variant, seed).
Nothing here knows a model class: checkpoints hold any ``nn.Module``'s state.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from rankscope.errors import CheckpointError, InputError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics"
EVENTS = "events"
FINAL = "final"
STUDY = "study.json"
_STEP = re.compile(r"^step_(\d+)\.safetensors$")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a hidden temporary name beside ``path``, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def restore_buffers(model: torch.nn.Module, buffers: dict) -> None:
    """Copy saved buffers (e.g. MLA's measured latent rms, not part of the state dict) into ``model`` by name;
    names or shapes the model does not have are ignored."""
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)


class RunDir:
    """One run's directory (see the module docstring). Cheap to make; touches the disk only when asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- paths ------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    def weights(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.safetensors"

    def state(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.state.pt"

    # ---- config -----------------------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        """config.json as a dict, or None when it is missing, unreadable or not a rankscope run's."""
        try:
            cfg = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return None
        return cfg if isinstance(cfg, dict) and "model" in cfg and "train" in cfg else None

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic(self.config_path, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

    # ---- which checkpoints exist --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (weights and state both present), ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = (_STEP.match(p.name) for p in self.checkpoints.iterdir())
        return sorted(int(m.group(1)) for m in found if m and self.state(int(m.group(1))).exists())

    def final_step(self) -> int | None:
        """The step of the finished run's last checkpoint, None while it trains (or if the marker is unreadable)."""
        try:
            return int((self.checkpoints / FINAL).read_text())
        except (OSError, ValueError):
            return None

    def finished(self) -> bool:
        return self.final_step() is not None

    def status(self) -> str:
        """"done" (finished), "partial" (checkpoints, not finished) or "new"."""
        if self.finished():
            return "done"
        return "partial" if self.steps() else "new"

    def newest_checkpoint(self) -> Path:
        """The weights file ``analyze`` reads for this run: the final one, else the newest."""
        final = self.final_step()
        if final is not None and self.weights(final).exists():
            return self.weights(final)
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.path}: a rankscope run without checkpoints yet")
        return self.weights(steps[-1])

    @staticmethod
    def of_checkpoint(path: str | Path) -> RunDir | None:
        """The run a ``checkpoints/step_*.safetensors`` file belongs to, None for any other path."""
        path = Path(path).expanduser().resolve()
        if _STEP.match(path.name) and path.parent.name == CHECKPOINTS:
            return RunDir(path.parent.parent)
        return None

    # ---- writing and reading checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int,
                        final: bool = False) -> Path:
        """Write the state then the weights (each atomically); keep the ``keep`` newest periodic checkpoints."""
        from safetensors.torch import save_model

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "buffers": {k: v.detach().cpu() for k, v in model.named_buffers()}}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        _atomic(self.state(step), lambda p: torch.save(state, p))
        _atomic(self.weights(step), lambda p: save_model(model, str(p), metadata={"step": str(step)}))
        if final:
            _atomic(self.checkpoints / FINAL, lambda p: p.write_text(f"{step}\n"))
        older = [s for s in self.steps() if s < step]
        final_step = self.final_step()
        for s in older[:max(0, len(older) - (keep - 1))]:
            if s != final_step:
                self.weights(s).unlink(missing_ok=True)
                self.state(s).unlink(missing_ok=True)
        return self.weights(step)

    def load_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device) -> int:
        """Restore the newest readable checkpoint (weights, optimizer, RNG, buffers); returns its step (0 when there
        is none). A corrupt newest checkpoint is reported and the one before it used."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        errors = []
        for step in reversed(self.steps()):
            try:
                state = torch.load(self.state(step), map_location=device, weights_only=True)
                load_model(model, str(self.weights(step)), device=str(device))
            except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
                errors.append(f"{self.weights(step).name}: {str(exc).splitlines()[0][:200]}")
                continue
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"].cpu())
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
            restore_buffers(model, state.get("buffers", {}))
            if errors:
                print(f"warning: skipped unreadable checkpoint(s) {errors}; resumed from step {step}")
            return step
        if errors:
            raise CheckpointError(f"{self.path}: no readable checkpoint ({'; '.join(errors)})")
        return 0

    def load_weights(self, model: torch.nn.Module, weights: Path) -> torch.nn.Module:
        """``model`` with the weights of one checkpoint file and its saved buffers (e.g. MLA's measured latent rms,
        so chains fold the norm as in training)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        try:
            load_model(model, str(weights))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{weights}: not a readable checkpoint of this run's model "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        state = weights.with_name(weights.name.replace(".safetensors", ".state.pt"))
        if state.exists():
            try:
                buffers = torch.load(state, map_location="cpu", weights_only=True).get("buffers", {})
            except Exception as exc:
                raise CheckpointError(f"{state}: unreadable ({str(exc).splitlines()[0][:200]})") from None
            restore_buffers(model, buffers)
        return model


def read_study(root: str | Path) -> dict | None:
    """A study directory's plan (``study.json``), None when ``root`` is not a study."""
    path = Path(root) / STUDY
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable study plan ({exc})") from None


def write_study(root: str | Path, plan: dict) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    _atomic(Path(root) / STUDY, lambda p: p.write_text(json.dumps(plan, indent=1) + "\n"))
