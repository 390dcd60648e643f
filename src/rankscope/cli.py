"""The ``rankscope`` command line (typer + rich): options, and the exit codes 0 success, 1 failure of the work,
2 bad input (one line saying what and where). Each command's work is in ``rankscope.commands``."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rankscope.commands.settings import PRESET_HELP, SETTINGS_HELP
from rankscope.errors import CheckpointError, InputError
from rankscope.vocab import MHA, PRODUCT, STUDY_VARIANTS, VARIANTS


def _plain_help() -> None:
    """Help that reads as the docs do: a flag is ``--per-head/--per-layer`` with no ``<bool>`` beside it, and an
    argument is ``PATH`` in the usage line (typer ≥ 0.2x writes ``{path}``). Both are typer's display hooks; where
    a typer version lacks them nothing changes (tests/test_cli_help.py checks the output)."""
    from typer import core

    option, argument = core.TyperOption, core.TyperArgument
    if hasattr(option, "display_type_rich"):
        shown = option.display_type_rich
        option.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)
    if hasattr(argument, "_usage_display_name"):
        def usage(self) -> str:
            name = (self.metavar or self.name).upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        argument._usage_display_name = usage


_plain_help()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Rank collapse in neural networks, by RMT.",
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"rankscope {version('rankscope')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """rankscope: Marchenko–Pastur diagnostics with nulls that are right for products of matrices."""


@contextmanager
def _bad_input_exits_2():
    """InputError / CheckpointError → one red line and exit code 2."""
    try:
        yield
    except (InputError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc


@app.command()
def demo(
    layers: int = typer.Option(4, help="layers of the untrained GPT-2-small-shaped model"),
    fpr: float = typer.Option(0.01, help="false-positive rate of the outlier test, per spectrum"),
    seed: int = typer.Option(0),
) -> None:
    """Diagnose an untrained attention stack and a planted-spike matrix: the product null vs the naive MP fit.

    The first run simulates two nulls (about 3 minutes on 2 cores); they are cached, and later runs take seconds.
    """
    from rankscope.commands.demo import planted, untrained_table
    from rankscope.commands.progress import progress_bar

    t0 = time.perf_counter()
    with _bad_input_exits_2():
        if layers < 1 or not 0 < fpr <= 0.5:
            raise InputError(f"--layers {layers} --fpr {fpr}: expected layers ≥ 1 and fpr in (0, 0.5]")
        with progress_bar(console, "starting", "diagnosing") as progress:
            table = untrained_table(layers, fpr, seed, progress)
        console.print(table)
        planted(console, fpr, seed)
    console.print(f"[dim]done in {time.perf_counter() - t0:.1f} s[/dim]")


@app.command()
def analyze(
    paths: list[str] = typer.Argument(..., help="HF model dir, .safetensors (or sharded index), .gguf, .pt/.bin, run "
                                                "dir or hub id; several checkpoints, or a directory of "
                                                "checkpoint-*/step_* dirs, for a series with a step column"),
    per_head: bool = typer.Option(True, "--per-head/--per-layer", help="also diagnose every head, not only layers"),
    kinds: str | None = typer.Option(None, help="comma-separated kind groups qk, ov, mlp, weights, or single kinds "
                                                "(default: all)"),
    null: str = typer.Option(PRODUCT, help="product (structure-matched) | mp (naive fit) | tw (single matrices) | "
                                           "permutation"),
    fpr: float = typer.Option(0.01, help="false-positive rate of the outlier test, per spectrum, in (0, 0.5]"),
    out: Path | None = typer.Option(None, help="directory for the rows file (parquet unless --format says) and the "
                                               "ESD figure; for a series, the run store"),
    fmt: str | None = typer.Option(None, "--format", help="table | csv | parquet | json (default: parquet with "
                                                          "--out, else table); csv or json without --out: stdout"),
    figure: bool = typer.Option(True, "--figure/--no-figure",
                                help="with --out, also draw esd.png: the spikiest head's and layer's spectra"),
    threads: int = typer.Option(1, help="BLAS threads of each process (torch gets one); more threads than cores, or "
                                        "a busy core, make each BLAS call wait: use --jobs for parallelism"),
    experts: str = typer.Option("all", help="mixture-of-experts matrices: all | none | sample:K per layer"),
    spectra: bool = typer.Option(False, "--spectra", help="add each row's eigenvalues to the rows file"),
    jobs: int = typer.Option(1, help="worker processes (1..cores, one torch and --threads BLAS threads each): one "
                                     "checkpoint's layers, or a series' checkpoints, analysed at once"),
    device: str = typer.Option("auto", help="cpu | cuda | cuda:N | auto (CUDA when present and --jobs is 1): where "
                                            "the tensors are read to and the spectra computed"),
) -> None:
    """Diagnose every attention head, layer and weight matrix of a checkpoint (or a series of checkpoints)."""
    from rankscope.commands.analyze import analyze as run_analyze
    from rankscope.commands.analyze import check_cli_options

    with _bad_input_exits_2():
        fmt = check_cli_options(kinds=kinds, null=null, fpr=fpr, out=out, fmt=fmt, threads=threads, experts=experts,
                                jobs=jobs, device=device)
        from rankscope.commands.analyze import cli_device

        device = cli_device(device, jobs)
        kind_list = None if kinds is None else [k.strip() for k in kinds.split(",") if k.strip()]
        options = dict(per_head=per_head, kinds=kind_list, null=null, fpr=fpr)
        from rankscope.commands.series import analyze_series, checkpoint_series

        series = checkpoint_series(paths)
        if series is not None:
            if out is None:
                raise InputError(f"a series of {len(series)} checkpoints is written to a run store: give --out DIR")
            if spectra or fmt not in ("parquet", "table") or not figure:
                raise InputError("--format, --spectra and --no-figure apply to one checkpoint; a series is a run store "
                                 "(its spectra table keeps every attention form's eigenvalues)")
            analyze_series(console, series, out=out, jobs=jobs, experts=experts, threads=threads, device=device,
                           **options)
            return
        to_stdout = out is None and fmt in ("csv", "json")
        run_analyze(Console(stderr=True) if to_stdout else console, paths[0], out=out, fmt=fmt, figure=figure,
                    threads=threads, jobs=jobs, experts=experts, spectra=spectra, device=device, **options)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=SETTINGS_HELP)
def train(
    ctx: typer.Context,
    preset: str = typer.Option("smoke", help=f"{PRESET_HELP}; one run each"),
    attention: str = typer.Option(MHA, help="the variant: " + " | ".join(VARIANTS)),
    run: Path | None = typer.Option(None, "--run", "--out",
                                    help="run directory (default runs/<preset>-<variant>); under torchrun use "
                                         "--out, which torchrun's own parser does not claim"),
    resume: bool = typer.Option(False, help="continue the newest checkpoint in --run"),
    force: bool = typer.Option(False, "--force", help="with --resume: continue even where the settings differ from "
                                                      "the run's saved config (the new ones are saved)"),
    every: int | None = typer.Option(None, help="diagnose the spectra every N steps (overrides the preset)"),
) -> None:
    """Train the decoder with one attention variant, diagnosing its spectra as it goes.

    Any setting below can be given as --key value (e.g. --lr 1e-3 --n_layer 6).
    """
    from rankscope.nn.config import summary_table
    from rankscope.train import resolve
    from rankscope.train import train as run_training
    from rankscope.train.config import parse_pairs

    with _bad_input_exits_2():
        fields, pairs = VARIANTS.get(attention, {"attention": attention}), parse_pairs(ctx.args)
        clash = [k for k in fields if k in pairs and str(pairs[k]) != fields[k]]
        if clash:
            raise InputError(f"--attention {attention} sets {', '.join(f'{k}={fields[k]}' for k in clash)}; "
                             f"--{clash[0]} {pairs[clash[0]]} contradicts it (choose the variant by its name)")
        overrides = {**fields, **pairs}
        if every is not None:
            overrides["monitor_every"] = every
        cfg = resolve(preset, overrides)
        run_dir = run or Path("runs") / f"{preset}-{attention}"
        console.print(summary_table(cfg.model), highlight=False)
        try:
            result = run_training(cfg, run_dir, resume=resume, force=force)
        except FloatingPointError as exc:  # diverged: the checkpoints before it are intact
            console.print(f"[red]training failed:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from exc
    console.print(f"{result.run_dir}: {result.steps} steps in {result.seconds:.0f} s, "
                  f"{result.tokens_per_second:,.0f} tokens/s; loss {result.final_loss:.3f}, "
                  f"validation {result.val_loss:.3f}; diagnostics took {result.monitor_seconds:.1f} s "
                  f"({100 * result.monitor_seconds / max(result.seconds, 1e-9):.1f} % of wall time)")
    if result.interrupted:
        console.print(f"[yellow]interrupted[/yellow]: checkpoint saved; continue with --run {result.run_dir} --resume")
        raise typer.Exit(130)


SQL_FORMATS = ("table", "csv", "json")


@app.command()
def sql(
    run_dir: Path = typer.Argument(..., help="a run directory, or a study directory holding several runs"),
    query: str = typer.Argument(..., help='SQL over the views attention, qk, ov, weights, spectra, repr, train '
                                          '(quote "null")'),
    fmt: str = typer.Option("table", "--format", help=" | ".join(SQL_FORMATS)),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="also run statements that write or reach files "
                                                                    "(COPY, ATTACH, INSTALL, read_csv, ...)"),
) -> None:
    """Query a run's diagnostics with DuckDB (works while the run is still training); read-only by default."""
    from rankscope.commands.store import query_store

    with _bad_input_exits_2():
        if fmt not in SQL_FORMATS:
            raise InputError(f"--format {fmt!r}: expected one of {', '.join(SQL_FORMATS)}")
        if not run_dir.exists():
            raise InputError(f"{run_dir}: no such run directory")
        frame = query_store(Console(stderr=True), run_dir, query, allow_writes=allow_writes)
    if fmt == "csv":
        print(frame.to_csv(index=False), end="")
    elif fmt == "json":
        print(frame.to_json(orient="records"))
    else:
        table = Table()
        for col in frame.columns:
            table.add_column(str(col), justify="right")
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)


