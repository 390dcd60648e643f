"""The figures of a study (matplotlib, PNG): one function per figure, each reading ``StudyData`` only.

Colours are fixed per variant across every figure. Heatmaps average over seeds. Figures are drawn on
``matplotlib.figure.Figure`` objects directly: no pyplot, so no GUI backend is chosen and no global figure
registry is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.data import StudyData
from rankscope.vocab import (
    GQA,
    MHA,
    MLA_DECOUPLED,
    MLA_PREROPE,
    MLA_PREROPE_COUPLED,
    MLA_PREROPE_INPUT,
    MONITOR_NULLS,
    MP,
    MQA,
    PRODUCT,
    QK,
    QK_CONTENT,
    QK_ROPE,
)

COLORS = {MHA: "tab:red", MLA_PREROPE_INPUT: "tab:orange", MLA_PREROPE_COUPLED: "tab:purple",
          MLA_DECOUPLED: "tab:blue", GQA: "tab:green", MQA: "tab:olive", MLA_PREROPE: "tab:orange"}
ORDER = [MHA, MLA_PREROPE_INPUT, MLA_PREROPE_COUPLED, MLA_DECOUPLED, GQA, MQA]
NULL_LABEL = {PRODUCT: "product null", MP: "naive MP"}


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
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def _layers(data: StudyData, sweep: str, kind: str = QK) -> pd.DataFrame:
    rows = data.attention
    return rows[(rows["sweep"] == sweep) & (rows["kind"] == kind) & (rows["head"] < 0)]


def _grid(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """layer × step mean over seeds."""
    return frame.pivot_table(index="layer", columns="step", values=value, aggfunc="mean", dropna=False)


def _heat(ax, grid: pd.DataFrame, title: str, cmap: str = "viridis", log: bool = False, vmax=None):
    import matplotlib
    from matplotlib.colors import LogNorm

    values = np.ma.masked_invalid(grid.to_numpy(dtype=float))  # NaN cells (no count): drawn grey
    colors = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    finite = values.compressed()
    top = finite.max() if finite.size else 1.0
    norm = LogNorm(vmin=max(finite.min(), 1e-2), vmax=top) if log and finite.size and top > 0 else None
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=colors, norm=norm,
                   vmin=None if norm else 0, vmax=None if norm else vmax, interpolation="nearest")
    steps = list(grid.columns)
    ticks = np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int)
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    ax.set_yticks(range(len(grid.index)), [str(v) for v in grid.index], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def heatmaps(data: StudyData, sweep: str, out: Path) -> Path:
    """Per variant, layer × step: outliers under both nulls, spikes, spike strength, stable and effective rank."""
    frame = _layers(data, sweep)
    variants = _variants(frame)
    cols = [("outliers", PRODUCT, "outliers — product null", "magma", False),
            ("spikes", PRODUCT, "spikes (grey: bulk not noise)", "magma", False),
            ("outliers", MP, "outliers — naive MP", "magma", False),
            ("spike_strength", PRODUCT, "spike strength λmax/edge", "viridis", True),
            ("stable_rank", PRODUCT, "stable rank", "cividis", False),
            ("effective_rank", PRODUCT, "effective rank", "cividis", False)]
    vmax_out = frame["outliers"].max()
    fig, axes = _figure(len(variants), len(cols), figsize=(3.2 * len(cols), 2.3 * len(variants)))
    for i, variant in enumerate(variants):
        mine = frame[frame["variant"] == variant]
        for j, (value, null, title, cmap, log) in enumerate(cols):
            sub = mine[mine["null"] == null]
            _heat(axes[i, j], _grid(sub, value), title, cmap, log,
                  vmax=vmax_out if value in ("outliers", "spikes") else None)
            axes[i, j].set_ylabel(f"{variant}\nlayer" if j == 0 else "", fontsize=9)
            axes[i, j].set_xlabel("step" if i == len(variants) - 1 else "")
    fig.suptitle("Layer-level query–key forms through training (mean over seeds)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "heatmaps.png")


def head_maps(data: StudyData, sweep: str, out: Path) -> Path:
    """Per variant, outliers per (layer, head) at an early, a middle and the final monitored step."""
    rows = data.attention
    frame = rows[(rows["sweep"] == sweep) & (rows["kind"] == QK) & (rows["head"] >= 0) & (rows["null"] == PRODUCT)]
    variants = _variants(frame)
    steps = sorted(s for s in frame["step"].unique() if s > 0)
    picks = [steps[0], steps[len(steps) // 2], steps[-1]] if steps else []
    fig, axes = _figure(len(variants), max(1, len(picks)), figsize=(3.2 * len(picks), 2.3 * len(variants)))
    vmax = frame["outliers"].max()
    for i, variant in enumerate(variants):
        for j, step in enumerate(picks):
            sub = frame[(frame["variant"] == variant) & (frame["step"] == step)]
            grid = sub.pivot_table(index="layer", columns="head", values="outliers", aggfunc="mean")
            ax = axes[i, j]
            im = ax.imshow(grid.to_numpy(float), origin="lower", cmap="magma", vmin=0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(grid.columns)), [str(h) for h in grid.columns], fontsize=7)
            ax.set_yticks(range(len(grid.index)), [str(v) for v in grid.index], fontsize=7)
            ax.set_title(f"step {step}", fontsize=9)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel(f"{variant}\nlayer" if j == 0 else "", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle("Outliers per head (product null, mean over seeds)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "head_maps.png")


def decoupled_blocks(data: StudyData, sweep: str, out: Path) -> Path | None:
    """MLA-Decoupled: the content block and the shared rope block of the query–key form, side by side."""
    rows = data.attention
    frame = rows[(rows["sweep"] == sweep) & (rows["variant"] == MLA_DECOUPLED) & (rows["head"] < 0)
                 & (rows["null"] == PRODUCT)]
    if frame.empty:
        return None
    fig, axes = _figure(1, 4, figsize=(15, 3.3))
    vmax = frame["outliers"].max()
    for j, (kind, value, log) in enumerate([(QK_CONTENT, "outliers", False), (QK_ROPE, "outliers", False),
                                            (QK_CONTENT, "spike_strength", True),
                                            (QK_ROPE, "spike_strength", True)]):
        sub = frame[frame["kind"] == kind]
        _heat(axes[0, j], _grid(sub, value), f"{kind}: {value}", "magma" if value == "outliers" else "viridis",
              log, vmax=vmax if value == "outliers" else None)
        axes[0, j].set_xlabel("step")
    axes[0, 0].set_ylabel("layer")
    fig.suptitle("MLA-Decoupled: content block vs shared rope block (product null)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, out / "decoupled_blocks.png")


def esd_steps(data: StudyData, sweep: str, out: Path) -> Path | None:
    """Eigenvalue histogram of the spikiest layer-level form at three steps, with the fitted null and edge."""
    frame = _layers(data, sweep)
    frame = frame[(frame["null"] == PRODUCT) & (frame["step"] == frame["step"].max())]
    if frame.empty:
        return None
    top = frame.loc[frame["spike_strength"].idxmax()]
    spectra = data.spectra(top["name"], sweep, f"layer = {int(top['layer'])} and head = -1 and kind = '{QK}' "
                                                 f"and \"null\" = '{PRODUCT}'")
    steps = sorted(spectra["step"].unique())
    picks = sorted({steps[0], steps[len(steps) // 4], steps[-1]})
    fig, axes = _figure(1, len(picks), figsize=(4.3 * len(picks), 3.2))
    for ax, step in zip(axes[0], picks, strict=True):
        row = spectra[spectra["step"] == step].iloc[0]
        lam = np.asarray(row["eigenvalues"], float)
        lam = lam[lam > 0]
        edge = float(row["bulk_edge"])
        bins = np.geomspace(min(lam.min(), edge) * 0.9, max(lam.max(), edge) * 1.1, 40)
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
    fig.suptitle(f"ESD of the spikiest layer: {top['name']} ({top['variant']}), layer {int(top['layer'])}, qk",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, out / "esd_steps.png")


def spike_onset(data: StudyData, sweep: str, out: Path) -> Path:
    """First step each layer crosses the bulk edge, against layer index (does the spike propagate?)."""
    frame = _layers(data, sweep)
    frame = frame[frame["step"] > 0]
    fig, axes = _figure(1, 2, figsize=(10, 3.3), sharey=True)
    total = int(data.runs["steps"].max())
    for ax, null in zip(axes[0], MONITOR_NULLS, strict=True):
        sub = frame[frame["null"] == null]
        for k, variant in enumerate(_variants(sub)):
            mine = sub[sub["variant"] == variant]
            first = (mine[mine["outliers"] > 0].groupby(["seed", "layer"])["step"].min()
                     .unstack("layer").reindex(columns=sorted(mine["layer"].unique())))
            first = first.reindex(sorted(mine["seed"].unique())).fillna(np.inf)
            med = np.median(first.to_numpy(), axis=0)
            x = np.asarray(first.columns, float) + (k - 1.5) * 0.06
            shown = np.where(np.isfinite(med), med, np.nan)
            ax.plot(x, shown, "o-", color=COLORS.get(variant), label=variant)
            lo, hi = first.min().to_numpy(), first.max().to_numpy()
            hi = np.where(np.isfinite(hi), hi, total)
            ax.vlines(x, np.where(np.isfinite(lo), lo, np.nan), hi, color=COLORS.get(variant), alpha=0.4)
        ax.set_title(f"{NULL_LABEL[null]}: first step with an outlier", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(sub["layer"].unique()))
        ax.set_ylabel("step (median over seeds; bars: min–max)")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "spike_onset.png")


def rank_vs_outliers(data: StudyData, sweep: str, out: Path) -> Path:
    """Effective rank (÷ rank) against outlier energy, one dot per (run, layer, step), coloured by variant."""
    frame = _layers(data, sweep)
    fig, axes = _figure(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, null in zip(axes[0], MONITOR_NULLS, strict=True):
        sub = frame[(frame["null"] == null) & (frame["step"] > 0)]
        for variant in _variants(sub):
            mine = sub[sub["variant"] == variant]
            ax.scatter(mine["outlier_energy"], mine["effective_rank"] / mine["rank"], s=8, alpha=0.5,
                       color=COLORS.get(variant), label=variant)
        ax.set_xlabel(f"outlier energy ({NULL_LABEL[null]})")
        ax.set_title("rank collapse vs outliers", fontsize=9)
    axes[0, 0].set_ylabel("effective rank / rank")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "rank_vs_outliers.png")


def loss_curves(data: StudyData, sweep: str, out: Path) -> Path | None:
    """Validation loss per variant: the mean over seeds, with the min–max band."""
    tr = data.train
    if tr.empty or "val_loss" not in tr:
        return None
    tr = tr[(tr["sweep"] == sweep) & tr["val_loss"].notna()]
    fig, axes = _figure(figsize=(6, 3.5))
    ax = axes[0, 0]
    for variant in _variants(tr):
        grid = tr[tr["variant"] == variant].pivot_table(index="step", columns="seed", values="val_loss")
        ax.plot(grid.index, grid.mean(axis=1), color=COLORS.get(variant), label=variant)
        ax.fill_between(grid.index, grid.min(axis=1), grid.max(axis=1), color=COLORS.get(variant), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    ax.set_title("Validation loss (band: min–max over seeds)", fontsize=10)
    return _save(fig, out / "loss.png")


def sweep_summary(per_run: pd.DataFrame, out: Path) -> Path | None:
    """Outlier fraction (outliers / rank, mean over layer × step) per variant at each sweep value, both nulls."""
    if per_run["sweep"].nunique() < 2:
        return None
    fig, axes = _figure(1, 2, figsize=(10, 3.3), sharey=True)
    points = sorted(per_run["sweep"].unique())
    for ax, null in zip(axes[0], MONITOR_NULLS, strict=True):
        sub = per_run[per_run["null"] == null]
        for variant in _variants(sub):
            g = sub[sub["variant"] == variant].groupby("sweep")["outlier_fraction"]
            ax.errorbar(range(len(points)), g.mean().reindex(points), yerr=g.std().reindex(points).fillna(0),
                        marker="o", capsize=3, color=COLORS.get(variant), label=variant)
        ax.set_xticks(range(len(points)), points)
        ax.set_title(NULL_LABEL[null], fontsize=9)
    axes[0, 0].set_ylabel("outlier fraction (outliers / rank)\nmean ± sd over seeds")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "sweep.png")
