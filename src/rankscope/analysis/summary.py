"""The model-level view of an analysis table: a ``warning`` code per row, and a summary per (stack, kind).

``warning_column(df)``: one short code per row of ``rs.analyze``'s table, "" when nothing is wrong. The first rule
that holds wins, in this order (the numbers quoted were measured with ``rs.diagnose`` on Gaussian forms):

- ``error``: the row has an ``error`` (skipped, or not diagnosable): there is no diagnosis to read.
- ``degenerate``: ``lambda_max == 0`` (the zero form), or ``spike_strength`` is ∞: the median eigenvalue is exactly
  0 after the eigensolver's rounding level is clamped, so at least half the structural rank is numerically zero.
  Such a spectrum has no bulk, and no null can be fitted to it. The second case is seen by the median-referenced
  nulls (product, tw, permutation), not by the naive ``mp`` fit, which is referenced by the mean.
- ``rank_collapse``: ``erank_vs_null < RANK_COLLAPSE`` (0.5): the singular values spread over fewer than half as
  many effective directions (Roy & Vetterli's effective rank) as independent Gaussian factors of the same
  structure give. On Gaussian forms the ratio stays within 0.97–1.03 (heads 64·16·64 to 256·64·256, matrices
  64×32 to 768×768), far from 0.5. Product-null rows only: the ratio is NaN for the other nulls and for rank ≤ 4.
- ``heavy_tail``: a single matrix (``shapes`` "n·m") of rank ≥ ``MIN_TAIL_RANK`` (50) whose tail exponent
  ``pl_alpha`` is below ``HEAVY_TAIL_ALPHA`` (2), Martin & Mahoney's very-heavy-tailed class of a weight matrix's
  ESD (WeightWatcher's "over-trained"). It says how heavy the tail is, not why. Single matrices only: a product
  of Gaussian factors has a heavy tail of its own (9.5 % of Gaussian 64·16·64 heads fit α < 2). From rank 50 on
  (WeightWatcher's default ``min_evals``): no Gaussian matrix of rank 50–150 fit α < 2 in 1,800 draws (smallest
  α 2.15, at 100×50), while 2 % of 64×32 ones did.
- ``noise_like``: product null, ``outliers == 0``, ``spikes == 0`` and ``bulk_fits``: the spectrum cannot be told
  from that of independent Gaussian factors of its structure (no eigenvalue above the null's edge, no spike, a
  bulk of the null's shape). True of 97.5–100 % of Gaussian forms (each test holds its level fpr). It is what
  WeightWatcher's "under-trained" (α > 6) stands in for, and that proxy is weak: Gaussian matrices fit α > 6 in
  25 % (100×50) to 84 % (1000×100) of draws, depending on their shape.

Spikes are not a warning: an eigenvalue above the structure-matched null is what training puts into a form (a
learned direction), not a fault; ``summary`` reports the share of spiked heads and layers instead.

``summary(df)``: per (stack, kind), at offset 0 and under one null (product by default): the number of forms,
heads and layer forms; the share of heads (head_index ≥ 0) and of layer forms (head_index −1: a layer's summed
form, or a plain matrix) with ≥ 1 spike among those with a spike count; the medians of stable rank, effective rank and
``erank_vs_null`` (over the heads where the kind has per-head rows, else over its layer forms; stable rank has no
null ratio in the diagnosis); a count of each warning; and the layers that stand out (``standing_out``).

A layer stands out when its median of ``metric`` (stable rank by default; over the kind's heads, or its layer
forms, in that layer) lies beyond ``median ± OUTLIER_MADS · 1.4826 · MAD`` of the layers' medians (MAD: the median
absolute deviation; 1.4826·MAD estimates σ for normal data). Needs at least ``MIN_LAYERS`` (5) layers and a MAD
above 0. On i.i.d. normal layer values the rule marks a given layer with probability (200,000 simulated models
each) 6.9 % at 5 layers, 3.4 % at 8, 2.3 % at 12, 1.2 % at 24, 0.7 % at 48, 0.46 % at 96: the median and MAD
of a few layers are noisy, so about one model in five (19–26 % from 5 to 48 layers) shows a standout layer by
chance; read a standout as "look here", not as a test.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rankscope.vocab import PRODUCT

RANK_COLLAPSE = 0.5  # erank_vs_null below this: rank_collapse
HEAVY_TAIL_ALPHA = 2.0  # pl_alpha below this (single matrices): heavy_tail
MIN_TAIL_RANK = 50  # the smallest rank whose α is read by heavy_tail
OUTLIER_MADS = 3.0  # a layer stands out beyond median ± this many (normal-consistent) MADs
MIN_LAYERS = 5  # fewer layers than this: none is said to stand out
MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD × this estimates σ of normal data

ERROR, DEGENERATE, RANK_COLLAPSE_CODE, HEAVY_TAIL, NOISE_LIKE = (
    "error", "degenerate", "rank_collapse", "heavy_tail", "noise_like")
WARNINGS = (ERROR, DEGENERATE, RANK_COLLAPSE_CODE, HEAVY_TAIL, NOISE_LIKE)  # in the order the rules are tried


def _col(df: pd.DataFrame, name: str, default=np.nan) -> pd.Series:
    """A column as a Series (``default`` where the table lacks it, e.g. a table of error rows only)."""
    return df[name] if name in df else pd.Series(default, index=df.index)


def _num(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_col(df, name), errors="coerce")


def _single_matrix(shapes: pd.Series) -> pd.Series:
    """Whether each row's form is one matrix: its ``shapes`` is "n·m" (a chain has more dims, a sum a "+")."""
    return shapes.astype(str).str.fullmatch(r"\d+·\d+")


