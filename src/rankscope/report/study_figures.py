"""The figures of a study or a run (matplotlib, PNG): one function per figure.

Colours are fixed per variant across every figure, and each metric has one colour scale across all variants
(so rows can be compared). Step axes are the real steps on a symlog scale (the dense early monitoring stays
visible) with the same ticks in every panel. Figures are drawn on ``matplotlib.figure.Figure`` objects
directly: no pyplot, so no GUI backend is chosen and no global figure registry is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.data import StudyData
from rankscope.vocab import (
    GQA,
    MHA,
    MHA_DECOUPLED,
    MLA_DECOUPLED,
    MLA_PREROPE,
    MLA_PREROPE_COUPLED,
    MLA_PREROPE_INPUT,
    MP,
    MQA,
    PRODUCT,
    QK,
)

COLORS = {MHA: "tab:red", GQA: "tab:green", MLA_PREROPE_INPUT: "tab:orange", MLA_PREROPE_COUPLED: "tab:purple",
          MHA_DECOUPLED: "tab:cyan", MLA_DECOUPLED: "tab:blue", MQA: "tab:olive", MLA_PREROPE: "tab:orange"}
ORDER = [MHA, GQA, MLA_PREROPE_INPUT, MLA_PREROPE_COUPLED, MHA_DECOUPLED, MLA_DECOUPLED, MQA]
NULL_LABEL = {PRODUCT: "product null", MP: "naive MP"}
# (column of the layer series, panel title, colour map, fixed colour range or None for the data's range)
SERIES_PANELS = [("spikes", "spikes per head", "magma", None),
                 ("erank_vs_null", "effective rank ÷ null's", "cividis", None),
                 ("top_energy_vs_null", "top-10 % energy ÷ null's", "viridis", None),
                 ("spiked", "share of seeds spiked", "Greys", (0.0, 1.0))]


def _figure(rows: int = 1, cols: int = 1, **kwargs):
    """(figure, axes as a rows × cols array), without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", (6, 3.5)))
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def _variants(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["variant"]))
    return sorted(present, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


def _step_ticks(total: int) -> list[int]:
    """0, 5, 10, 100, … and the last step: the same ticks on every step axis of a figure (symlog: 0–10 linear)."""
    ticks = [0, 5] + [10**k for k in range(1, int(np.log10(max(total, 1))) + 1)]
    return sorted({t for t in ticks if t < total * 0.7} | {total})


def _step_axis(ax, total: int) -> None:
    ax.set_xscale("symlog", linthresh=10, linscale=0.6)
    ticks = _step_ticks(total)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_xlim(0, total)


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (midpoints; the ends extended by half a gap)."""
    v = np.asarray(values, float)
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[max(v[0] - (mid[0] - v[0]), 0)], mid, [v[-1] + (v[-1] - mid[-1])]])


def _norms(frame: pd.DataFrame, panels) -> dict:
    """One colour range per metric across every variant (finite values; fixed ranges where given)."""
    out = {}
    for col, _, _, fixed in panels:
        if fixed is not None:
            out[col] = fixed
            continue
        v = frame[col].to_numpy(float)
        v = v[np.isfinite(v)]
        out[col] = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    return out


def _mesh(ax, grid: pd.DataFrame, cmap: str, limits: tuple[float, float]):
    import matplotlib

    colors = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")  # NaN (no count): grey
    values = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    lo, hi = limits
    return ax.pcolormesh(_edges(grid.columns.to_numpy()), _edges(grid.index.to_numpy()), values, cmap=colors,
                         vmin=lo, vmax=hi if hi > lo else lo + 1e-9, shading="flat")


def layer_heatmaps(series: pd.DataFrame, sweep: str, out: Path, total: int,
                   name: str = "layer_heatmaps") -> Path | None:
    """Per variant (rows), layer × step of the per-head forms (Δ-weighted, head mean, then mean over seeds):
    spikes, effective rank ÷ null's, top-10 % energy ÷ null's, and the share of seeds with the layer spiked."""
    frame = series[series["sweep"] == sweep].assign(spiked=lambda d: d["spiked"].astype(float))
    if frame.empty:  # no per-head forms were monitored (per_head=False)
        return None
    variants = _variants(frame)
    limits = _norms(frame, SERIES_PANELS)
    fig, axes = _figure(len(variants), len(SERIES_PANELS), figsize=(3.3 * len(SERIES_PANELS), 1.9 * len(variants)
                                                                   + 0.8), sharex=True, sharey=True)
    images = {}
    for i, variant in enumerate(variants):
        mine = frame[frame["variant"] == variant]
        for j, (col, title, cmap, _) in enumerate(SERIES_PANELS):
            grid = mine.pivot_table(index="layer", columns="step", values=col, aggfunc="mean", dropna=False)
            ax = axes[i, j]
            images[col] = _mesh(ax, grid, cmap, limits[col])
            _step_axis(ax, total)
            layers = sorted(frame["layer"].unique())
            ax.set_yticks(layers, [str(v) for v in layers], fontsize=7)
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{variant}\nlayer", fontsize=8)
            if i == len(variants) - 1:
                ax.set_xlabel("step", fontsize=8)
    for j, (col, *_rest) in enumerate(SERIES_PANELS):  # one colour bar per metric, shared by its column
        fig.colorbar(images[col], ax=list(axes[:, j]), fraction=0.05, pad=0.02, location="top")
    return _save(fig, out / f"{name}.png")


def _by_key(table: dict, keys: list[int]) -> list[dict]:
    """The entries of a summary dict at integer ``keys`` (JSON turns the keys into strings)."""
    return [table.get(k, table.get(str(k), {})) for k in keys]


def _interval_bars(ax, x, intervals: list[dict], **style) -> None:
    """Means with t-interval error bars from ``{"mean", "low", "high"}`` dicts (None: not drawn)."""
    def column(key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in intervals], float)

    mean, lo, hi = column("mean"), column("low"), column("high")
    ax.errorbar(x, mean, yerr=[np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)], fmt="o-", capsize=2,
                lw=1, **style)


def onsets(point: dict, out: Path) -> Path | None:
    """Spike onset per layer, per variant: the mean over seeds with its t-interval (censored at 1 = no onset)."""
    data = point.get("onsets") or {}
    if not data:
        return None
    fig, axes = _figure(figsize=(7.5, 3.6))
    ax = axes[0, 0]
    variants = sorted(data, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER))
    for k, variant in enumerate(variants):
        layers = sorted(int(x) for x in data[variant])
        x = np.asarray(layers, float) + (k - (len(variants) - 1) / 2) * 0.08
        _interval_bars(ax, x, _by_key(data[variant], layers), ms=4, color=COLORS.get(variant), label=variant)
    ax.set_yscale("log")
    every_layer = sorted({int(x) for v in data.values() for x in v})
    ax.set_xticks(every_layer, [str(x) for x in every_layer])
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_ylim(None, 1.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("spike onset (fraction of training)\nmean over seeds, 95 % t-interval")
    ax.set_title("When each layer's heads start to carry spikes (1 = not before the end)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "onsets.png")


def offsets(point: dict, out: Path) -> Path | None:
    """The final rank-fair quantities per relative offset Δ, per variant (mean and t-interval over seeds)."""
    data = point.get("per_offset") or {}
    if not data:
        return None
    metrics = [("spikes", "spikes per head"), ("erank_vs_null", "effective rank ÷ null's"),
               ("top_energy_vs_null", "top-10 % energy ÷ null's")]
    fig, axes = _figure(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    variants = sorted(data, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER))
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for k, variant in enumerate(variants):
            deltas = sorted((int(d) for d in data[variant]), key=abs)
            x = np.abs(deltas).astype(float)
            x = x * (1 + 0.04 * (k - len(variants) / 2)) + 0.04 * (k - len(variants) / 2)  # side by side
            _interval_bars(ax, x, [r.get(metric, {}) for r in _by_key(data[variant], deltas)], ms=3,
                           color=COLORS.get(variant), label=variant)
        from matplotlib.ticker import NullLocator

        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ticks = sorted({abs(int(d)) for v in data.values() for d in v})
        ax.set_xticks(ticks, [("0" if t == 0 else f"−{t}") for t in ticks], fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("relative offset Δ = key − query position")
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-head query–key forms at the last step, by offset (RoPE makes the form depend on Δ)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, out / "offsets.png")


def carried(point: dict, out: Path) -> Path | None:
    """Claim (ii): the drop of effective rank, and the drop left in the bulk once the spikes are removed."""
    per_run = pd.DataFrame(point.get("per_run") or [])
    if per_run.empty or "erank_drop" not in per_run:
        return None
    variants = _variants(per_run)
    fig, axes = _figure(figsize=(7.5, 3.3))
    ax = axes[0, 0]
    width = 0.38
    for k, variant in enumerate(variants):
        mine = per_run[per_run["variant"] == variant]
        for off, col, hatch in ((-width / 2, "erank_drop", None), (width / 2, "bulk_drop", "//")):
            v = mine[col].to_numpy(float)
            v = v[np.isfinite(v)]
            if not v.size:
                continue
            ax.bar(k + off, v.mean(), width, color=COLORS.get(variant), hatch=hatch, alpha=0.85 if hatch is None
                   else 0.45, edgecolor="k", lw=0.5)
            ax.plot(np.full(v.size, k + off), v, "k.", ms=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(variants)), variants, fontsize=7, rotation=15)
    ax.set_ylabel("relative drop since step 0")
    ax.set_title("Effective-rank drop (solid) and the bulk's drop without the spikes (hatched); dots: seeds",
                 fontsize=9)
    return _save(fig, out / "carried.png")


def head_maps(data: StudyData, sweep: str, out: Path) -> Path | None:
    """Per variant, spikes per (layer, head) at offset 0 at an early, a middle and the final monitored step."""
    rows = data.attention
    frame = rows[(rows["sweep"] == sweep) & (rows["kind"] == QK) & (rows["head_index"] >= 0)
                 & (rows["null"] == PRODUCT)]
    frame = frame[frame["offset"] == 0]
    if frame.empty:
        return None
    variants = _variants(frame)
    steps = sorted(s for s in frame["step"].unique() if s > 0)
    picks = sorted({steps[min(len(steps) - 1, 10)], steps[len(steps) // 2], steps[-1]}) if steps else []
    fig, axes = _figure(len(variants), max(1, len(picks)), figsize=(2.8 * len(picks), 1.9 * len(variants) + 0.6),
                        sharey=True)
    finite = frame["spikes"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    vmax = float(finite.max()) if finite.size else 1.0
    image = None
    for i, variant in enumerate(variants):
        for j, step in enumerate(picks):
            sub = frame[(frame["variant"] == variant) & (frame["step"] == step)]
            grid = sub.pivot_table(index="layer", columns="head_index", values="spikes", aggfunc="mean", dropna=False)
            ax = axes[i, j]
            image = _mesh(ax, grid, "magma", (0.0, vmax))
            ax.set_xticks(grid.columns.to_numpy(), [str(h) for h in grid.columns], fontsize=7)
            ax.set_title(f"step {step}" if i == 0 else "", fontsize=9)
            ax.set_xlabel("head" if i == len(variants) - 1 else "", fontsize=8)
            ax.set_ylabel(f"{variant}\nlayer" if j == 0 else "", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.03, pad=0.02, label="spikes (mean over seeds)")
    return _save(fig, out / "head_maps.png")


def layer_forms(data: StudyData, sweep: str, out: Path, total: int) -> Path | None:
    """Secondary view: the layer-level forms (sum over heads, offset 0): outliers under both nulls and spikes,
    one colour scale for all three and all variants (the panels of the nulls the rows have)."""
    rows = data.attention
    frame = rows[(rows["sweep"] == sweep) & (rows["kind"] == QK) & (rows["head_index"] < 0)]
    variants = _variants(frame)
    panels = [("outliers", PRODUCT, "outliers — product null"), ("spikes", PRODUCT, "spikes (grey: bulk not noise)"),
              ("outliers", MP, "outliers — naive MP")]
    panels = [p for p in panels if (frame["null"] == p[1]).any()]  # e.g. a checkpoint series of one null
    if not panels:
        return None
    values = np.concatenate([frame["outliers"].to_numpy(float), frame["spikes"].to_numpy(float)])
    values = values[np.isfinite(values)]
    limits = (0.0, float(values.max()) if values.size else 1.0)
    fig, axes = _figure(len(variants), len(panels), figsize=(3.4 * len(panels), 1.9 * len(variants) + 0.8),
                        sharex=True, sharey=True)
    image = None
    for i, variant in enumerate(variants):
        for j, (col, null, title) in enumerate(panels):
            sub = frame[(frame["variant"] == variant) & (frame["null"] == null)]
            grid = sub.pivot_table(index="layer", columns="step", values=col, aggfunc="mean", dropna=False)
            ax = axes[i, j]
            image = _mesh(ax, grid, "magma", limits)
            _step_axis(ax, total)
            ax.set_title(title if i == 0 else "", fontsize=9)
            ax.set_ylabel(f"{variant}\nlayer" if j == 0 else "", fontsize=8)
            ax.set_xlabel("step" if i == len(variants) - 1 else "", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.03, pad=0.02, label="count (mean over seeds)")
    return _save(fig, out / "layer_forms.png")


def esd_steps(data: StudyData, sweep: str, out: Path) -> Path | None:
    """Eigenvalue histogram of the spikiest per-head form (offset 0) at three steps, with the fitted null."""
    rows = data.attention
    frame = rows[(rows["sweep"] == sweep) & (rows["kind"] == QK) & (rows["head_index"] >= 0)
                 & (rows["null"] == PRODUCT)]
    frame = frame[frame["offset"] == 0]
    frame = frame[frame["step"] == frame["step"].max()]
    if frame.empty or not np.isfinite(frame["spike_strength"]).any():
        return None
    top = frame.loc[frame["spike_strength"].replace(np.inf, np.nan).idxmax()]
    where = (f"layer = {int(top['layer'])} and head_index = {int(top['head_index'])} and kind = '{QK}' and \"null\" = "
             f"'{PRODUCT}' and coalesce(\"offset\", 0) = 0")
    spectra = data.spectra(top["name"], sweep, where)
    steps = sorted(spectra["step"].unique())
    picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    fig, axes = _figure(1, len(picks), figsize=(4.0 * len(picks), 3.0))
    for ax, step in zip(axes[0], picks, strict=True):
        row = spectra[spectra["step"] == step].iloc[0]
        lam = np.asarray(row["eigenvalues"], float)
        lam = lam[lam > 0]
        edge = float(row["bulk_edge"])
        bins = np.geomspace(min(lam.min(), edge) * 0.9, max(lam.max(), edge) * 1.1, 30)
        ax.hist(lam[lam <= edge], bins=bins, color=COLORS.get(top["variant"], "tab:gray"), alpha=0.8, label="bulk")
        ax.hist(lam[lam > edge], bins=bins, color="k", alpha=0.9, label=f"outliers ({int((lam > edge).sum())})")
        if row["null_quantiles"] is not None:
            q = np.asarray(row["null_quantiles"], float)
            ax.hist(q, bins=bins, weights=np.full(q.size, lam.size / q.size), histtype="step", color="k", lw=1.2,
                    label="fitted product null")
        ax.axvline(edge, color="k", ls="--", lw=1, label="bulk edge")
        ax.set_xscale("log")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xlabel("eigenvalue of B Bᵀ")
        ax.legend(fontsize=7)
    fig.suptitle(f"ESD of the spikiest head at the end: {top['name']} layer {int(top['layer'])} head "
                 f"{int(top['head_index'])}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, out / "esd_steps.png")


def loss_curves(data: StudyData, sweep: str, out: Path) -> Path | None:
    """Validation loss per variant: the mean over seeds, with the min–max band."""
    tr = data.train
    if tr.empty or "val_loss" not in tr:
        return None
    tr = tr[(tr["sweep"] == sweep) & tr["val_loss"].notna()]
    if tr.empty:
        return None
    fig, axes = _figure(figsize=(6, 3.3))
    ax = axes[0, 0]
    for variant in _variants(tr):
        grid = tr[tr["variant"] == variant].pivot_table(index="step", columns="seed", values="val_loss")
        ax.plot(grid.index, grid.mean(axis=1), color=COLORS.get(variant), label=variant)
        ax.fill_between(grid.index, grid.min(axis=1), grid.max(axis=1), color=COLORS.get(variant), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)
    ax.set_title("Validation loss (band: min–max over seeds)", fontsize=10)
    return _save(fig, out / "loss.png")


def sweep_summary(per_run: pd.DataFrame, out: Path) -> Path | None:
    """Final spikes per head and effective rank ÷ null's per variant at each sweep value (mean ± sd)."""
    if per_run.empty or per_run["sweep"].nunique() < 2:
        return None
    metrics = [("spikes", "spikes per head"), ("erank_vs_null", "effective rank ÷ null's")]
    fig, axes = _figure(1, len(metrics), figsize=(10, 3.3))
    points = sorted(per_run["sweep"].unique())
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for variant in _variants(per_run):
            g = per_run[per_run["variant"] == variant].groupby("sweep")[metric]
            ax.errorbar(range(len(points)), g.mean().reindex(points), yerr=g.std().reindex(points).fillna(0),
                        marker="o", capsize=3, color=COLORS.get(variant), label=variant)
        ax.set_xticks(range(len(points)), points)
        ax.set_title(title + " at the last step (mean ± sd over seeds)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "sweep.png")
