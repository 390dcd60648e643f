"""Training configuration, presets, and ``--key value`` overrides with checked types.

A run is fully described by a ``RunConfig``: the model's ``ModelConfig`` and the loop's ``TrainConfig``
(both frozen dataclasses, field names disjoint). ``resolve`` starts from a preset, applies overrides, and
the result is saved as the run's ``config.json``. ``RunConfig.validate`` checks every field's range before any
work (``resolve`` and ``train`` call it, so the CLI, the study and the Python API get the same checks; the model's
own fields are checked by ``ModelConfig`` itself). ``resume_differences`` is what a resumed run may not change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rankscope.errors import InputError
from rankscope.nn import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: data, optimiser, schedule, checkpoints, diagnostics."""

    data: str = "stdlib"  # "stdlib", a local text file or folder, or "hf:NAME[:CONFIG]"
    max_bytes: int | None = 12_000_000  # cap on the training split's UTF-8 bytes (None = all)
    val_percent: float = 5.0
    batch_size: int = 16  # sequences per step (per process under DDP)
    steps: int = 1200  # optimizer updates
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr: float = 2e-4  # end of the cosine
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    seed: int = 0  # model init, data order
    eval_every: int = 100  # validation loss every N steps (and at the end)
    eval_batches: int = 8
    ckpt_every: int = 200  # checkpoint every N steps (and at the end, and on Ctrl-C)
    keep_checkpoints: int = 2  # older periodic checkpoints are deleted; the final one is always kept
    monitor_every: int = 50  # spectral diagnostics every N steps (0 = off)
    monitor_early: int = 0  # also every step up to this one, then log-spaced up to monitor_every (onsets)
    monitor_offsets: str = "0"  # relative offsets Δ ≤ 0 at which per-head qk forms are read, e.g. "0,-1,-4,-16"
    monitor_per_head: bool = True
    monitor_weights: bool = True  # also diagnose MLP and embedding matrices
    fpr: float = 0.01  # false-positive rate of the outlier test
    sweep: str = ""  # the study's sweep point ("lr=0.002"; set by ``rankscope study``): a store column, in run names
    repr_every: int = 0  # linguistic collapse of the top layer on a fixed probe batch every N steps (0 = off)
    threads: int = 0  # CPU threads, torch and BLAS; 0 = the cores free when the run starts (then saved)
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "off"

    def validate(self) -> TrainConfig:
        """``self`` when every field is in its range, else one InputError naming each field out of range and its
        allowed values (the thread count is checked against this machine's cores)."""
        problems = [p for check in _TRAIN_CHECKS for p in [check(self)] if p]
        if problems:
            raise InputError("; ".join(problems))
        return self


AMP_MODES = ("auto", "bf16", "off")
DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
SEED_LIMIT = 2**63  # numpy's seed sequence takes non-negative integers; torch's manual_seed takes < 2**64


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(name: str, ok, must: str):
    """A check that ``ok(value)`` holds for the field ``name``, else "--name must <must>; got <value>"."""
    def check(c) -> str | None:
        v = getattr(c, name)
        return None if ok(v) else f"--{name} must {must}; got {v!r}"
    return check


def _at_least(name: str, low: int, what: str = ""):
    return _field(name, lambda v: _integer(v) and v >= low, f"be an integer ≥ {low}{what}")


def _non_negative(name: str):
    return _field(name, lambda v: _number(v) and v >= 0, "be a finite number ≥ 0")


def _beta(name: str):
    return _field(name, lambda v: _number(v) and 0 <= v < 1, "lie in [0, 1) (an AdamW moment decay)")


def _check_lr(c) -> str | None:
    if not _number(c.lr) or c.lr <= 0:
        return f"--lr must be a finite number > 0 (the peak learning rate); got {c.lr!r}"
    if not _number(c.min_lr) or not 0 <= c.min_lr <= c.lr:
        return f"--min_lr must lie in [0, lr] = [0, {c.lr}] (the end of the cosine); got {c.min_lr!r}"
    return None


def _check_fpr(c) -> str | None:
    """fpr within spectra.budget's range: an edge at fpr needs 4/fpr simulated null draws per form shape, so below
    ``MIN_FPR`` the monitor would stall or run out of memory (imported here: the budget module needs torch, and
    the config alone must not, for a fast ``--help``)."""
    from rankscope.spectra.budget import MAX_FPR, MIN_FPR

    if not _number(c.fpr) or not MIN_FPR <= c.fpr <= MAX_FPR:
        return (f"--fpr must lie in [{MIN_FPR:g}, {MAX_FPR:g}] (the outlier test's false-positive rate; an edge at "
                f"fpr needs 4/fpr simulated null draws per form shape); got {c.fpr!r}")
    return None


