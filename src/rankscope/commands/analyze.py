"""``rankscope analyze``: the rows file, the per-layer summary and the ESD figure of one checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from rankscope.vocab import ATTENTION_KINDS, QK

FORMATS = ("table", "csv", "parquet", "json")


def write_rows(df, out: Path, fmt: str) -> Path:
    """Write the rows as csv, parquet (through DuckDB) or json lines; returns the file written."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        path = out / "analysis.csv"
        df.to_csv(path, index=False)
    elif fmt == "json":
        path = out / "analysis.jsonl"
        df.to_json(path, orient="records", lines=True)
    else:
        import duckdb

        path = out / "analysis.parquet"
        duckdb.from_df(df).write_parquet(str(path))
    return path


def summary(df) -> Table:
    """Per layer: the worst head of each attention kind (most outliers, then spike strength); with
    --per-layer, the layer's own form."""
    ok = df[df["error"].eq("") & df["kind"].isin(ATTENTION_KINDS)] if "outliers" in df else df.iloc[0:0]
    per_head = (ok["head"] >= 0).any()
    rows = ok[ok["head"] >= 0] if per_head else ok
    table = Table(title="Per layer: the spikiest head" if per_head else "Per layer: the layer's form")
    # beside the spikiest head, its layer's own form (when the layer rows are there)
    layer_form = {(r.layer, r.kind): f"{int(r.outliers)} of {int(r.rank)}" for r in ok[ok["head"] < 0].itertuples()}
    beside = per_head and bool(layer_form)
    for col in ("layer", "kind", "worst head" if per_head else "form", "outliers", "spikes", "spike strength",
                "stable rank", *(["layer form outliers"] if beside else []), "KV floats/token"):
        table.add_column(col, justify="right")
    for (layer, kind), g in rows.groupby(["layer", "kind"], sort=True):
        w = g.sort_values(["outliers", "spike_strength"], ascending=False).iloc[0]
        kv = w["kv_cache_floats"]
        kv = "" if kv is None or kv != kv else str(int(kv))  # None or NaN: no KV cache for this row
        table.add_row(str(layer), kind, str(int(w["head"])) if per_head else "layer", str(int(w["outliers"])),
                      _spikes_text(w), f"{w['spike_strength']:.2f}", f"{w['stable_rank']:.1f}",
                      *([layer_form.get((layer, kind), "")] if beside else []), kv)
    table.caption = ("outliers: above the whole-spectrum null's edge; spikes: above this spectrum's own noise bulk "
                     "(sequential), \"no fit\" where the bulk is not noise-shaped, so no count")
    return table


def _spikes_text(row) -> str:
    """The spike count, or why there is none."""
    spikes = row.get("spikes")
    if spikes is not None and spikes == spikes:
        return str(int(spikes))
    fits = row.get("bulk_fits")
    return "no fit" if fits is not None and fits == fits and not bool(fits) else "–"  # NaN, None: not tested


def esd(result, out: Path) -> Path | None:
    """ESD figure of the spikiest head and the spikiest layer-level form."""
    from rankscope.report.figures import esd_figure

    df = result.table
    if "spike_strength" not in df or df["spike_strength"].isna().all():
        return None
    panels = []
    qk = df["kind"].eq(QK)
    for label, mask in (("head", qk & (df["head"] >= 0)), ("layer", qk & (df["head"] < 0))):
        sub = df[mask & df["spike_strength"].notna() & df.index.isin(list(result.diagnoses))]
        if len(sub):
            i = sub["spike_strength"].idxmax()
            panels.append((f"spikiest {label}: {df.loc[i, 'name']} ({df.loc[i, 'kind']})", result.diagnoses[i]))
    return esd_figure(panels, out / "esd.png") if panels else None


def analyze(console: Console, path: str, *, per_head: bool, kinds: list[str], null: str, fpr: float,
            out: Path | None, fmt: str, figure: bool, threads: int) -> int:
    """Analyse, print the summary and errors, write the rows and figure; returns the number of rows."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rankscope.analysis import analyze_full
    from rankscope.spectra.threads import free_cores

    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("analysing", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"analysing {what}")

        result = analyze_full(path, per_head=per_head, kinds=kinds, null=null, fpr=fpr,
                              threads=threads or free_cores(), progress=progress)
    df = result.table
    if result.not_understood:
        console.print(f"[yellow]note:[/yellow] architecture not recognised; {len(result.not_understood)} weight names "
                      f"analysed as plain matrices: {', '.join(result.not_understood[:8])}"
                      + (" ..." if len(result.not_understood) > 8 else ""), soft_wrap=True)
    console.print(summary(df))
    errors = df[df["error"].ne("")] if len(df) else df
    for _, row in errors.iterrows():
        console.print(f"[yellow]{row['name']}:[/yellow] {row['error']}", soft_wrap=True)
    if out is not None:
        if fmt != "table":
            console.print(f"rows: {write_rows(df, out, fmt)}")
        drawn = esd(result, out) if figure else None
        if drawn:
            console.print(f"figure: {drawn}")
    elif fmt != "table":
        console.print("[yellow]note:[/yellow] --format needs --out DIR; printed the summary only")
    console.print(f"[dim]{len(df)} rows ({result.architecture or 'unknown architecture'}) in "
                  f"{time.perf_counter() - t0:.1f} s[/dim]")
    return len(df)
