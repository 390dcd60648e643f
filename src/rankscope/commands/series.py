"""A checkpoint series: several checkpoints of one training run, analysed into one run store (layer × step).

``checkpoint_series`` recognises a series among the CLI's paths (several paths; a directory of HF Trainer
``checkpoint-*`` folders or of ``step_*`` / ``step-*`` / ``ckpt-*`` / ``iter_*`` folders or weights files; a
rankscope run directory with two or more checkpoints) and gives each checkpoint its step. ``analyze_series``
runs ``analysis.analyze_full`` on each (in worker processes of one thread each with ``jobs`` > 1) and writes the
rows with their ``step`` into a run store, in the tables the Monitor writes (``attention``, ``weights``,
``spectra``), so ``rankscope sql`` and ``rankscope report`` read it like a training run's.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pandas as pd
from rich.console import Console

from rankscope.errors import InputError
from rankscope.probes.load import DIR_WEIGHTS, TORCH_SUFFIXES
from rankscope.rundir import CHECKPOINTS, RunDir

WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".gguf")  # weights files a series may list (probes.load reads)
TRAINER_STATE = "trainer_state.json"  # HF Trainer's checkpoint-N/trainer_state.json, with global_step
_SERIES_NAME = re.compile(r"^(?:checkpoint-|step[_-]|ckpt[_-]|iter[_-])(\d+)(\.[A-Za-z0-9]+)?$")


def step_of_name(name: str) -> int | None:
    """The step in a checkpoint's name (``checkpoint-500``, ``step_000100.safetensors``, ``ckpt-3.pt``,
    ``iter_0000200``, or a bare number such as ``500``), None when the name carries none."""
    if name.isdigit():
        return int(name)
    match = _SERIES_NAME.match(name)
    if match is None or (match.group(2) and match.group(2) not in WEIGHT_SUFFIXES):
        return None
    return int(match.group(1))


def trainer_step(path: Path) -> int | None:
    """``global_step`` of an HF Trainer checkpoint directory's trainer_state.json, None without one."""
    state = path / TRAINER_STATE
    if not path.is_dir() or not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{state}: not a readable trainer state ({exc})") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"{state}: global_step must be a non-negative integer, got {step!r}")
    return step


def _is_checkpoint(path: Path) -> bool:
    """A weights file, a directory holding one (an HF model or Trainer checkpoint), or a rankscope run."""
    if path.is_file():
        return path.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
    if path.is_dir():
        return (bool(RunDir(path).steps()) or any((path / name).is_file() for name in DIR_WEIGHTS)
                or any(path.glob("*.safetensors")))
    return False


def _members(directory: Path) -> list[Path]:
    """The checkpoints a directory holds as a series: its entries named like ``checkpoint-N`` (weights files or
    folders), or a run directory's checkpoint files (``checkpoints/step_*.safetensors``)."""
    run = RunDir(directory)
    if run.steps():
        return [run.weights(s) for s in run.steps()]
    if directory.name == CHECKPOINTS and RunDir(directory.parent).steps():  # RUN/checkpoints itself
        return _members(directory.parent)
    return sorted(p for p in directory.iterdir() if step_of_name(p.name) is not None
                  and not p.name.startswith(".") and (p.is_dir() or p.name.endswith(WEIGHT_SUFFIXES)))


def _with_steps(paths: list[Path]) -> list[tuple[int, str]]:
    """Each checkpoint's step (from its name, else trainer_state.json), or all by position when some have none."""
    for p in paths:
        if not _is_checkpoint(p):
            what = "no such file or directory" if not p.exists() else "not a checkpoint (no weights file in it)"
            raise InputError(f"{p}: {what}; a checkpoint series needs a checkpoint at every path")
    steps = [step_of_name(p.name) for p in paths]
    steps = [s if s is not None else trainer_step(p) for s, p in zip(steps, paths, strict=True)]
    if any(s is None for s in steps):
        unnamed = [str(p) for s, p in zip(steps, paths, strict=True) if s is None]
        warnings.warn(f"no step in the name or trainer_state.json of {', '.join(unnamed[:3])}"
                      f"{' …' if len(unnamed) > 3 else ''}: the checkpoints are numbered by their position in the "
                      f"order given (0 … {len(paths) - 1})", UserWarning, stacklevel=3)
        steps = list(range(len(paths)))
    seen: dict[int, Path] = {}
    for s, p in zip(steps, paths, strict=True):
        if s in seen:
            raise InputError(f"{p}: step {s} again (also {seen[s]}); each checkpoint of a series needs its own step")
        seen[s] = p
    return sorted((s, str(p)) for s, p in zip(steps, paths, strict=True))


def checkpoint_series(paths: list[str]) -> list[tuple[int, str]] | None:
    """The (step, checkpoint path) list of a series, sorted by step; None when ``paths`` is one ordinary
    checkpoint (a weights file, a model directory, a hub id, a run with at most one checkpoint).

    Several paths: each a checkpoint. One directory: its ``checkpoint-*`` (HF Trainer), ``step_*``/``step-*``/
    ``ckpt-*``/``iter_*`` entries, or a rankscope run's checkpoints. A step comes from the name's number, else
    from ``trainer_state.json``'s ``global_step``, else (for all, with a warning) from the position in the given
    order. Duplicate steps, or a path that is no checkpoint: ``InputError``."""
    if not paths:
        raise InputError("no checkpoint given")
    if len(paths) > 1:
        return _with_steps([Path(p).expanduser() for p in paths])
    path = Path(paths[0]).expanduser()
    if not path.is_dir():
        return None
    members = _members(path)
    if RunDir(path).steps() and len(members) < 2:
        return None  # a run with one checkpoint: analyse it as one
    if not members:
        return None
    if any((path / name).is_file() for name in DIR_WEIGHTS):  # e.g. a Trainer's output dir with its final model
        warnings.warn(f"{path} holds a model and a checkpoint series; analysing the series ({len(members)} "
                      "checkpoints), not the model beside them", UserWarning, stacklevel=2)
    return _with_steps(members)