def _check_threads(c) -> str | None:
    cores = os.cpu_count() or 1
    if not _integer(c.threads) or not 0 <= c.threads <= cores:
        return (f"--threads must be 0 (the cores free when the run starts) or 1..{cores} (this machine has "
                f"{cores} cores); got {c.threads!r}")
    return None


def _check_device(c) -> str | None:
    if not isinstance(c.device, str) or not _DEVICE.match(c.device):
        return f"--device must be one of {DEVICES}; got {c.device!r}"
    if c.amp not in AMP_MODES:
        return f"--amp must be one of {', '.join(AMP_MODES)}; got {c.amp!r}"
    return None


def _check_data(c) -> str | None:
    if not isinstance(c.data, str) or not c.data.strip():
        return f"--data must be 'stdlib', a local text file or folder, or hf:NAME[:CONFIG]; got {c.data!r}"
    if c.max_bytes is not None and (not _integer(c.max_bytes) or c.max_bytes < 1):
        return f"--max_bytes must be a positive number of bytes or none (all); got {c.max_bytes!r}"
    if not _number(c.val_percent) or not 0 < c.val_percent < 100:
        return f"--val_percent must lie in (0, 100) (the validation split, in %); got {c.val_percent!r}"
    return None


def _check_seed(c) -> str | None:
    if not _integer(c.seed) or not 0 <= c.seed < SEED_LIMIT:
        return f"--seed must be an integer in [0, 2**63); got {c.seed!r}"
    return None


_TRAIN_CHECKS = (
    _check_data, _at_least("batch_size", 1), _at_least("steps", 1, " (optimizer updates)"), _check_lr,
    _at_least("warmup_steps", 0), _non_negative("weight_decay"), _beta("beta1"), _beta("beta2"),
    _non_negative("grad_clip"), _check_seed, _at_least("eval_every", 1), _at_least("eval_batches", 1),
    _at_least("ckpt_every", 1), _at_least("keep_checkpoints", 1), _at_least("monitor_every", 0, " (0 = off)"),
    _at_least("monitor_early", 0), _at_least("repr_every", 0, " (0 = off)"),
    _check_fpr, _check_threads, _check_device,
)

# What a resumed run may change: its step budget, and where and how fast it computes (not what it computes).
# Anything else (seed, lr, fpr, data, the schedule of diagnostics...) makes it another run.
RESUMABLE_CHANGES = ("steps", "threads", "device", "ckpt_every", "keep_checkpoints")


def parse_offsets(text: str, context: int) -> tuple[int, ...]:
    """``"0,-1,-4"`` → (0, −1, −4): relative offsets Δ = j − i ≤ 0 (key before query), 0 included, |Δ| < context."""
    try:
        offsets = tuple(sorted({int(v) for v in str(text).split(",") if v.strip()}, reverse=True))
    except ValueError:
        raise InputError(f"--monitor_offsets {text!r}: expected comma-separated integers like 0,-1,-4,-16") from None
    bad = [o for o in offsets if o > 0 or -o >= context]
    if 0 not in offsets or bad:
        raise InputError(f"--monitor_offsets {text!r}: offsets are key − query positions, 0 ≥ Δ > −{context} "
                         f"(the context), and must include 0")
    return offsets


def monitor_schedule(steps: int, every: int, early: int = 0, growth: float = 1.3) -> list[int]:
    """The steps a run is diagnosed at: every step up to ``early``, then log-spaced (each ≈ ``growth`` × the last)
    up to ``every``, then every multiple of ``every``, and the last step; empty when ``every`` is 0."""
    if every <= 0:
        return []
    out = set(range(min(early, steps) + 1))
    point = float(early)
    while early > 0:
        point = max(point * growth, point + 1)
        if round(point) >= every:
            break
        out.add(round(point))
    out.update(range(0, steps + 1, every))
    out.add(steps)
    return sorted(s for s in out if s <= steps)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"

    def validate(self) -> RunConfig:
        """``self`` when the training fields are in range (``TrainConfig.validate``) and agree with the model: the
        monitor's offsets within the context, a vocabulary a byte-level BPE can have. Else an InputError."""
        self.train.validate()
        parse_offsets(self.train.monitor_offsets, self.model.max_seq_len)
        if not 257 <= self.model.vocab_size <= 65536:
            raise InputError(f"--vocab_size must lie in [257, 65536] (a byte-level BPE: 256 bytes + merges + "
                             f"end-of-text, in uint16 streams); got {self.model.vocab_size}")
        return self

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        try:
            return cls(ModelConfig(**d["model"]), TrainConfig(**d["train"]), d.get("preset", "custom"))
        except (KeyError, TypeError) as exc:
            raise InputError(f"run config: {exc}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable run config ({exc})") from None