store_app = typer.Typer(no_args_is_help=True, help="Check and repair a run store (the Parquet parts in metrics/).")
app.add_typer(store_app, name="store")


@store_app.command("check")
def store_check(
    run_dir: Path = typer.Argument(..., help="a run directory, or a study directory holding several runs"),
    repair: bool = typer.Option(False, "--repair", help="move every problem file into metrics/quarantine/ (never "
                                                        "deletes; a part's rows that are not duplicates are "
                                                        "committed again first)"),
) -> None:
    """List what a reader skips or doubts in metrics/: exit 0 when clean, 1 when problems are found (unrepaired)."""
    from rankscope.commands.store import check_store

    with _bad_input_exits_2():
        code = check_store(console, run_dir, fix=repair)
    raise typer.Exit(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=SETTINGS_HELP)
def study(
    ctx: typer.Context,
    preset: str = typer.Option("smoke", help=f"{PRESET_HELP}; a study trains seeds × variants runs"),
    seeds: int | None = typer.Option(None, help="seeds per variant (default 3 for smoke, 5 otherwise; a verdict "
                                                "needs at least 3)"),
    variants: str = typer.Option(",".join(STUDY_VARIANTS), help="comma-separated variants"),
    out: Path | None = typer.Option(None, help="study directory (default studies/<preset>)"),
    set_: list[str] = typer.Option([], "--set", help="key=value applied to every run (repeatable)"),
    sweep: str | None = typer.Option(None, help="a second axis, e.g. lr=5e-4,2e-3"),
    jobs: int = typer.Option(1, help="runs trained at once (processes of one thread each)"),
    open_: bool = typer.Option(False, "--open", help="open the report in a browser when done"),
) -> None:
    """Train MHA, GQA, MLA-PreRoPE (input, coupled), MHA- and MLA-Decoupled on the same data and seeds; report."""
    import shlex

    from rankscope.commands.settings import study_banner
    from rankscope.commands.study import render_report
    from rankscope.commands.study import study as run_study

    out = out or Path("studies") / preset
    with _bad_input_exits_2():
        seeds = seeds if seeds is not None else (3 if preset == "smoke" else 5)
        console.print(study_banner(preset, seeds, variants, sweep), highlight=False)
        run_study(console, out, preset=preset, seeds=seeds, variants=[v.strip() for v in variants.split(",")
                                                                      if v.strip()],
                  sets=set_, extra=ctx.args, sweep=sweep, jobs=jobs, command=shlex.join(["rankscope", *sys.argv[1:]]))
        render_report(console, out, open_)


