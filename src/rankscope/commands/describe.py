"""``rankscope describe``: what ``analyze`` would diagnose in a checkpoint, and roughly what it would cost."""

from __future__ import annotations

from itertools import groupby

from rich.console import Console
from rich.table import Table


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] → "0–2, 5"."""
    runs = []
    for _, run in groupby(enumerate(sorted(layers)), key=lambda x: x[1] - x[0]):
        run = [x for _, x in run]
        runs.append(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}")
    return ", ".join(runs)


def attention_table(df) -> Table:
    """Per attention kind and run of alike layers: heads, the head's and the layer's form and rank bound."""
    forms = df[~df["plain"]] if len(df) else df
    runs: dict[tuple, list[int]] = {}  # alike layers (everything but the layer equal), in the order analyze reads
    for (stack, layer, kind), g in forms.groupby(["stack", "layer", "kind"], sort=False):
        heads, whole = g[g["head_index"] >= 0], g[g["head_index"] < 0]
        kv = g["kv_cache_floats"].iloc[0]
        desc = (stack, kind, str(len(heads)), ", ".join(dict.fromkeys(heads["shapes"])) or "–",
                ", ".join(str(r) for r in dict.fromkeys(heads["rank"])) or "–",
                whole["shapes"].iloc[0] if len(whole) else "–", str(whole["rank"].iloc[0]) if len(whole) else "–",
                g["variant"].iloc[0], "" if kv is None or kv != kv else str(int(kv)))
        runs.setdefault(desc, []).append(layer)
    stacks = any(desc[0] for desc in runs)  # one unnamed stack: no column for it
    table = Table(title="Attention forms (analysed per head and per layer)")
    for col in (("stack",) if stacks else ()) + ("layers", "kind", "heads", "head form", "head rank", "layer form",
                                                 "layer rank", "variant", "KV floats/token"):
        table.add_column(col, justify="right")
    for (stack, kind, *rest), layers in runs.items():
        table.add_row(*((stack,) if stacks else ()), _layer_ranges(layers), kind, *rest)
    return table


def matrix_table(df) -> Table:
    """Per kind and shape: how many plain matrices (single-matrix MP null), with an example name."""
    table = Table(title="Plain weight matrices (one spectrum each)")
    for col in ("kind", "shape", "rank", "count", "for example"):
        table.add_column(col, justify="right")
    plain = df[df["plain"] & df["error"].eq("")] if len(df) else df
    for (kind, shapes), g in plain.groupby(["kind", "shapes"], sort=False):
        table.add_row(kind, shapes.replace("·", "×"), str(g["rank"].iloc[0]), str(len(g)), g["name"].iloc[0])
    return table


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def describe(console: Console, path: str) -> None:
    """Print the architecture, the attention forms per layer, the plain matrices, what is skipped or read as plain
    matrices only, and the cost estimate."""
    from rankscope.analysis.describe import describe_full

    found = describe_full(path)
    df = found.table
    n_forms = int((~df["plain"]).sum()) if len(df) else 0
    console.print(f"[bold]{path}[/bold]: model_type {found.model_type}, probe family {found.family}; "
                  f"{n_forms} attention forms, {len(df) - n_forms} plain matrices", soft_wrap=True)
    if n_forms:
        console.print(attention_table(df))
    if len(df) - n_forms:
        console.print(matrix_table(df))
    for _, row in df[df["error"].ne("")].iterrows() if len(df) else []:
        console.print(f"[yellow]{row['name']}:[/yellow] {row['error']}", soft_wrap=True)
    for note in found.notes:
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    if found.fallback:
        console.print(f"[yellow]read as plain matrices only[/yellow] (no attention layout): "
                      f"{', '.join(found.fallback[:8])}" + (" ..." if len(found.fallback) > 8 else ""), soft_wrap=True)
    e = found.estimate
    console.print(f"estimate (one core, cold null cache): about {e.seconds:.1f} s for a trained model (spectra "
                  f"{e.spectra_seconds:.1f} s, {e.nulls} null structures with their spike-count deflations "
                  f"{e.null_seconds:.1f} s), {e.seconds_min:.1f} s for an untrained one; later runs (nulls cached) "
                  f"about {e.spectra_seconds:.1f} s; peak memory about {_size(e.peak_bytes)} beyond the interpreter. "
                  "A model, not a measurement (rankscope.analysis.describe).", soft_wrap=True)
