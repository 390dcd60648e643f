"""``rankscope analyze``: the rows file, the per-layer summary and the ESD figure of one checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from rankscope.errors import InputError
from rankscope.vocab import ATTENTION_KINDS, QK, TW

FORMATS = ("table", "csv", "parquet", "json")
MAX_ERROR_LINES = 20  # error rows printed one per line; the rest are counted (all are in the rows file)


def check_cli_options(*, kinds: str | None, null: str, fpr: float, out: Path | None, fmt: str | None, threads: int,
                      experts: str, jobs: int, device: str = "auto") -> str:
    """Validate ``analyze``'s options before any work (``InputError``: one line naming the option and the allowed
    values); returns the output format, resolved: parquet with ``--out``, else the table."""
    from rankscope.analysis import check_options, parse_experts, selected_kinds
    from rankscope.spectra.threads import check_count, check_jobs

    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    fmt = fmt or ("parquet" if out is not None else "table")
    if fmt == "parquet" and out is None:
        raise InputError("--format parquet writes a file: give --out DIR (csv and json can go to stdout)")
    if fmt == "table" and out is not None:
        raise InputError("--format table prints, it writes no rows file: with --out DIR choose parquet (the default), "
                         "csv or json")
    check_options((null,), fpr)
    if kinds is not None:
        wanted = selected_kinds(kinds)
        if null == TW and wanted & set(ATTENTION_KINDS):
            raise InputError('--null tw (the Tracy–Widom edge) is defined for a single matrix, and attention forms '
                             'are products of matrices: use --null product or mp, or --kinds mlp,weights')
    elif null == TW:
        raise InputError('--null tw (the Tracy–Widom edge) is defined for a single matrix: add --kinds mlp,weights, '
                         'or use --null product or mp for attention forms')
    parse_experts(experts)
    check_count(threads, "--threads")
    check_jobs(jobs, "--jobs")
    cli_device(device, jobs)
    if out is not None:
        check_out_dir(out)
    return fmt


def cli_device(device: str, jobs: int) -> str:
    """``--device`` resolved (``analysis.resolve_device``): "auto" is CUDA when present, but the CPU with --jobs > 1
    (worker processes share the CPU's cores); an explicit cuda with --jobs > 1 is an ``InputError``."""
    from rankscope.analysis import resolve_device

    if device == "auto" and jobs > 1:
        return "cpu"
    resolved = resolve_device(device)
    if jobs > 1 and resolved.startswith("cuda"):
        raise InputError(f"--jobs {jobs} with --device {device}: on a GPU one process does the work (--jobs 1); "
                         "worker processes share the CPU's cores")
    return resolved


def check_out_dir(out: Path) -> None:
    """``InputError`` unless ``out`` is a directory that can be written, or can be made (its nearest existing
    ancestor a writable directory). Checked before any work; nothing is created."""
    import os

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InputError(f"--out {out}: cannot be made, {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "is not writable" if base == out else f"cannot be made: {base} is not writable"
        raise InputError(f"--out {out}: {what}")


def write_rows(df, out: Path, fmt: str) -> Path:
    """Write the rows as csv, parquet (pyarrow) or json lines; returns the file written. A directory that cannot be
    written after all (a full disk, permissions changed since the check) is an ``InputError`` naming it."""
    try:
        return _write_rows(df, out, fmt)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write the rows file ({exc.strerror or exc})") from None


def _write_rows(df, out: Path, fmt: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        path = out / "analysis.csv"
        df.to_csv(path, index=False)
    elif fmt == "json":
        path = out / "analysis.jsonl"
        df.to_json(path, orient="records", lines=True)
    else:
        path = out / "analysis.parquet"
        df.to_parquet(path, index=False)
    return path


def summary(df) -> Table:
    """Per layer: the worst head of each attention kind (most outliers, then spike strength); with
    --per-layer, the layer's own form."""
    ok = df[df["error"].eq("") & df["kind"].isin(ATTENTION_KINDS)] if "outliers" in df else df.iloc[0:0]
    per_head = (ok["head_index"] >= 0).any()
    rows = ok[ok["head_index"] >= 0] if per_head else ok
    table = Table(title="Per layer: the spikiest head" if per_head else "Per layer: the layer's form")
    # beside the spikiest head, its layer's own form (when the layer rows are there)
    layer_form = {(r.stack, r.layer, r.kind): f"{int(r.outliers)} of {int(r.rank)}"
                  for r in ok[ok["head_index"] < 0].itertuples()}
    beside = per_head and bool(layer_form)
    stacks = ok["stack"].ne("").any()
    for col in (*(["stack"] if stacks else []), "layer", "kind", "worst head" if per_head else "form", "outliers",
                "spikes", "spike strength", "stable rank", *(["layer form outliers"] if beside else []),
                "KV floats/token"):
        table.add_column(col, justify="right")
    for (stack, layer, kind), g in rows.groupby(["stack", "layer", "kind"], sort=True):
        w = g.sort_values(["outliers", "spike_strength"], ascending=False).iloc[0]
        kv = w["kv_cache_floats"]
        kv = "" if kv is None or kv != kv else str(int(kv))  # None or NaN: no KV cache for this row
        table.add_row(*([stack] if stacks else []), str(layer), kind,
                      str(int(w["head_index"])) if per_head else "layer",
                      str(int(w["outliers"])),
                      _spikes_text(w), f"{w['spike_strength']:.2f}", f"{w['stable_rank']:.1f}",
                      *([layer_form.get((stack, layer, kind), "")] if beside else []), kv)
    table.caption = ("outliers: above the whole-spectrum null's edge; spikes: above this spectrum's own noise bulk "
                     "(sequential), \"no fit\" where the bulk is not noise-shaped, so no count")
    return table


def model_summary(df) -> Table:
    """The model-level summary (``rs.summary``) as a table: one row for every kind that was asked and computed."""
    from rankscope.analysis.summary import WARNINGS, _chosen_null
    from rankscope.analysis.summary import summary as summarise

    frame = summarise(df)
    stacks = frame["stack"].ne("").any()
    table = Table(title=f"Model summary, per kind ({_chosen_null(df, None)} null, offset 0)")
    for col in (*(["stack"] if stacks else []), "kind", "forms", "heads spiked", "layers spiked",
                "stable rank", "eff. rank", "÷ null", "warnings", "standing out"):
        table.add_column(col, justify="left" if col in ("stack", "kind", "warnings") else "right")
    for r in frame.to_dict("records"):
        def share(spiked, n, no_count):
            counted = n - no_count
            return "" if n == 0 else (f"{spiked:.0%} of {counted}" if counted else "no count")

        warned = ", ".join(f"{r[code]} {code}" for code in WARNINGS if r.get(code))
        table.add_row(*([r["stack"]] if stacks else []), r["kind"], str(r["forms"]),
                      share(r["heads_spiked"], r["heads"], r["heads_no_count"]),
                      share(r["layers_spiked"], r["layer_forms"], r["layers_no_count"]),
                      _cell(r["median_stable_rank"]), _cell(r["median_effective_rank"]),
                      _cell(r["median_erank_vs_null"]), warned, ", ".join(map(str, r["layers_standing_out"])))
    table.caption = ("spiked: ≥ 1 spike above the form's own noise bulk, among the forms with a count (layers: the "
                     "layer forms or plain matrices); medians of stable and effective rank, and of effective rank ÷ "
                     "the null's; warnings: the warning column's codes; standing out: layers by median ± 3 MAD")
    return table


def _cell(v) -> str:
    return "" if v is None or v != v else f"{v:.3g}"


def _spikes_text(row) -> str:
    """The spike count, or why there is none."""
    spikes = row.get("spikes")
    if spikes is not None and spikes == spikes:
        return str(int(spikes))
    fits = row.get("bulk_fits")
    return "no fit" if fits is not None and fits == fits and not bool(fits) else "–"  # NaN, None: not tested


def esd(result, out: Path) -> Path | None:
    """ESD figure of the spikiest head and the spikiest layer-level form: the most outliers, then the largest spike
    strength (the order of the per-layer table's "spikiest head"). A model with no qk rows: its spikiest matrix."""
    from rankscope.report.figures import esd_figure

    df = result.table
    if "spike_strength" not in df or df["spike_strength"].isna().all():
        return None
    panels = []
    qk = df["kind"].eq(QK)
    masks = (("head", qk & (df["head_index"] >= 0)), ("layer", qk & (df["head_index"] < 0))) if qk.any() else (
        ("matrix", df["head_index"] < 0),)
    for label, mask in masks:
        sub = df[mask & df["spike_strength"].notna() & df.index.isin(list(result.diagnoses))]
        if len(sub):
            i = sub.sort_values(["outliers", "spike_strength"], ascending=False).index[0]
            panels.append((f"spikiest {label}: {df.loc[i, 'name']} ({df.loc[i, 'kind']})", result.diagnoses[i]))
    return esd_figure(panels, out / "esd.png") if panels else None


def analyze(console: Console, path: str, *, per_head: bool, kinds: list[str] | None, null: str, fpr: float,
            out: Path | None, fmt: str, figure: bool, threads: int = 1, jobs: int = 1, experts: str = "all",
            device: str | None = None,
            spectra: bool = False) -> int:
    """Analyse, print the notes, tables and errors, write the rows and figure; returns the number of rows. With
    ``fmt`` csv or json and no ``out`` the rows go to stdout (give a stderr console for the rest). ``jobs``
    worker processes over the layers, each of one torch and ``threads`` BLAS threads (``analyze_full``)."""
    import sys
    import time

    from rankscope.analysis import analyze_full
    from rankscope.commands.progress import progress_bar

    t0 = time.perf_counter()
    with progress_bar(console, "reading the checkpoint", "analysing") as progress:
        result = analyze_full(path, per_head=per_head, kinds=kinds, null=null, fpr=fpr, experts=experts,
                              spectra=spectra, threads=threads, jobs=jobs, progress=progress, device=device)
    df = result.table
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    if df["kind"].isin(ATTENTION_KINDS).any():
        console.print(summary(df))
    console.print(model_summary(df))
    errors = df[df["error"].ne("")]
    for _, row in errors.head(MAX_ERROR_LINES).iterrows():
        console.print(f"[yellow]{row['name']}:[/yellow] {row['error']}", soft_wrap=True)
    if len(errors) > MAX_ERROR_LINES:
        console.print(f"[yellow]… and {len(errors) - MAX_ERROR_LINES} more rows with errors[/yellow] (the error "
                      "column of the rows file has them all)")
    if out is not None:
        console.print(f"rows: {write_rows(df, out, fmt)}")
        drawn = esd(result, out) if figure else None
        if drawn:
            console.print(f"figure: {drawn}")
    elif fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        df.to_json(sys.stdout, orient="records", lines=True)
        sys.stdout.write("\n")
    console.print(f"[dim]{len(df)} rows ({result.architecture or 'no attention layout'}) in "
                  f"{time.perf_counter() - t0:.1f} s[/dim]")
    return len(df)
