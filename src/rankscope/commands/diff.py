"""``rankscope diff BASE TUNED``: the table of what changed, and with ``--out`` the rows (Parquet) and a figure."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from rankscope.vocab import ATTENTION_KINDS, PRODUCT


def _num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.{digits}g}"


def _count(x, null: str = PRODUCT) -> str:
    """A spike count: "no fit" where the bulk of the change is not noise-shaped (NaN), "–" under a null that counts
    no spikes (its spikes are NaN by definition)."""
    if x is None or x != x:
        return "no fit" if null == PRODUCT else "–"
    return str(int(x))


def _short(name: str) -> str:
    """A matrix's last name component (``model.layers.3.self_attn.q_proj.weight`` → ``q_proj``)."""
    parts = [p for p in name.removesuffix(".weight").split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def matrices_table(df: pd.DataFrame) -> Table:
    """Per matrix and per layer form (head_index −1): the size and the spikes of the change, the change of the rank
    measures and the overlap of the top-k subspaces (with k/n, its value for random subspaces)."""
    rows = df[(df["head_index"] < 0) & df["error"].eq("")]
    rows = rows.sort_values(["stack", "layer", "kind", "name"], kind="stable")
    stacks = rows["stack"].ne("").any()
    table = Table(title="What changed, per matrix and layer form (ΔW = W_tuned − W_base)")
    for col in (*(["stack"] if stacks else []), "layer", "matrix", "‖ΔW‖/‖W‖", "ΔW spikes / outliers", "Δ spikes",
                "Δ stable rank", "Δ eff. rank", "overlap (k, random)"):
        table.add_column(col, justify="left" if col == "matrix" else "right")
    for r in rows.itertuples():
        what = f"{r.kind} form" if r.kind in ATTENTION_KINDS else _short(r.name)
        overlap = "–" if not r.overlap_k else \
            f"{_num(r.overlap_left, 2)} ({int(r.overlap_k)}, {_num(r.overlap_random_left, 1)})"
        table.add_row(*([r.stack] if stacks else []), str(r.layer) if r.layer >= 0 else "", what,
                      _num(r.dw_relative_norm, 2),
                      "no change" if not r.changed else "not counted" if r.dw_note else
                      f"{_count(r.dw_spikes, r.null)} / {_count(r.dw_outliers, PRODUCT)}",
                      _num(r.spikes_change, 2),
                      _num(r.stable_rank_change, 2), _num(r.effective_rank_change, 2), overlap)
    table.caption = ("ΔW spikes: directions of the change above its noise bulk (the null of rankscope.diagnose; "
                     "\"no fit\": the bulk is not noise-shaped, so no count); outliers: above the whole spectrum's "
                     "null edge; Δ: tuned − base; overlap ‖U_bᵀU_t‖²/k of the top-k left singular subspaces, k = the "
                     "base's outliers, and its value k/n for random subspaces")
    return table


def heads_table(df: pd.DataFrame) -> Table | None:
    """Per layer and attention kind: how many heads' form changes carry spikes, the most in one head, how many have
    no count because their bulk is not noise-shaped ("no fit") or their null is not known ("not counted")."""
    heads = df[(df["head_index"] >= 0) & df["error"].eq("")]
    if heads.empty:
        return None
    stacks = heads["stack"].ne("").any()
    table = Table(title="Per-head form changes ΔB_h = B_h(tuned) − B_h(base)")
    for col in (*(["stack"] if stacks else []), "layer", "kind", "heads", "with spikes", "most spikes", "no fit",
                "not counted", "mean ‖ΔB‖/‖B‖"):
        table.add_column(col, justify="right")
    for (stack, layer, kind, null), g in heads.groupby(["stack", "layer", "kind", "null"], sort=True):
        spikes = g["dw_spikes"].where(g["changed"].astype(bool), 0.0)
        untested = g["dw_note"].ne("")
        top = spikes.fillna(-1).idxmax()
        most = f"{_count(spikes[top], null)} (head {int(g.loc[top, 'head_index'])})" if spikes[top] > 0 else "–"
        table.add_row(*([stack] if stacks else []), str(layer), kind, str(len(g)), str(int((spikes > 0).sum())), most,
                      str(int((spikes.isna() & ~untested).sum())), str(int(untested.sum())),
                      _num(g["dw_relative_norm"].mean(), 2))
    return table


def figure(df: pd.DataFrame, path: Path) -> Path:
    """Two heatmaps, matrix (or form) × layer: the spikes of the change ΔW (head mean for the per-head forms; grey:
    the change's bulk is not noise-shaped), and the top-k subspace overlap (grey: the base has no outlier, no
    top subspace), each cell written out (the overlap with its random reference k/n); PNG."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: PNG through Agg, no GUI backend, no global figure registry

    ok = df[df["error"].eq("") & (df["layer"] >= 0)].copy()
    ok["series"] = [(f"{st} " if st else "") + (f"{k} heads (mean)" if h >= 0 else
                                                (f"{k} form" if k in ATTENTION_KINDS else _short(n)))
                    for n, st, k, h in zip(ok["name"], ok["stack"], ok["kind"], ok["head_index"], strict=True)]
    ok["spikes"] = ok["dw_spikes"].where(ok["changed"].astype(bool), 0.0)
    panels = [("spikes", "spikes of the change ΔW (above its noise bulk)", "magma"),
              ("overlap_left", "top-k subspace overlap ‖U_bᵀU_t‖²/k (random: k/n)", "viridis")]
    grids = [ok.pivot_table(index="series", columns="layer", values=col, aggfunc="mean", dropna=False)
             for col, _, _ in panels]
    random = ok.pivot_table(index="series", columns="layer", values="overlap_random_left", aggfunc="mean",
                            dropna=False).reindex_like(grids[1])
    rows, cols = grids[0].shape
    fig = Figure(figsize=(min(4 + 0.5 * cols, 20) * 2, 1.2 + 0.3 * rows))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (col, title, cmap), grid in zip(axes, panels, grids, strict=True):
        values = np.ma.masked_invalid(grid.to_numpy(float))
        limits = (0.0, 1.0) if col == "overlap_left" else (0.0, max(float(values.max() or 0), 1.0))
        image = ax.imshow(values, aspect="auto", cmap=matplotlib.colormaps[cmap].with_extremes(bad="lightgrey"),
                          vmin=limits[0], vmax=limits[1], interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        if cols <= 40:  # write the values out where they fit
            for (i, j), v in np.ndenumerate(grid.to_numpy(float)):
                if v == v:
                    text = f"{v:.2g}" if col == "overlap_left" else f"{v:.3g}"
                    if col == "overlap_left":
                        text += f"\n({random.iat[i, j]:.2g})"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6,
                            color="w" if v < 0.5 * limits[1] else "k")
        ax.set_xticks(range(cols), [str(c) for c in grid.columns], fontsize=7)
        ax.set_yticks(range(rows), list(grid.index), fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def diff(console: Console, base: str, tuned: str, *, per_head: bool, kinds: list[str] | None, null: str, fpr: float,
         k: int | None, out: Path | None, threads: int) -> pd.DataFrame:
    """Compare, print the tables and errors; with ``out``, write ``diff.parquet`` and ``diff.png``."""
    import time

    from rankscope.analysis.diff import diff as compare
    from rankscope.commands.progress import progress_bar
    t0 = time.perf_counter()
    with progress_bar(console, "comparing", "comparing") as progress:
        df = compare(base, tuned, per_head=per_head, kinds=kinds, null=null, fpr=fpr, k=k,
                     threads=threads, progress=progress)
    for note in df.attrs.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    shown = df[df["null"] == null] if "null" in df else df
    console.print(matrices_table(shown))
    heads = heads_table(shown)
    if heads is not None:
        console.print(heads)
    for _, row in df[df["error"].ne("")].iterrows():
        console.print(f"[yellow]{row['name']}:[/yellow] {row['error']}", soft_wrap=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / "diff.parquet", index=False)
        console.print(f"rows: {out / 'diff.parquet'}")
        console.print(f"figure: {figure(shown, out / 'diff.png')}")
    changed = int(df["changed"].fillna(True).sum()) if "changed" in df else 0
    console.print(f"[dim]{len(df)} rows, {changed} changed{' (null ' + null + ')' if null != PRODUCT else ''}, in "
                  f"{time.perf_counter() - t0:.1f} s[/dim]")
    return df
