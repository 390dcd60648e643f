"""The run directory: the one place that knows its layout and reads and writes its checkpoints (design §6).

    RUN/config.json                        the resolved config (model, train, preset) and the run's id
    RUN/checkpoints/step_XXXXXX.safetensors  the weights of a step (written last, so a complete checkpoint has both)
    RUN/checkpoints/step_XXXXXX.state.pt     optimizer, RNG and buffer state (read with weights_only=True)
    RUN/checkpoints/final                  the step of the finished run's last checkpoint
    RUN/metrics/                           Parquet parts of the run store (rankscope.store)
    RUN/events/                            TensorBoard events (optional)
    RUN/train.lock                         held (an OS lock) by the one process training the run; says its pid

The run id (``run_id`` in config.json, set when the run is created: its name then) is the ``run`` tag of its
store rows, so a renamed directory resumes under the tag its rows already have. A study is a directory with
``study.json`` (the plan, run directories relative to it, so a copied study reads its copies) and one run
directory per (sweep point, variant, seed). Nothing here knows a model class: checkpoints hold any
``nn.Module``'s state.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rankscope.errors import CheckpointError, InputError, one_line

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics"
EVENTS = "events"
FINAL = "final"
STUDY = "study.json"
LOCK = "train.lock"
RUN_ID = "run_id"
_STEP = re.compile(r"^step_(\d+)\.safetensors$")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a hidden temporary name beside ``path``, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restore_buffers(model: torch.nn.Module, buffers: dict) -> None:
    """Copy saved buffers (e.g. MLA's measured latent rms, not part of the state dict) into ``model`` by name;
    names or shapes the model does not have are ignored."""
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)


def _unsafe_global(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (e.g. "GLOBAL posix.system"), from its long message."""
    found = re.search(r"GLOBAL [\w.]+", str(exc))
    return found.group(0) if found else one_line(exc, 120)


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

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    # ---- one writer -----------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock (``fcntl.flock`` on ``train.lock``, released by the OS when the process ends, even by
        kill -9) for the body, with this process's pid and host written in it. Another process holding it, or a
        run directory this process cannot write: an InputError saying which. Where the OS or the file system has
        no ``flock`` (Windows; some network mounts), the run trains unlocked, with a warning."""
        import errno
        import warnings

        try:
            import fcntl
        except ImportError:  # Windows: no flock
            fcntl = None
        self.writable()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot write the run directory ({exc.strerror or exc})") from None
        try:
            if fcntl is None:
                raise OSError(errno.ENOTSUP, "no fcntl on this OS")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no lock here, not a holder
                warnings.warn(f"{self.path}: cannot lock the run ({exc.strerror or exc}); training without the "
                              "one-writer guard", stacklevel=3)
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 300).decode(errors="replace").strip() or "a process that has not said who"
                os.close(fd)
                raise InputError(f"{self.path}: another trainer holds this run ({holder}); wait for it to end, or "
                                 f"train into another --run") from None
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%F %T')}\n".encode())
            yield
        finally:
            os.ftruncate(fd, 0)  # nobody holds it now; the file stays (unlinking it would race the next taker)
            os.close(fd)  # closing the last descriptor releases the lock

    def writable(self) -> None:
        """Make the run directory; an InputError when it, or a folder of it, cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"{self.path}: exists and is not a directory") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot make the run directory ({exc.strerror or exc})") from None
        for folder in (self.path, self.checkpoints, self.metrics, self.events):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"{folder}: the run directory is not writable by this user")

    # ---- config -----------------------------------------------------------------------------------------------
    def read_config(self, strict: bool = False) -> dict | None:
        """config.json as a dict, or None when it is missing, unreadable or not a rankscope run's; with ``strict``,
        a config.json that exists but is not a readable run config is an InputError saying so."""
        try:
            cfg = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if strict:
                raise InputError(f"{self.config_path}: not a readable run config ({one_line(exc)})") from None
            return None
        ok = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("train"), dict)
        if strict and not ok:
            raise InputError(f"{self.config_path}: not a rankscope run config (no model and train sections)")
        return cfg if ok else None

    def run_id(self, config: dict | None = None) -> str | None:
        """The id saved in config.json at the run's creation (the ``run`` tag of its store rows), None for a run
        of an earlier version, which has none."""
        config = self.read_config() if config is None else config
        found = (config or {}).get(RUN_ID)
        return found if isinstance(found, str) and found else None

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
        is none). A corrupt newest checkpoint is reported and the one before it used; a state file holding pickled
        objects other than tensors and plain data is refused outright (a CheckpointError; none of it runs)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        errors = []
        for step in reversed(self.steps()):
            try:
                state = torch.load(self.state(step), map_location=device, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{self.state(step)}: refused, it holds pickled objects other than tensors and "
                                      f"plain data ({_unsafe_global(exc)}); read with weights_only=True, nothing in "
                                      f"it ran") from None
            except (RuntimeError, OSError, EOFError, ValueError) as exc:
                errors.append(f"{self.state(step).name}: {one_line(exc)}")
                continue
            try:
                if not isinstance(state, dict) or not {"optimizer", "torch_rng"} <= set(state):
                    raise ValueError("not a rankscope training state (no optimizer and torch_rng entries)")
                load_model(model, str(self.weights(step)), device=str(device))
                if optimizer is not None:
                    optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["torch_rng"].cpu())
                if "cuda_rng" in state and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
                restore_buffers(model, state.get("buffers", {}))
            except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError,
                    AttributeError) as exc:
                errors.append(f"step {step}: {one_line(exc)}")
                continue
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
                raise CheckpointError(f"{state}: unreadable ({one_line(exc)})") from None
            restore_buffers(model, buffers)
        return model


_RUN_RECORD = {"name": str, "directory": str, "variant": str, "seed": int, "sweep": str}


def read_study(root: str | Path) -> dict | None:
    """A study directory's plan (``study.json``) with every run's ``directory`` as a path under ``root`` (plans of
    earlier versions stored absolute ones, read as they are); None when ``root`` is not a study. A plan that is
    unreadable or lacks a run's name, directory, variant, seed or sweep is an InputError."""
    path = Path(root) / STUDY
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable study plan ({one_line(exc)})") from None
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not runs:
        raise InputError(f"{path}: not a study plan (no list of runs)")
    for i, record in enumerate(runs):
        bad = [k for k, kind in _RUN_RECORD.items() if not isinstance(record, dict) or not isinstance(
            record.get(k), kind)]
        if bad or not isinstance(record.get("config"), dict | None):
            raise InputError(f"{path}: run {i} of the plan lacks {bad or ['config']} (not a study plan)")
        record["directory"] = str(Path(root) / record["directory"])  # an absolute one stays as it is
    return plan


def write_study(root: str | Path, plan: dict) -> None:
    """Write ``study.json``; run directories under ``root`` are stored relative to it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = [{**r, "directory": _relative(Path(r["directory"]), root)} for r in plan.get("runs", [])]
    text = json.dumps({**plan, "runs": runs}, indent=1) + "\n"
    _atomic(root / STUDY, lambda p: p.write_text(text))


def _relative(directory: Path, root: Path) -> str:
    """``directory`` relative to ``root`` when it lies under it, else absolute."""
    try:
        return str(directory.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(directory.resolve())
