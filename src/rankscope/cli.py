"""The ``rankscope`` command line (typer + rich). Exit codes: 0 success, 1 failure, 2 bad input."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rankscope.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Rank collapse in neural networks, by RMT.")
console = Console()


@app.callback()
def main() -> None:
    """rankscope: Marchenko–Pastur diagnostics with nulls that are right for products of matrices."""


def _init_heads(d: int, heads: int, dh: int, seed: int, std: float = 0.02):
    """Per-head query and key factors of a freshly initialised attention layer: (H, d, dh), (H, dh, d)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    Wq = torch.randn(heads * dh, d, generator=g) * std  # PyTorch layout [out, in]
    Wk = torch.randn(heads * dh, d, generator=g) * std
    return Wq.view(heads, dh, d).mT, Wk.view(heads, dh, d)  # B_h = Wq_hᵀ Wk_h


@app.command()
def demo(
    layers: int = typer.Option(4, help="layers of the untrained GPT-2-small-shaped model"),
    fpr: float = typer.Option(0.01, help="false-positive rate of the outlier test, per spectrum"),
    seed: int = typer.Option(0),
) -> None:
    """Diagnose an untrained attention stack and a planted-spike matrix: the product null vs the naive MP fit."""
    import torch

    import rankscope as rs
    from rankscope.spectra import laws

    try:
        d, H, dh = 768, 12, 64
        t0 = time.perf_counter()
        table = Table(title=f"Untrained attention, GPT-2-small shape (d={d}, {H} heads, dh={dh}): outliers "
                            f"by the structure-matched null (fpr={fpr}) and by the naive MP fit",
                      caption="spike = λ_max / bulk edge of the product null (max over heads)")
        for col in ("layer", "form", "rank", "product null", "naive MP", "stable rank", "spike"):
            table.add_column(col, justify="right")
        with console.status("simulating the nulls (cached after the first run)..."):
            for layer in range(layers):
                q, k = _init_heads(d, H, dh, seed + layer)
                prod = rs.diagnose_batch([q, k], fpr=fpr)
                naive = rs.diagnose_batch([q, k], null="mp")
                table.add_row(str(layer), "head (mean)", str(dh),
                              f"{sum(x.outliers for x in prod) / H:.2f}", f"{sum(x.outliers for x in naive) / H:.2f}",
                              f"{sum(x.stable_rank for x in prod) / H:.1f}",
                              f"{max(x.spike_strength for x in prod):.2f} (max)")
                Wq_all, Wk_all = q.mT.reshape(H * dh, d), k.reshape(H * dh, d)
                lay = rs.diagnose([Wq_all.T, Wk_all], fpr=fpr)  # the layer's form Σ_h B_h = Wqᵀ Wk
                lay_mp = rs.diagnose([Wq_all.T, Wk_all], null="mp")
                table.add_row("", "layer", str(lay.rank), str(lay.outliers), str(lay_mp.outliers),
                              f"{lay.stable_rank:.1f}", f"{lay.spike_strength:.2f}")
        console.print(table)

        g = torch.Generator().manual_seed(seed)
        n, m = 512, 1024
        q_ratio = n / m
        thetas = [2.0, 1.4, 0.5]
        U = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64)).Q
        W = U @ torch.diag(torch.tensor(thetas, dtype=torch.float64)) @ V.T
        W = W + torch.randn(n, m, generator=g, dtype=torch.float64) / math.sqrt(m)
        dg = rs.diagnose(W, fpr=fpr)
        spikes = Table(title=f"Planted spikes in a {n}×{m} noise matrix (BBP threshold θ = "
                             f"{laws.bbp_threshold(q_ratio):.3f})")
        for col in ("θ", "detectable", "predicted λ", "observed λ"):
            spikes.add_column(col, justify="right")
        for i, th in enumerate(thetas):
            above = th > laws.bbp_threshold(q_ratio)
            spikes.add_row(f"{th}", "yes" if above else "no",
                           f"{float(laws.bbp_outlier(th, q_ratio)):.4f}" if above else "(bulk)",
                           f"{float(dg.eigenvalues[i]):.4f}")
        console.print(spikes)
        console.print(f"found {dg.outliers} outliers above the bulk edge {dg.bulk_edge:.4f} "
                      f"(fitted σ² = {dg.scale:.4f}, KS = {dg.ks:.3f}, α = {dg.pl_alpha:.2f})")
        console.print(f"[dim]done in {time.perf_counter() - t0:.1f} s[/dim]")
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


FORMATS = ("table", "csv", "parquet", "json")