@app.command()
def report(
    root: Path = typer.Argument(..., help="a study directory (study.json) or a run directory (config.json)"),
    open_: bool = typer.Option(False, "--open", help="open the report in a browser"),
) -> None:
    """Write report.html (figures embedded) and summary.json for a study or a single run."""
    from rankscope.commands.study import render_report

    with _bad_input_exits_2():
        render_report(console, root, open_)


@app.command("repr")
def repr_(
    features: Path = typer.Argument(..., help="FEATURES.npy: (N, D) representations"),
    labels: Path | None = typer.Option(None, help="LABELS.npy: (N,) integer classes"),
    logits: Path | None = typer.Option(None, help="LOGITS.npy: (N, C) classifier outputs"),
    weights: Path | None = typer.Option(None, help="W.npy: (C, D) classifier weights, [out, in]"),
) -> None:
    """Every representation-collapse metric the inputs allow, as a table."""
    from rankscope.commands.repr import metrics_table

    with _bad_input_exits_2():
        table = metrics_table(features, labels, logits, weights)
    console.print(table)


@app.command()
def describe(
    path: str = typer.Argument(..., help="HF model dir, .safetensors (or sharded index), .pt/.bin, run dir or hub id"),
) -> None:
    """What analyze would diagnose (forms per head and layer, plain matrices) and an estimate of its cost."""
    from rankscope.commands.describe import describe as run_describe

    with _bad_input_exits_2():
        run_describe(console, path)