# ---------------------------------------------------------------------------------------------- analysis


def analyze_one(path: str, step: int, per_head: bool, kinds, null, fpr: float, experts,
                threads: int | None, device: str | None = None) -> tuple[int, pd.DataFrame, list[dict], list[str]]:
    """(step, the rows of ``analyze_full`` with their ``step`` and ``checkpoint``, the spectra rows of its
    attention forms, its notes): the work of one checkpoint, in a worker process or in this one."""
    from rankscope.analysis import analyze_full, spectra_rows

    found = analyze_full(path, per_head=per_head, kinds=kinds, null=null, fpr=fpr, experts=experts, threads=threads,
                         device=device)
    return step, found.table.assign(step=step, checkpoint=path), spectra_rows(found, step=step), found.notes


def _store(store, step: int, table: pd.DataFrame, spectra: list[dict], notes: list[str], said: set[str],
           console: Console) -> None:
    """One checkpoint's rows into the store's tables (attention forms, plain matrices, spectra), then a flush; its
    notes (once each) and error rows are said."""
    from rankscope.vocab import ATTENTION_KINDS

    for note in notes:
        if note not in said:
            console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
            said.add(note)
    errors = int(table["error"].ne("").sum()) if "error" in table else 0
    if errors:
        console.print(f"[yellow]step {step}:[/yellow] {errors} rows with errors (their error column says why)")
    if not table.empty:
        attention = table["kind"].isin(ATTENTION_KINDS)
        store.append("attention", table[attention])
        store.append("weights", table[~attention])
    store.append("spectra", spectra)
    store.flush()


def analyze_series(console: Console, checkpoints: list[tuple[int, str]], *, out: Path, jobs: int, per_head,
                   kinds, null, fpr, experts: str = "all", threads: int = 1, device: str | None = None) -> Path:
    """Analyse every (step, checkpoint) into the run store under ``out`` (``RunStore``: tables ``attention``,
    ``weights``, ``spectra``, each row with its ``step``); steps already stored there are skipped (resumable).
    ``jobs`` > 1: that many worker processes over the checkpoints (``spectra.threads.worker_pool``: fresh
    processes of one torch thread); ``threads``: BLAS threads per process (1, the default, or the one process's).
    ``experts``: as ``analyze``'s. Returns ``out``."""
    import concurrent.futures as cf
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rankscope.analysis import check_options, parse_experts, resolve_device, selected_kinds
    from rankscope.spectra.threads import check_count, check_jobs, worker_context, worker_pool
    from rankscope.store import RunStore
    from rankscope.vocab import ALL_GROUPS

    check_jobs(jobs, "--jobs")
    check_count(threads, "--threads")
    check_options((null,) if isinstance(null, str) else tuple(null), fpr)
    selected_kinds(kinds if kinds is not None else ALL_GROUPS)  # bad kinds fail before any work
    parse_experts(experts)
    device = resolve_device(device)
    if jobs > 1 and device is not None and device.startswith("cuda"):
        raise InputError(f"--jobs {jobs} with --device {device}: on a GPU one process analyses the checkpoints "
                         "(--jobs 1)")
    out = Path(out)
    store = RunStore(out)
    done = store.steps("attention") | store.steps("weights")
    todo = [(s, p) for s, p in checkpoints if s not in done]
    if len(todo) < len(checkpoints):
        console.print(f"{out}: {len(checkpoints) - len(todo)} of {len(checkpoints)} steps already stored, skipped")
    t0 = time.perf_counter()
    args = (per_head, kinds, null, fpr, experts)  # device: the checkpoints are analysed here when it is a GPU
    said: set[str] = set()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("analysing checkpoints", total=len(todo))
        if jobs == 1 or len(todo) <= 1:
            for step, path in todo:
                bar.update(task, description=f"analysing step {step}")
                _store(store, *analyze_one(path, step, *args, threads=threads, device=device), said, console)
                bar.advance(task)
        else:
            context = worker_context(["rankscope.commands.series", "rankscope.analysis"])
            with worker_pool(min(jobs, len(todo)), blas=threads, context=context) as pool:
                # analyze_full runs under thread_budget(torch=1, blas=threads) in each worker
                futures = [pool.submit(analyze_one, path, step, *args, threads=threads, device=device)
                           for step, path in todo]
                try:
                    for future in cf.as_completed(futures):
                        step, table, spectra, notes = future.result()
                        _store(store, step, table, spectra, notes, said, console)
                        bar.update(task, advance=1, description=f"analysed step {step}")
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    if todo:
        console.print(f"{out}: {len(todo)} checkpoints (steps {', '.join(str(s) for s, _ in todo[:8])}"
                      f"{' …' if len(todo) > 8 else ''}) in {time.perf_counter() - t0:.1f} s; "
                      f"rankscope report {out} draws them layer × step")
    return out