def _write_rows(df, out: Path, fmt: str) -> Path:
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


def _summary(df) -> Table:
    """Per layer: the worst head of each attention kind (most outliers, then spike strength); with
    --per-layer, the layer's own form."""
    from rankscope.analysis import ATTENTION_KINDS

    ok = df[df["error"].eq("") & df["kind"].isin(ATTENTION_KINDS)] if "outliers" in df else df.iloc[0:0]
    per_head = (ok["head"] >= 0).any()
    rows = ok[ok["head"] >= 0] if per_head else ok
    table = Table(title="Per layer: the spikiest head" if per_head else "Per layer: the layer's form")
    # beside the spikiest head, its layer's own form (when the layer rows are there)
    layer_form = {(r.layer, r.kind): f"{int(r.outliers)} of {int(r.rank)}" for r in ok[ok["head"] < 0].itertuples()}
    beside = per_head and bool(layer_form)
    for col in ("layer", "kind", "worst head" if per_head else "form", "outliers", "spike strength", "stable rank",
                *(["layer form outliers"] if beside else []), "KV floats/token"):
        table.add_column(col, justify="right")
    for (layer, kind), g in rows.groupby(["layer", "kind"], sort=True):
        w = g.sort_values(["outliers", "spike_strength"], ascending=False).iloc[0]
        kv = w["kv_cache_floats"]
        kv = "" if kv is None or kv != kv else str(int(kv))  # None or NaN: no KV cache for this row
        table.add_row(str(layer), kind, str(int(w["head"])) if per_head else "layer", str(int(w["outliers"])),
                      f"{w['spike_strength']:.2f}", f"{w['stable_rank']:.1f}",
                      *([layer_form.get((layer, kind), "")] if beside else []), kv)
    return table


