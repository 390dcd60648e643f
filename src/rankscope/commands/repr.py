"""``rankscope repr``: every representation-collapse metric the inputs allow, as a table."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from rankscope.errors import InputError


def load_npy(path: Path | None, what: str):
    """A .npy array (never pickled objects), or None; a missing or unreadable file is bad input."""
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path}: cannot be read as a .npy array ({exc})") from exc


def metrics_table(features: Path, labels: Path | None, logits: Path | None, weights: Path | None) -> Table:
    """(metric, value, meaning) rows for the features and whatever labels, logits and weights are given."""
    from rankscope import representations as rr
    from rankscope.representations import _input

    H = _input.features(load_npy(features, "features"), f"features {features}")
    y, L, W = load_npy(labels, "labels"), load_npy(logits, "logits"), load_npy(weights, "weights")
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
    table = Table(title=f"Representations {features.name}: N={H.shape[0]}, D={H.shape[1]}")
    for col in ("metric", "value", "meaning"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name, value, note in rows:
        table.add_row(name, f"{value:.5g}", note)
    return table
