"""The training loop: AdamW, warmup + cosine, gradient clipping, exact resume, DDP, diagnostics.

Determinism: the model is initialised from ``seed``; the batch of step s (and process rank r) is drawn from a
generator seeded by (seed, s, r) alone, so the data order needs no saved loader state, every variant of a study
sees the same batches, and a resumed run continues exactly (same weights, optimizer moments, RNG state, batches
and CPU thread count, which is resolved once and saved in the run's config). Checkpoints: ``rundir.RunDir``.

One writer: the process training a run holds its lock (``RunDir.lock``) throughout. A resumed run keeps its
config: it may change only ``config.RESUMABLE_CHANGES`` (the step budget, threads, device, checkpoint cadence)
unless forced, and its store rows keep the run id saved at creation, whatever the directory is called now.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rankscope.errors import InputError
from rankscope.nn import GPT
from rankscope.rundir import RunDir
from rankscope.spectra.threads import free_cores, thread_budget
from rankscope.train.config import RunConfig, monitor_schedule, parse_offsets, resume_differences
from rankscope.train.monitor import Monitor
from rankscope.vocab import ALL_GROUPS, OV, QK


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


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec!r}: CUDA is not available on this machine")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device 'mps': Apple's Metal backend is not available on this machine")
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


def _resolved(cfg: RunConfig, run: RunDir, resume: bool, world: int, force: bool) -> RunConfig:
    """``cfg`` checked against the run directory, with its CPU thread count fixed: the one given, else the one the
    run was started with (so a resumed run computes as the original did), else the cores free now. A resumed run
    whose config differs in more than ``RESUMABLE_CHANGES`` is an InputError naming the fields, unless ``force``."""
    saved = RunConfig.load(run.config_path) if resume and run.config_path.exists() else None
    if not resume and run.steps():
        raise InputError(f"{run.path} already holds checkpoints; pass --resume to continue it, or use a new --run")
    if saved is not None and not force:
        changed = resume_differences(saved, cfg)
        if changed:
            fields = "; ".join(c for part in changed.values() for c in part)
            raise InputError(f"{run.config_path}: --resume with a different {' and '.join(changed)} config "
                             f"({fields}); give the run's own settings, pass --force to continue it with these, "
                             f"or start a new run directory")
    threads = cfg.train.threads or (saved.train.threads if saved else 0) or max(1, free_cores() // world)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))


def _run_id(run: RunDir, cfg: RunConfig) -> str:
    """The ``run`` tag of this run's store rows: the id in its config.json; for a run of an earlier version (none
    saved), the one tag its rows already have; for a new run, its name now (``<sweep>/<name>`` in a sweep)."""
    saved = run.run_id()
    if saved is not None:
        return saved
    if run.metrics.is_dir():
        from rankscope.store import RunStore

        store = RunStore(run.path)
        if "train" in store.tables():
            tags = store.sql("select distinct run from train")["run"].dropna().tolist()
            if len(tags) == 1 and isinstance(tags[0], str) and tags[0]:
                return tags[0]
    return f"{cfg.train.sweep}/{run.path.name}" if cfg.train.sweep else run.path.name


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, float], bool | None] | None = None, force: bool = False) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` (config, checkpoints, metrics); ``resume`` continues the newest checkpoint.

    Every field of ``cfg`` is checked first (``RunConfig.validate``); the run's lock is held throughout (another
    process training the same directory is an InputError). ``resume`` with a config that differs from the saved
    one in more than the step budget, threads, device or checkpoint cadence is an InputError naming the fields
    (old → new), unless ``force`` (the new config is then saved).

    Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
    CUDA); every process draws its own batches, and only rank 0 evaluates, diagnoses and writes.
    ``on_step(step, loss)`` is called after each update; returning True stops the run as Ctrl-C does.
    On the CPU the run uses ``threads`` torch and BLAS threads (saved in config.json) and gives the caller's
    counts back after.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run = RunDir(run_dir)
    if not isinstance(cfg, RunConfig):
        raise InputError(f"train: expected a RunConfig (train.resolve makes one), got {type(cfg).__name__}")
    cfg.validate()
    on_cpu = _device(cfg.train.device).type == "cpu"
    with run.lock() if int(os.environ.get("RANK", "0")) == 0 else nullcontext():  # only rank 0 writes
        cfg = _resolved(cfg, run, resume, world, force)
        run_id = _run_id(run, cfg)
        threads = cfg.train.threads
        with thread_budget(torch=threads, blas=threads) if on_cpu else nullcontext():
            return _train(cfg, run, run_id, resume=resume, progress=progress, on_step=on_step)


@dataclass
class _Run:
    """What one training process holds while it trains."""

    cfg: RunConfig
    run: RunDir
    model: GPT
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.AdamW
    data: object  # rankscope.data.TokenData
    device: torch.device
    amp: Callable
    rank: int
    world: int
    monitor: Monitor | None  # rank 0 only


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    return world, rank, device


def _setup(cfg: RunConfig, run: RunDir, run_id: str, resume: bool) -> tuple[_Run, int]:
    """The model, optimizer, data and monitor of a run, restored from its newest checkpoint on resume."""
    from rankscope.data import prepare

    tc = cfg.train
    world, rank, device = _distributed(_device(tc.device))
    use_bf16 = tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    if rank == 0:
        run.write_config({**cfg.to_dict(), "run_id": run_id})
    data = prepare(tc.data, cfg.model.vocab_size, tc.max_bytes, tc.val_percent)
    if data.vocab_size != cfg.model.vocab_size:
        raise InputError(f"the tokenizer of {tc.data!r} has {data.vocab_size} tokens, not vocab_size="
                         f"{cfg.model.vocab_size} (the corpus is too small for that many merges)")
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    opt = _optimizer(model, tc)
    start = run.load_checkpoint(model, opt, device) if resume else 0
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = None
    if rank == 0:
        monitor = Monitor(model, run.path, every=tc.monitor_every, per_head=tc.monitor_per_head, fpr=tc.fpr,
                          kinds=ALL_GROUPS if tc.monitor_weights else (QK, OV),
                          schedule=monitor_schedule(tc.steps, tc.monitor_every, tc.monitor_early),
                          offsets=parse_offsets(tc.monitor_offsets, cfg.model.max_seq_len),
                          run=run_id, sweep=tc.sweep or None)
    return _Run(cfg, run, model, net, opt, data, device, amp, rank, world, monitor), start


def _update(r: _Run, step: int) -> tuple[float, float, float]:
    """One optimizer step at ``step`` (0-based): (loss, learning rate, gradient norm)."""
    tc = r.cfg.train
    lr = lr_at(step, tc)
    for group in r.opt.param_groups:
        group["lr"] = lr
    x, y = get_batch(r.data.train, tc.batch_size, r.cfg.model.max_seq_len, tc.seed, step, r.rank, r.device)
    with r.amp():
        _, loss = r.net(x, y)
    r.opt.zero_grad(set_to_none=True)
    loss.backward()
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"step {step + 1}: the loss is {loss_value}; lower the lr (now {lr:.2e})")
    grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), tc.grad_clip or float("inf"))
    r.opt.step()
    return loss_value, lr, float(grad_norm)


def _record(r: _Run, step: int, scalars: dict[str, float]) -> float | None:
    """Rank 0, after the update that reached ``step``: validation, diagnostics, scalars, checkpoint. Returns the
    validation loss when it was measured."""
    tc, monitor = r.cfg.train, r.monitor
    val = None
    if step % tc.eval_every == 0 or step == tc.steps:
        val = evaluate(r.model, r.data.val, r.cfg, r.device, r.amp)
        scalars.update(val_loss=val, val_nats_per_byte=val / r.data.bytes_per_token)
    monitor.step(step)
    if tc.repr_every and (step % tc.repr_every == 0 or step == tc.steps):
        _representations(r.model, monitor, r.data.val, r.cfg, step, r.device, r.amp)
    scalars["monitor_seconds"] = monitor.seconds
    monitor.log(step, **scalars)
    if step % tc.ckpt_every == 0 or step == tc.steps:
        monitor.flush()  # rows up to the checkpoint are on disk before it exists
        r.run.save_checkpoint(step, r.model, r.opt, tc.keep_checkpoints, final=step == tc.steps)
    return val


def _train(cfg: RunConfig, run: RunDir, run_id: str, *, resume: bool, progress: bool,
           on_step: Callable[[int, float], bool | None] | None) -> TrainResult:
    r, start = _setup(cfg, run, run_id, resume)
    tc = cfg.train
    r.model.train()
    tokens_per_step = tc.batch_size * cfg.model.max_seq_len * r.world
    t0, loss, val_loss = time.perf_counter(), float("nan"), float("nan")
    bar = _progress(progress and r.rank == 0, start, tc.steps, run.path.name)
    step = start
    stop = _StopRequest()  # Ctrl-C ends the run at the next step boundary, with a checkpoint
    try:
        if r.monitor is not None and start == 0:
            r.monitor.step(0)
        while step < tc.steps and not stop.requested:
            tick = time.perf_counter()
            loss, lr, grad_norm = _update(r, step)
            step += 1
            if r.rank == 0:
                rate = tokens_per_step / (time.perf_counter() - tick)
                val = _record(r, step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate})
                val_loss = val_loss if val is None else val
                bar(step, loss, val_loss, rate)
            if on_step is not None and on_step(step, loss):
                stop.requested = True
        interrupted = stop.requested and step < tc.steps
        if interrupted and r.rank == 0 and step % tc.ckpt_every:
            r.monitor.flush()
            run.save_checkpoint(step, r.model, r.opt, tc.keep_checkpoints)
    finally:
        stop.restore()
        bar(None, 0, 0, 0)
        if r.monitor is not None:
            r.monitor.close()
    seconds = time.perf_counter() - t0
    return TrainResult(run.path, step, loss, val_loss, seconds, r.monitor.seconds if r.monitor else 0.0,
                       tokens_per_step * (step - start) / max(seconds, 1e-9), interrupted)


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