@app.command()
def analyze(
    path: str = typer.Argument(..., help="HF model dir, .safetensors (or sharded index), .pt/.bin, or hub id"),
    per_head: bool = typer.Option(True, "--per-head/--per-layer", help="also diagnose every head, not only layers"),
    kinds: str = typer.Option("qk,ov,mlp,weights", help="comma-separated: qk, ov, mlp, weights"),
    null: str = typer.Option("product", help="product (structure-matched) | mp (naive fit) | tw"),
    fpr: float = typer.Option(0.01, help="false-positive rate of the outlier test, per spectrum"),
    out: Path | None = typer.Option(None, help="directory for the rows file and the ESD figure"),
    fmt: str = typer.Option("table", "--format", help="table | csv | parquet | json"),
    figure: bool = typer.Option(True, "--figure/--no-figure",
                                help="with --out, also draw esd.png: the spikiest head's and layer's spectra"),
) -> None:
    """Diagnose every attention head, layer and weight matrix of a checkpoint."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rankscope.analysis import analyze_full
    from rankscope.errors import CheckpointError

    if fmt not in FORMATS:
        console.print(f"[red]error:[/red] --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("analysing", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"analysing {what}")

            result = analyze_full(path, per_head=per_head, kinds=[k.strip() for k in kinds.split(",") if k.strip()],
                                  null=null, fpr=fpr, progress=progress)
    except (CheckpointError, InputError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    df = result.table
    if result.not_understood:
        console.print(f"[yellow]note:[/yellow] architecture not recognised; {len(result.not_understood)} weight names "
                      f"analysed as plain matrices: {', '.join(result.not_understood[:8])}"
                      + (" ..." if len(result.not_understood) > 8 else ""), soft_wrap=True)
    console.print(_summary(df))
    errors = df[df["error"].ne("")] if len(df) else df
    for _, row in errors.iterrows():
        console.print(f"[yellow]{row['name']}:[/yellow] {row['error']}", soft_wrap=True)
    if out is not None:
        if fmt != "table":
            console.print(f"rows: {_write_rows(df, out, fmt)}")
        drawn = _esd(result, out) if figure else None
        if drawn:
            console.print(f"figure: {drawn}")
    elif fmt != "table":
        console.print("[yellow]note:[/yellow] --format needs --out DIR; printed the summary only")
    console.print(f"[dim]{len(df)} rows ({result.architecture or 'unknown architecture'}) in "
                  f"{time.perf_counter() - t0:.1f} s[/dim]")


def _esd(result, out: Path) -> Path | None:
    """ESD figure of the spikiest head and the spikiest layer-level form."""
    from rankscope.report.figures import esd_figure

    df = result.table
    if "spike_strength" not in df or df["spike_strength"].isna().all():
        return None
    panels = []
    qk = df["kind"].eq("qk")
    for label, mask in (("head", qk & (df["head"] >= 0)), ("layer", qk & (df["head"] < 0))):
        sub = df[mask & df["spike_strength"].notna() & df.index.isin(list(result.diagnoses))]
        if len(sub):
            i = sub["spike_strength"].idxmax()
            panels.append((f"spikiest {label}: {df.loc[i, 'name']} ({df.loc[i, 'kind']})", result.diagnoses[i]))
    return esd_figure(panels, out / "esd.png") if panels else None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    preset: str = typer.Option("smoke", help="smoke (under a minute) | cpu (the CPU study, ~5 min) | paper (GPU)"),
    attention: str = typer.Option("mha", help="mha | gqa | mqa | mla_prerope | mla_decoupled"),
    run: Path | None = typer.Option(None, "--run", "--out",
                                    help="run directory (default runs/<preset>-<attention>); under torchrun use "
                                         "--out, which torchrun's own parser does not claim"),
    resume: bool = typer.Option(False, help="continue the newest checkpoint in --run"),
    every: int | None = typer.Option(None, help="diagnose the spectra every N steps (overrides the preset)"),
) -> None:
    """Train the decoder with one attention variant, diagnosing its spectra as it goes.

    Any config field can be set with --key value (e.g. --lr 1e-3 --n_layer 6 --rope_mode coupled).
    """
    from rankscope.errors import CheckpointError
    from rankscope.nn.config import summary_table
    from rankscope.train import resolve
    from rankscope.train import train as run_training
    from rankscope.train.config import parse_pairs

    try:
        overrides = {"attention": attention, **parse_pairs(ctx.args)}
        if every is not None:
            overrides["monitor_every"] = every
        cfg = resolve(preset, overrides)
        run_dir = run or Path("runs") / f"{preset}-{attention}"
        console.print(summary_table(cfg.model), highlight=False)
        result = run_training(cfg, run_dir, resume=resume)
    except (InputError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
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


@app.command()
def sql(
    run_dir: Path = typer.Argument(..., help="a run directory, or a study directory holding several runs"),
    query: str = typer.Argument(..., help='SQL over the views qk, weights, spectra, repr, train (quote "null")'),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
) -> None:
    """Query a run's diagnostics with DuckDB (works while the run is still training)."""
    from rankscope.store import RunStore

    if not run_dir.exists():
        console.print(f"[red]error:[/red] {run_dir}: no such run directory", soft_wrap=True)
        raise typer.Exit(2)
    try:
        frame = RunStore(run_dir).sql(query)
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def study(
    ctx: typer.Context,
    preset: str = typer.Option("cpu", help="smoke | cpu | paper"),
    seeds: int = typer.Option(3, help="seeds per variant (a verdict needs at least 3)"),
    variants: str = typer.Option(",".join(["mha", "mla_prerope_input", "mla_prerope_coupled", "mla_decoupled"]),
                                 help="comma-separated variants"),
    out: Path | None = typer.Option(None, help="study directory (default studies/<preset>)"),
    set_: list[str] = typer.Option([], "--set", help="key=value applied to every run (repeatable)"),
    sweep: str | None = typer.Option(None, help="a second axis, e.g. lr=5e-4,2e-3"),
    jobs: int = typer.Option(1, help="runs trained at once (processes of one thread each)"),
    open_: bool = typer.Option(False, "--open", help="open the report in a browser when done"),
) -> None:
    """Train MHA, MLA-PreRoPE (input and coupled) and MLA-Decoupled on the same data and seeds, then report."""
    import shlex
    import sys

    from rankscope.study import plan, run_study
    from rankscope.train.config import parse_pairs

    out = out or Path("studies") / preset
    try:
        overrides = dict(item.split("=", 1) for item in set_ if "=" in item)
        bad = [item for item in set_ if "=" not in item]
        if bad:
            raise InputError(f"--set {bad[0]!r}: expected key=value")
        overrides.update(parse_pairs(ctx.args))
        specs = plan(out, preset, seeds, [v.strip() for v in variants.split(",") if v.strip()], overrides, sweep)
        run_study(out, specs, jobs=jobs, command=shlex.join(["rankscope", *sys.argv[1:]]),
                  log=lambda line: console.print(line, highlight=False))
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    _render_report(out, open_)