def warning_column(df: pd.DataFrame) -> pd.Series:
    """One code per row of an analysis table ("" when no rule holds), by the rules of the module docstring, the first
    that holds winning: error, degenerate, rank_collapse, heavy_tail, noise_like."""
    error = _col(df, "error", "").fillna("").astype(str).ne("")
    lam_max, strength = _num(df, "lambda_max"), _num(df, "spike_strength")
    degenerate = lam_max.eq(0) | np.isinf(strength)
    collapsed = _num(df, "erank_vs_null") < RANK_COLLAPSE  # NaN compares False: no ratio, no flag
    heavy = (_single_matrix(_col(df, "shapes", "")) & (_num(df, "rank") >= MIN_TAIL_RANK)
             & (_num(df, "pl_alpha") < HEAVY_TAIL_ALPHA))
    noise = (_col(df, "null", "").eq(PRODUCT) & _num(df, "outliers").eq(0) & _num(df, "spikes").eq(0)
             & _col(df, "bulk_fits", None).eq(True))
    rules = [error, degenerate, collapsed, heavy, noise]
    codes = np.select([r.fillna(False).to_numpy(dtype=bool) for r in rules], list(WARNINGS), default="")
    return pd.Series(codes, index=df.index, name="warning", dtype=object)


def standing_out(values: pd.Series) -> list:
    """The index labels of ``values`` (one per layer) beyond median ± OUTLIER_MADS·1.4826·MAD; [] with fewer than
    MIN_LAYERS finite values or a MAD of 0."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    v = v[np.isfinite(v)]
    if len(v) < MIN_LAYERS:
        return []
    med = float(v.median())
    sigma = MAD_TO_SIGMA * float((v - med).abs().median())
    if sigma <= 0:
        return []
    return [label for label, x in v.items() if abs(x - med) > OUTLIER_MADS * sigma]


def _share_spiked(rows: pd.DataFrame) -> tuple[float, int]:
    """(share of rows with spikes ≥ 1 among rows with a count, rows without a count)."""
    spikes = _num(rows, "spikes")
    counted = spikes.notna()
    share = float((spikes[counted] >= 1).mean()) if counted.any() else math.nan
    return share, int((~counted).sum())


def _chosen_null(df: pd.DataFrame, null: str | None) -> str | None:
    present = [x for x in _col(df, "null", None).dropna().unique()]
    if null is not None:
        return null
    return PRODUCT if PRODUCT in present or not present else present[0]


def summary(df: pd.DataFrame, *, null: str | None = None, metric: str = "stable_rank") -> pd.DataFrame:
    """One row per (stack, kind) of an analysis table: forms, spiked shares, median ranks, warning counts and the
    layers whose median ``metric`` stands out (module docstring). ``null``: whose rows to read (default: product
    when present, else the table's first); error rows, which carry no null, are always counted. Rows at offset 0."""
    if df.empty:
        return pd.DataFrame(columns=["stack", "kind", "forms"])
    chosen = _chosen_null(df, null)
    nulls = _col(df, "null", None)
    rows = df[(nulls.eq(chosen) | nulls.isna()) & _num(df, "offset").fillna(0).eq(0)].copy()
    rows["warning"] = rows["warning"] if "warning" in rows else warning_column(rows)
    rows["stack"] = _col(rows, "stack", "").fillna("")
    out = []
    for (stack, kind), g in rows.groupby(["stack", "kind"], sort=False):
        heads, layer_forms = g[g["head_index"] >= 0], g[g["head_index"] < 0]
        unit = heads if len(heads) else layer_forms  # what the medians and the layer rule read
        heads_spiked, heads_no_count = _share_spiked(heads)
        layers_spiked, layers_no_count = _share_spiked(layer_forms)
        in_layers = unit[unit["layer"] >= 0]
        per_layer = _num(in_layers, metric).groupby(in_layers["layer"]).median()
        out.append({
            "stack": stack, "kind": kind, "forms": len(g), "heads": len(heads),
            "heads_spiked": heads_spiked, "heads_no_count": heads_no_count,
            "layer_forms": len(layer_forms), "layers_spiked": layers_spiked, "layers_no_count": layers_no_count,
            "median_stable_rank": float(_num(unit, "stable_rank").median()),
            "median_effective_rank": float(_num(unit, "effective_rank").median()),
            "median_erank_vs_null": float(_num(unit, "erank_vs_null").median()),
            **{code: int(g["warning"].eq(code).sum()) for code in WARNINGS},
            "layers_standing_out": [int(x) for x in standing_out(per_layer)],
        })
    return pd.DataFrame(out)
