"""The verdict on the claims of Jha & Reagen (arXiv 2507.09394): statistics per run, bootstrap CIs across
seeds, and a plain reading — reproduced, not reproduced, or inconclusive at this scale.

Every statistic is computed from the layer-level query–key forms (head = −1, kind ``qk``) at the monitored
steps after initialisation, once under each null, so the reader sees how much of a naive-MP "spike"
survives the structure-matched null:

- ``cells_with_outliers``: share of (layer, step) cells with at least one outlier.
- ``outlier_fraction``: mean over those cells of outliers / rank (how much of the spectrum stands above the
  bulk; unlike the share of cells it does not saturate once every layer has one spike).
- ``outlier_energy``: mean over those cells of the outliers' share of Σλ.
- ``head_cells_with_outliers``: the same over (layer, head, step).
- ``first_spike``: first step with an outlier in any layer, as a fraction of training (1 when never).
- ``layers_spiked_by_mid``: share of layers with an outlier at some step up to the middle of training.
- ``persistence``: share of a layer's cells from its first spike on that still have outliers.
- ``spike_rank_corr``: Spearman correlation, over (layer, step) cells, of outlier energy with the relative
  drop of effective rank since step 0 (claim ii: spikes coincide with rank collapse).
- ``final_effective_rank``: mean over layers of effective rank / rank at the last step (breadth of support).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rankscope.vocab import MHA, MLA_PREROPE, MONITOR_NULLS, QK, REFERENCE_VARIANT

CLAIMS = {
    "i": "MHA and MLA-PreRoPE show sharp, early spectral spikes in specific layers that persist and propagate",
    "ii": "these spikes coincide with rank collapse",
    "iii": "only MLA-Decoupled prevents this, keeping broad spectral support and suppressing outliers",
}
MIN_SEEDS = 3  # below this a bootstrap CI over seeds means nothing: the verdict is "inconclusive"


def run_statistics(layers: pd.DataFrame, heads: pd.DataFrame, total_steps: int) -> dict[str, float]:
    """The statistics of one run under one null. ``layers``/``heads``: its qk rows (layer-level / per head)."""
    out: dict[str, float] = {}
    trained = layers[layers["step"] > 0]
    spiked = trained[trained["outliers"] > 0]
    out["cells_with_outliers"] = float((trained["outliers"] > 0).mean()) if len(trained) else np.nan
    out["outlier_fraction"] = float((trained["outliers"] / trained["rank"]).mean()) if len(trained) else np.nan
    out["outlier_energy"] = float(trained["outlier_energy"].mean()) if len(trained) else np.nan
    h = heads[heads["step"] > 0]
    out["head_cells_with_outliers"] = float((h["outliers"] > 0).mean()) if len(h) else np.nan
    out["first_spike"] = float(spiked["step"].min() / total_steps) if len(spiked) else 1.0
    n_layers = trained["layer"].nunique()
    early = spiked[spiked["step"] <= total_steps / 2]
    out["layers_spiked_by_mid"] = early["layer"].nunique() / n_layers if n_layers else np.nan
    kept = []
    for _, rows in trained.groupby("layer"):
        first = rows.loc[rows["outliers"] > 0, "step"].min()
        if pd.notna(first):
            kept.append(float((rows.loc[rows["step"] >= first, "outliers"] > 0).mean()))
    out["persistence"] = float(np.mean(kept)) if kept else np.nan
    er0 = layers[layers["step"] == 0].set_index("layer")["effective_rank"]
    drop = 1 - trained["effective_rank"].to_numpy() / er0.reindex(trained["layer"]).to_numpy()
    energy = trained["outlier_energy"].to_numpy()
    ok = np.isfinite(drop) & np.isfinite(energy)
    if ok.sum() >= 3 and np.ptp(energy[ok]) > 0 and np.ptp(drop[ok]) > 0:
        out["spike_rank_corr"] = float(pd.Series(energy[ok]).corr(pd.Series(drop[ok]), method="spearman"))
    else:
        out["spike_rank_corr"] = np.nan
    last = layers[layers["step"] == layers["step"].max()]
    out["final_effective_rank"] = float((last["effective_rank"] / last["rank"]).mean()) if len(last) else np.nan
    return out


def bootstrap_ci(values, *, draws: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap CI of the mean across seeds."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(draws, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(x.mean()), float(lo), float(hi))


def _reading(ci: tuple[float, float, float], direction: int, n: int) -> str:
    """"supports" when the CI lies on the claimed side of 0, "contradicts" when on the other, else "unclear"."""
    mean, lo, hi = ci
    if n < MIN_SEEDS or not np.isfinite(mean):
        return "unclear"
    if direction * lo > 0 and direction * hi > 0:
        return "supports"
    if direction * lo < 0 and direction * hi < 0:
        return "contradicts"
    return "unclear"


def per_run_table(attention: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, null) with every statistic; ``attention`` holds all runs' attention rows with ``name``
    and ``sweep`` columns matching ``runs``."""
    rows = []
    a = attention
    for run in runs.itertuples():
        mine = a[(a["name"] == run.name) & (a["sweep"] == run.sweep) & (a["kind"] == QK)]
        for null in MONITOR_NULLS:
            sub = mine[mine["null"] == null]
            stats = run_statistics(sub[sub["head"] < 0], sub[sub["head"] >= 0], run.steps)
            rows.append({"name": run.name, "sweep": run.sweep, "variant": run.variant, "seed": run.seed,
                         "null": null, **stats})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame, reference: str = REFERENCE_VARIANT) -> dict:
    """Means and CIs per (sweep, null, variant, statistic), differences from ``reference`` paired by seed, and
    a reading of each claim per sweep point and null."""
    stats = [c for c in table.columns if c not in ("name", "sweep", "variant", "seed", "null")]
    out: dict = {"claims": CLAIMS, "min_seeds": MIN_SEEDS, "points": []}
    for (sweep, null), group in table.groupby(["sweep", "null"], sort=True):
        point: dict = {"sweep": sweep, "null": null, "variants": {}, "vs_reference": {}, "claims": {}}
        for variant, rows in group.groupby("variant"):
            point["variants"][variant] = {s: bootstrap_ci(rows[s]) for s in stats} | {"seeds": len(rows)}
        ref = group[group["variant"] == reference].set_index("seed")
        for variant, rows in group[group["variant"] != reference].groupby("variant"):
            rows = rows.set_index("seed")
            common = rows.index.intersection(ref.index)
            point["vs_reference"][variant] = {
                s: bootstrap_ci((rows.loc[common, s] - ref.loc[common, s]).to_numpy()) for s in stats
            } | {"seeds": len(common)}
        point["claims"] = _claims(point, reference)
        out["points"].append(point)
    return out


