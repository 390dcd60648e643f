"""Verdict statistics against hand computations and scipy; bootstrap CIs against the normal approximation."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rankscope.report.verdict import bootstrap_ci, run_statistics, verdict


def _layers():
    steps = [0, 10, 20, 30, 40]
    outliers = {0: [0, 0, 2, 3, 0], 1: [0, 1, 1, 1, 1]}
    energy = {0: [0, 0, 0.2, 0.4, 0], 1: [0, 0.1, 0.15, 0.3, 0.5]}
    eff = {0: [30, 29, 25, 20, 28], 1: [31, 27, 26, 22, 18]}
    rows = [{"layer": layer, "step": s, "outliers": outliers[layer][i], "outlier_energy": energy[layer][i],
             "effective_rank": eff[layer][i], "rank": 32} for layer in (0, 1) for i, s in enumerate(steps)]
    return pd.DataFrame(rows)


def test_run_statistics_match_hand_computation():
    layers = _layers()
    heads = pd.DataFrame({"step": [0, 10, 10, 20], "outliers": [1, 0, 2, 0]})
    s = run_statistics(layers, heads, total_steps=40)
    assert s["cells_with_outliers"] == pytest.approx(6 / 8)  # steps > 0 only
    assert s["outlier_fraction"] == pytest.approx((0 + 2 + 3 + 0 + 1 + 1 + 1 + 1) / 8 / 32)
    assert s["outlier_energy"] == pytest.approx((0 + 0.2 + 0.4 + 0 + 0.1 + 0.15 + 0.3 + 0.5) / 8)
    assert s["head_cells_with_outliers"] == pytest.approx(1 / 3)
    assert s["first_spike"] == pytest.approx(10 / 40)
    assert s["layers_spiked_by_mid"] == pytest.approx(1.0)
    assert s["persistence"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["final_effective_rank"] == pytest.approx((28 / 32 + 18 / 32) / 2)
    trained = layers[layers["step"] > 0]
    er0 = layers[layers["step"] == 0].set_index("layer")["effective_rank"]
    drop = [1 - r.effective_rank / er0[r.layer] for r in trained.itertuples()]
    assert s["spike_rank_corr"] == pytest.approx(stats.spearmanr(trained["outlier_energy"], drop).statistic)


def test_a_run_without_spikes():
    layers = _layers().assign(outliers=0, outlier_energy=0.0)
    s = run_statistics(layers, layers.head(0), total_steps=40)
    assert s["cells_with_outliers"] == 0 and s["first_spike"] == 1.0 and s["layers_spiked_by_mid"] == 0
    assert np.isnan(s["persistence"]) and np.isnan(s["spike_rank_corr"])


def test_bootstrap_ci_agrees_with_the_normal_approximation():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    mean, lo, hi = bootstrap_ci(x, draws=8000)
    half = 1.96 * x.std(ddof=0) / np.sqrt(x.size)
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def _per_run(spiky: dict, calm: dict, seeds: int = 3) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for null in ("product", "mp"):
        for seed in range(seeds):
            for variant, base in (("mha", spiky), ("mla_prerope_input", spiky), ("mla_decoupled", calm)):
                row = {k: v + 0.01 * rng.standard_normal() for k, v in base.items()}
                rows.append({"name": f"{variant}-s{seed}", "sweep": "base", "variant": variant, "seed": seed,
                             "null": null, **row})
    return pd.DataFrame(rows)


SPIKY = dict(cells_with_outliers=0.8, outlier_fraction=0.2, first_spike=0.1, spike_rank_corr=0.6,
             final_effective_rank=0.3)
CALM = dict(cells_with_outliers=0.1, outlier_fraction=0.01, first_spike=0.9, spike_rank_corr=0.1,
            final_effective_rank=0.7)


def test_verdicts_follow_the_evidence():
    point = verdict(_per_run(SPIKY, CALM))["points"][0]
    assert {k: v["verdict"] for k, v in point["claims"].items()} == {
        "i": "reproduced", "ii": "reproduced", "iii": "reproduced"}
    flipped = verdict(_per_run(CALM | {"spike_rank_corr": -0.5}, SPIKY))["points"][0]
    assert {k: v["verdict"] for k, v in flipped["claims"].items()} == {
        "i": "not reproduced", "ii": "not reproduced", "iii": "not reproduced"}
    few = verdict(_per_run(SPIKY, CALM, seeds=2))["points"][0]
    assert {v["verdict"] for v in few["claims"].values()} == {"inconclusive at this scale"}
    diff = point["vs_reference"]["mha"]["cells_with_outliers"]
    assert diff[0] == pytest.approx(0.7, abs=0.05) and diff[1] <= diff[0] <= diff[2]
