"""``rankscope study`` and ``rankscope report``: plan and train the runs, then render and summarise the report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_verdict(console: Console, root: Path) -> None:
    """The verdict of every claim, per sweep point, from the report's summary.json (nothing for a single run)."""
    summary = json.loads((root / "summary.json").read_text())
    if not summary.get("points"):
        return
    table = Table(title="Claims of Jha & Reagen (2507.09394)")
    for col in ("sweep", "(i) early spikes", "(ii) with rank collapse", "(iii) only Decoupled prevents",
                "can it conclude?"):
        table.add_column(col)
    small = []
    for point in summary["points"]:
        short = point.get("scale", {}).get("too_small", [])
        small += short
        table.add_row(point["sweep"], *[point["claims"][k]["verdict"] for k in ("i", "ii", "iii")],
                      f"[yellow]no: too small ({', '.join(short)})[/yellow]" if short else "yes")
    console.print(table)
    if small:
        console.print("[yellow]These verdicts come from a study too small to test the claims: read them as a check "
                      "that the pipeline runs, not as findings. For a verdict: rankscope study --preset cpu "
                      "(about an hour on 2 cores).[/yellow]")


def render_report(console: Console, root: Path, open_: bool) -> Path:
    """report.html and summary.json in ``root``, the verdict printed; returns the page."""
    from rankscope.report.html import write_report

    with console.status("rendering the report..."):
        page = write_report(root)
    print_verdict(console, root)
    console.print(f"report: {page}")
    if open_:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    return page


def study(console: Console, out: Path, *, preset: str, seeds: int, variants: list[str], sets: list[str],
          extra: list[str], sweep: str | None, jobs: int, command: str) -> None:
    """Plan the study (``--set key=value`` and ``--key value`` applied to every run) and train what is unfinished."""
    from rankscope.errors import InputError
    from rankscope.study import plan, run_study
    from rankscope.train.config import parse_pairs

    bad = [item for item in sets if "=" not in item]
    if bad:
        raise InputError(f"--set {bad[0]!r}: expected key=value")
    overrides = dict(item.split("=", 1) for item in sets)
    overrides.update(parse_pairs(extra))
    specs = plan(out, preset, seeds, variants, overrides, sweep)
    run_study(out, specs, jobs=jobs, command=command, log=lambda line: console.print(line, highlight=False))
