"""The training loop: AdamW, warmup + cosine, gradient clipping, exact resume, DDP, diagnostics.

Determinism: the model is initialised from ``seed``; the batch of step s (and process rank r) is drawn
from a generator seeded by (seed, s, r) alone, so the data order needs no saved loader state, every
variant of a study sees the same batches, and a resumed run continues exactly (same weights, optimizer
moments, RNG state, and batches). Checkpoints: ``checkpoints/step_XXXXXX.safetensors`` (weights, written
last) beside ``step_XXXXXX.state.pt`` (optimizer, RNG, extra buffers; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rankscope.errors import CheckpointError, InputError
from rankscope.nn import GPT
from rankscope.probes.native import restore_buffers
from rankscope.spectra.threads import torch_threads
from rankscope.train.config import RunConfig
from rankscope.train.monitor import Monitor


def free_cores() -> int:
    """Cores not busy right now: usable cores minus the 1-minute load average (at least 1).

    Two torch threads on two cores while another process holds one ran 16× slower than one thread.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(usable, int(usable - busy + 0.5)))


def lr_at(step: int, cfg) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then a cosine down to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def get_batch(stream: np.ndarray, batch: int, seq: int, seed: int, step: int, rank: int = 0,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) at random offsets; depends only on (seed, step, rank)."""
    if stream.size <= seq + 1:
        raise InputError(f"token stream has {stream.size} tokens, fewer than one sequence of {seq + 1}")
    g = np.random.default_rng([seed, step, rank])
    starts = g.integers(0, stream.size - seq - 1, size=batch)
    rows = np.stack([np.asarray(stream[s:s + seq + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    rows = torch.from_numpy(rows).to(device)
    return rows[:, :-1], rows[:, 1:]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    val_loss: float
    seconds: float
    monitor_seconds: float
    tokens_per_second: float
    interrupted: bool = False


def _checkpoints(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (weights and state both present), ascending."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.glob("step_*.safetensors"):
        step = int(p.stem.split("_")[1])
        if (folder / f"step_{step:06d}.state.pt").exists():
            steps.append(step)
    return sorted(steps)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    keep: int, final: bool = False) -> Path:
    """Write the state then the weights (each atomically); keep the ``keep`` newest periodic checkpoints."""
    from safetensors.torch import save_model

    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
             "buffers": {k: v.detach().cpu() for k, v in model.named_buffers()}}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    _atomic(folder / f"step_{step:06d}.state.pt", lambda p: torch.save(state, p))
    weights = folder / f"step_{step:06d}.safetensors"
    _atomic(weights, lambda p: save_model(model, str(p), metadata={"step": str(step)}))
    if final:
        (folder / "final").write_text(f"{step}\n")
    older = [s for s in _checkpoints(run_dir) if s < step]
    final_step = int((folder / "final").read_text()) if (folder / "final").exists() else None
    for s in older[:max(0, len(older) - (keep - 1))]:
        if s != final_step:
            for suffix in (".safetensors", ".state.pt"):
                (folder / f"step_{s:06d}{suffix}").unlink(missing_ok=True)
    return weights


def load_checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    device) -> int:
    """Restore the newest readable checkpoint; returns its step (0 when there is none). A corrupt newest
    checkpoint is reported and the one before it is used, so nothing is lost but the steps since then."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    errors = []
    for step in reversed(_checkpoints(run_dir)):
        folder = run_dir / "checkpoints"
        weights, state_path = folder / f"step_{step:06d}.safetensors", folder / f"step_{step:06d}.state.pt"
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
            load_model(model, str(weights), device=str(device))
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
            errors.append(f"{weights.name}: {str(exc).splitlines()[0][:200]}")
            continue
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        restore_buffers(model, state.get("buffers", {}))
        if errors:
            print(f"warning: skipped unreadable checkpoint(s) {errors}; resumed from step {step}")
        return step
    if errors:
        raise CheckpointError(f"{run_dir}: no readable checkpoint ({'; '.join(errors)})")
    return 0


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {spec!r}: CUDA is not available on this machine")
    return torch.device(spec)


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: np.ndarray, cfg: RunConfig, device, amp) -> float:
    """Mean validation loss (nats/token) over ``eval_batches`` fixed batches."""
    was = model.training
    model.eval()
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = get_batch(stream, cfg.train.batch_size, cfg.model.max_seq_len, seed=12345, step=i, device=device)
        with amp():
            logits, _ = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train(was)
    return float(np.mean(losses))


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads and numpy's BLAS threads (the monitor's eigensolver) for a run, restored after."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with torch_threads(threads), threadpool_limits(threads, user_api="blas"):
        yield


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, float], bool | None] | None = None) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` (config, checkpoints, metrics); ``resume`` continues the newest checkpoint.

    Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
    CUDA); every process draws its own batches, and only rank 0 evaluates, diagnoses and writes.
    ``on_step(step, loss)`` is called after each update; returning True stops the run as Ctrl-C does.
    On the CPU the run uses ``threads`` (default: the free cores) and gives the caller's counts back after.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = _device(cfg.train.device).type == "cpu"
    with _cpu_threads((cfg.train.threads or max(1, free_cores() // world)) if on_cpu else None):
        return _train(cfg, Path(run_dir), resume=resume, progress=progress, on_step=on_step)


def _train(cfg: RunConfig, run_dir: Path, *, resume: bool, progress: bool,
           on_step: Callable[[int, float], bool | None] | None) -> TrainResult:
    from rankscope.data import prepare

    tc = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(tc.device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    use_bf16 = tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    saved = run_dir / "config.json"
    if resume and saved.exists():
        old = RunConfig.load(saved)
        if old.model != cfg.model:
            raise InputError(f"{saved}: --resume with a different model config; start a new run directory")
    elif not resume and _checkpoints(run_dir):
        raise InputError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or use a new --run")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(saved)

    data = prepare(tc.data, cfg.model.vocab_size, tc.max_bytes, tc.val_percent)
    if data.vocab_size != cfg.model.vocab_size:
        raise InputError(f"the tokenizer of {tc.data!r} has {data.vocab_size} tokens, not vocab_size="
                         f"{cfg.model.vocab_size} (the corpus is too small for that many merges)")
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    opt = _optimizer(model, tc)
    start = load_checkpoint(run_dir, model, opt, device) if resume else 0
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = None
    if rank == 0:
        monitor = Monitor(model, run_dir, every=tc.monitor_every, per_head=tc.monitor_per_head, fpr=tc.fpr,
                          kinds=("qk", "ov", "mlp", "weights") if tc.monitor_weights else ("qk", "ov"))
    model.train()
    tokens_per_step = tc.batch_size * cfg.model.max_seq_len * world
    t0, loss_value, val_loss, interrupted = time.perf_counter(), float("nan"), float("nan"), False
    bar = _progress(progress and rank == 0, start, tc.steps, run_dir.name)
    step = start
    stop = _StopRequest()  # Ctrl-C ends the run at the next step boundary, with a checkpoint
    try:
        if monitor is not None and start == 0:
            monitor.step(0)
        while step < tc.steps and not stop.requested:
            tick = time.perf_counter()
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch(data.train, tc.batch_size, cfg.model.max_seq_len, tc.seed, step, rank, device)
            with amp():
                _, loss = net(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss_value}; lower the lr (now {lr:.2e})")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            opt.step()
            step += 1
            if rank == 0:
                seconds = time.perf_counter() - tick
                scalars = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": tokens_per_step / seconds}
                if step % tc.eval_every == 0 or step == tc.steps:
                    val_loss = evaluate(model, data.val, cfg, device, amp)
                    scalars["val_loss"] = val_loss
                    scalars["val_nats_per_byte"] = val_loss / data.bytes_per_token
                monitor.step(step)
                if tc.repr_every and (step % tc.repr_every == 0 or step == tc.steps):
                    _representations(model, monitor, data.val, cfg, step, device, amp)
                scalars["monitor_seconds"] = monitor.seconds
                monitor.log(step, **scalars)
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    monitor.flush()  # rows up to the checkpoint are on disk before it exists
                    save_checkpoint(run_dir, step, model, opt, tc.keep_checkpoints, final=step == tc.steps)
                bar(step, loss_value, val_loss, tokens_per_step / seconds)
            if on_step is not None and on_step(step, loss_value):
                stop.requested = True
        interrupted = stop.requested and step < tc.steps
        if interrupted and rank == 0 and step % tc.ckpt_every:
            monitor.flush()
            save_checkpoint(run_dir, step, model, opt, tc.keep_checkpoints)
    finally:
        stop.restore()
        bar(None, 0, 0, 0)
        if monitor is not None:
            monitor.close()
    seconds = time.perf_counter() - t0
    done = step - start
    return TrainResult(run_dir, step, loss_value, val_loss, seconds, monitor.seconds if monitor else 0.0,
                       tokens_per_step * done / max(seconds, 1e-9), interrupted)


@torch.no_grad()
def _representations(model: GPT, monitor: Monitor, stream: np.ndarray, cfg: RunConfig, step: int, device, amp):
    """Linguistic collapse on a fixed validation probe batch: final-norm features, next token as the class."""
    x, y = get_batch(stream, cfg.train.batch_size, cfg.model.max_seq_len, seed=54321, step=0, device=device)
    features = []
    hook = model.norm.register_forward_hook(lambda mod, inp, out: features.append(out))
    was = model.training
    model.eval()
    try:
        with amp():
            model(x)
    finally:
        hook.remove()
        model.train(was)
    monitor.representations(step, features[0].float(), y, W=model.lm_head.weight)


class _StopRequest:
    """SIGINT (Ctrl-C) sets ``requested``; the loop stops at the next step boundary and checkpoints there, so
    a resumed run is exact. A second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _progress(enabled: bool, start: int, total: int, name: str):
    """A rich progress bar (step, loss, tokens/s, ETA); ``update(None, …)`` stops it."""
    if not enabled:
        return lambda *a: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"),
                   TimeRemainingColumn(), transient=False)
    task = bar.add_task(name, total=total, completed=start, loss="-", val="-", tps="-")
    bar.start()

    def update(step, loss, val, tps):
        if step is None:
            bar.stop()
            return
        bar.update(task, completed=step, loss=f"{loss:.3f}", val="-" if math.isnan(val) else f"{val:.3f}",
                   tps=f"{tps:,.0f}")

    return update