def _claims(point: dict, reference: str) -> dict:
    diffs = point["vs_reference"]
    spiky = [v for v in diffs if v == MHA or v.startswith(MLA_PREROPE)]
    readings: dict[str, dict] = {}

    def combine(parts: dict[str, str]) -> str:
        if not parts:
            return "inconclusive at this scale"
        values = set(parts.values())
        if values == {"supports"}:
            return "reproduced"
        if "contradicts" in values:
            return "not reproduced"
        return "inconclusive at this scale"

    # (i) more of the spectrum in outliers than Decoupled, and earlier first spikes
    parts = {}
    for v in spiky:
        n = diffs[v]["seeds"]
        parts[f"{v}: outlier_fraction − {reference}"] = _reading(diffs[v]["outlier_fraction"], +1, n)
        parts[f"{v}: first_spike − {reference}"] = _reading(diffs[v]["first_spike"], -1, n)
    readings["i"] = {"verdict": combine(parts), "evidence": parts}
    # (ii) outlier energy correlates with the effective-rank drop, for the spiky variants
    parts = {}
    for v in spiky:
        stats = point["variants"].get(v, {})
        if "spike_rank_corr" in stats:
            parts[f"{v}: spike_rank_corr > 0"] = _reading(stats["spike_rank_corr"], +1, stats["seeds"])
    readings["ii"] = {"verdict": combine(parts), "evidence": parts}
    # (iii) every other variant has more outliers and a narrower final spectrum than Decoupled
    parts = {}
    for v, d in diffs.items():
        parts[f"{v}: outlier_fraction − {reference}"] = _reading(d["outlier_fraction"], +1, d["seeds"])
        parts[f"{v}: final_effective_rank − {reference}"] = _reading(d["final_effective_rank"], -1, d["seeds"])
    readings["iii"] = {"verdict": combine(parts), "evidence": parts}
    return readings