def _print_verdict(root: Path) -> None:
    import json

    summary = json.loads((root / "summary.json").read_text())
    table = Table(title="Claims of Jha & Reagen (2507.09394), per null")
    for col in ("sweep", "null", "(i) early spikes", "(ii) with rank collapse", "(iii) only Decoupled prevents"):
        table.add_column(col)
    for point in summary["points"]:
        table.add_row(point["sweep"], point["null"], *[point["claims"][k]["verdict"] for k in ("i", "ii", "iii")])
    console.print(table)


@app.command()
def report(
    root: Path = typer.Argument(..., help="a study directory (study.json) or a run directory (config.json)"),
    open_: bool = typer.Option(False, "--open", help="open the report in a browser"),
) -> None:
    """Write report.html (figures embedded) and summary.json for a study or a single run."""
    _render_report(root, open_)


def _render_report(root: Path, open_: bool) -> None:
    """report.html and summary.json in ``root``, the verdict printed; bad input exits with code 2."""
    from rankscope.report.html import write_report

    try:
        with console.status("rendering the report..."):
            page = write_report(root)
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    _print_verdict(root)
    console.print(f"report: {page}")
    if open_:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())


def _load_npy(path: Path | None, what: str):
    """A .npy array (never pickled objects), or None; a missing or unreadable file is bad input."""
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path}: cannot be read as a .npy array ({exc})") from exc


@app.command("repr")
def repr_(
    features: Path = typer.Argument(..., help="FEATURES.npy: (N, D) representations"),
    labels: Path | None = typer.Option(None, help="LABELS.npy: (N,) integer classes"),
    logits: Path | None = typer.Option(None, help="LOGITS.npy: (N, C) classifier outputs"),
    weights: Path | None = typer.Option(None, help="W.npy: (C, D) classifier weights, [out, in]"),
) -> None:
    """Every representation-collapse metric the inputs allow, as a table."""
    from rankscope import representations as rr
    from rankscope.representations import _input

    try:
        H = _input.features(_load_npy(features, "features"), f"features {features}")
        y, L, W = _load_npy(labels, "labels"), _load_npy(logits, "logits"), _load_npy(weights, "weights")
        rows: list[tuple[str, float, str]] = [
            ("RankMe", rr.rankme(H), "higher = more dimensions used (Garrido et al. 2023)"),
            ("stable rank", rr.stable_rank(H), "‖H‖_F²/‖H‖₂²"),
        ]
        if H.shape[0] > 21:
            rows += [("TwoNN dimension", rr.twonn(H), "Facco et al. 2017"),
                     ("MLE dimension (k=20)", rr.mle_dimension(H, k=20), "Levina–Bickel, harmonic mean")]
        if y is not None:
            m = rr.class_moments(H, y)
            parts = rr.nc2(m)
            rows += [("NC1", rr.nc1(m), "Tr(Σ_W Σ_B⁺)/C; lower = more collapse"),
                     ("VCI", rr.vci(m), "Xu & Liu 2023; lower = more collapse"),
                     ("CDNV (mean)", rr.cdnv(m), "lower = more collapse"),
                     ("NC2 equinorm", parts.equinorm, "std/mean of class-mean norms"),
                     ("NC2 equiangularity", parts.equiangularity, "std of pairwise cosines"),
                     ("NC2 ETF distance", parts.etf_distance, "0 = simplex ETF"),
                     ("GNC2 variation", rr.gnc2(m).variation, "std of the log inverse-distance kernel")]
            if W is not None:
                d = rr.nc3(m, W=W)
                rows += [("NC3", d.distance, "‖W/‖W‖ − M/‖M‖‖_F²"), ("UNC3", d.unc3, "CoV of cos(w_c, μ_c − μ_G)")]
            if L is not None:
                pred = _input.features(L, f"logits {logits}").argmax(1)
                rows.append(("NC4 (logits vs nearest mean)", rr.ncc_disagreement(H, m, pred), "disagreement rate"))
            elif W is not None:
                rows.append(("NC4 (W, no bias)", rr.nc4(H, y, W), "disagreement rate"))
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    table = Table(title=f"Representations {features.name}: N={H.shape[0]}, D={H.shape[1]}")
    for col in ("metric", "value", "meaning"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name, value, note in rows:
        table.add_row(name, f"{value:.5g}", note)
    console.print(table)


# Commands that only read inputs and write closed files end with os._exit: the interpreter's teardown after
# importing torch takes 0.5–1 s here, longer than analysing a small model. Training commands exit normally.
FAST_EXIT_COMMANDS = ("analyze", "sql", "report")


def run() -> None:
    """The ``rankscope`` console script: ``app()``, then a fast exit for the read-only commands."""
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