PRESETS: dict[str, dict] = {
    # A plumbing check, not a study: 2 layers, 100 steps (README, "Two commands", for its time).
    "smoke": dict(vocab_size=512, n_layer=2, d_model=64, n_head=4, kv_lora_rank=32, qk_rope_dim=8, max_seq_len=64,
                  max_bytes=2_000_000, batch_size=8, steps=100, lr=2e-3, min_lr=2e-4, warmup_steps=10, eval_every=50,
                  eval_batches=4, ckpt_every=50, monitor_every=25, repr_every=50),
    # The CPU-scale study (README, "Results", for its time and the loss it reaches): 8 layers, d=64, 4 heads of
    # 32 (per-head forms of rank 32), 600 steps, dense early monitoring, per-head forms at five offsets.
    "cpu": dict(vocab_size=1024, n_layer=8, d_model=64, n_head=4, head_dim=32, kv_lora_rank=32, qk_rope_dim=8,
                max_seq_len=128,
                max_bytes=12_000_000, batch_size=16, steps=600, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                eval_every=25, eval_batches=8, ckpt_every=200, monitor_every=50, monitor_early=10,
                monitor_offsets="0,-1,-4,-16,-64", monitor_weights=False, repr_every=0),
    # GPT-2-small shape as in the authors' sibling setup (12 layers, d=768, 12 heads of 64, context 128, code data),
    # for a GPU (bf16 autocast, fused attention; torchrun for several GPUs). Not run in tests.
    "paper": dict(vocab_size=32768, n_layer=12, d_model=768, n_head=12, kv_lora_rank=256, qk_rope_dim=32,
                  max_seq_len=128, max_bytes=None, batch_size=64, steps=20_000, lr=6e-4, min_lr=6e-5,
                  warmup_steps=1000, eval_every=500, eval_batches=20, ckpt_every=1000, monitor_every=250,
                  monitor_early=10, monitor_offsets="0,-1,-4,-16,-64", repr_every=1000),
}

_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _convert(name: str, raw, hint) -> object:
    """``raw`` (a CLI string or a Python value) as the field's type; an InputError names the field."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    target = args[0] if optional else hint
    if not isinstance(raw, str):
        if raw is None and optional:
            return None
        if target is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, target) and not (target is int and isinstance(raw, bool)):
            return raw
        raise InputError(f"--{name}: expected {target.__name__}, got {raw!r}")
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:  # "1200", "12_000_000" or "1.2e7"
            try:
                return int(raw)
            except ValueError:
                value = float(raw)
                if not value.is_integer():
                    raise
                return int(value)
        return target(raw)
    except ValueError:
        raise InputError(f"--{name}: {raw!r} is not a valid {target.__name__}") from None


def resolve(preset: str = "smoke", overrides: dict | None = None, base: RunConfig | None = None) -> RunConfig:
    """The preset (or ``base``) with ``overrides`` (field → value or CLI string) applied, types checked."""
    if base is None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    values = {} if base is not None else dict(PRESETS[preset])
    for key, raw in (overrides or {}).items():
        name = key.replace("-", "_")
        if name not in _MODEL_FIELDS and name not in _TRAIN_FIELDS:
            raise InputError(f"--{key}: no such setting; model settings: {sorted(_MODEL_FIELDS)}; "
                             f"training settings: {sorted(_TRAIN_FIELDS)}")
        values[name] = raw
    model_hints = typing.get_type_hints(ModelConfig)
    train_hints = typing.get_type_hints(TrainConfig)
    model_kw = {k: _convert(k, v, model_hints[k]) for k, v in values.items() if k in _MODEL_FIELDS}
    train_kw = {k: _convert(k, v, train_hints[k]) for k, v in values.items() if k in _TRAIN_FIELDS}
    if base is not None:
        cfg = RunConfig(dataclasses.replace(base.model, **model_kw), dataclasses.replace(base.train, **train_kw),
                        base.preset)
    else:
        cfg = RunConfig(ModelConfig(**model_kw), TrainConfig(**train_kw), preset)
    return cfg.validate()  # checked before any work starts


def resume_differences(saved: RunConfig, new: RunConfig) -> dict[str, list[str]]:
    """The fields in which ``new`` differs from the run's ``saved`` config, as ``"name: old → new"`` under "model"
    and "training" (a part only when it differs), except those a resumed run may change (``RESUMABLE_CHANGES``)."""
    out = {}
    for part, label in (("model", "model"), ("train", "training")):
        old, now = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(new, part))
        changed = [f"{k}: {old[k]!r} → {now.get(k)!r}" for k in old
                   if old[k] != now.get(k) and not (part == "train" and k in RESUMABLE_CHANGES)]
        if changed:
            out[label] = changed
    return out


def parse_pairs(args: list[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--attention=mha"]`` → ``{"lr": "1e-3", "attention": "mha"}``."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise InputError(f"unexpected argument {arg!r}; overrides are --key value pairs")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            raise InputError(f"--{key} needs a value")
        out[key] = value
    return out