@app.command()
def diff(
    base: str = typer.Argument(..., help="the base checkpoint: HF model dir, .safetensors, .pt/.bin, run dir, hub id"),
    tuned: str = typer.Argument(..., help="the tuned checkpoint, of the same architecture and shapes"),
    per_head: bool = typer.Option(True, "--per-head/--per-layer", help="also compare every head's forms"),
    kinds: str | None = typer.Option(None, help="comma-separated kind groups qk, ov, mlp, weights, or single kinds "
                                                "(default: all)"),
    null: str = typer.Option(PRODUCT, help="product (structure-matched) | mp (naive fit)"),
    fpr: float = typer.Option(0.01, help="false-positive rate of the outlier test, per spectrum"),
    k: int = typer.Option(0, help="dimension of the compared top singular subspaces; 0 = the base's outlier count"),
    out: Path | None = typer.Option(None, help="directory for diff.parquet (every row) and diff.png"),
    threads: int = typer.Option(1, help="BLAS threads for the numerics (torch gets one); more threads than free cores "
                                        "make each BLAS call wait"),
) -> None:
    """What fine-tuning changed: the spectrum of ΔW = W_tuned − W_base per matrix and head, and the top subspaces."""
    from rankscope.commands.diff import diff as run_diff

    with _bad_input_exits_2():
        from rankscope.spectra.threads import check_count

        if k < 0:
            raise InputError(f"--k must be 0 (the base's outlier count) or positive, got {k}")
        check_count(threads, "--threads")
        kind_list = None if kinds is None else [x.strip() for x in kinds.split(",") if x.strip()]
        run_diff(console, base, tuned, per_head=per_head, kinds=kind_list, null=null, fpr=fpr, k=k or None, out=out,
                 threads=threads)


# Commands that only read inputs and write closed files end with os._exit: the interpreter's teardown after
# importing torch takes longer than analysing a small model (README, "Speed"). Training commands exit normally.
FAST_EXIT_COMMANDS = ("analyze", "sql", "report", "describe", "diff", "store")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning at the command line is one line, ``warning: …``, without Python's file and line prefix."""
    print(f"warning: {message}", file=file or sys.stderr)


def run() -> None:
    """The ``rankscope`` console script: ``app()``, then a fast exit for the read-only commands. Warnings (a
    skipped store part, a model without a layout) print as one line each."""
    import warnings

    warnings.showwarning = _one_line_warning
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS:
        try:
            if isinstance(code, str):  # sys.exit("message"): say it, as Python's own exit would
                print(code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:  # e.g. `rankscope analyze … | head`: the reader has gone, nothing is lost
            pass
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
    sys.exit(code)


if __name__ == "__main__":
    run()
