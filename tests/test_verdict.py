"""The verdict rule against independent computations (scipy, closed forms, hand-built series) and its controls."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rankscope.report.verdict import (
    CLAIMS,
    MARGINS,
    MIN_SEEDS,
    anova_f,
    equal_loss_steps,
    holm,
    layer_series,
    layer_specificity,
    offset_weights,
    onset,
    run_statistics,
    simulate_studies,
    synthetic_study,
    t_interval,
    t_pvalues,
    verdict,
)


def _claims(result):
    return {k: v["verdict"] for k, v in result["points"][0]["claims"].items()}


# ---- intervals and tests ---------------------------------------------------------------------------------------
def test_t_interval_is_the_written_out_t_interval():
    x = np.array([0.3, 0.5, 0.2, 0.45])
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / math.sqrt(4)
    ci = t_interval(x)
    assert ci["n"] == 4 and ci["mean"] == pytest.approx(x.mean())
    assert ci["low"] == pytest.approx(x.mean() - half) and ci["high"] == pytest.approx(x.mean() + half)
    assert t_interval([1.0, np.nan, 2.0, 3.0])["n"] == 3
    assert t_interval([np.nan])["mean"] is None


@pytest.mark.parametrize("direction", [+1, -1, 0])
def test_p_values_are_twice_scipys_one_sided_t_tests(direction):
    y = np.array([0.62, 0.71, 0.55, 0.68])
    c, m = 0.5, 0.05
    p = t_pvalues(y, margin=m, direction=direction, center=c)

    def one(mu, alt):
        return min(1.0, 2 * stats.ttest_1samp(y, mu, alternative=alt).pvalue)

    if direction == +1:
        assert p["reproduce"] == pytest.approx(one(c + m, "greater"))
        assert p["opposite"] == pytest.approx(one(c, "less"))
    elif direction == -1:
        assert p["reproduce"] == pytest.approx(one(c - m, "less"))
        assert p["opposite"] == pytest.approx(one(c, "greater"))
    else:
        assert p["reproduce"] == pytest.approx(min(one(c + m, "greater"), one(c - m, "less")))
    eq = max(one(c + m, "less"), one(c - m, "greater"))
    assert p["equivalent"] == pytest.approx(eq)
    # vectorised over leading axes: the same numbers row by row
    rows = np.stack([y, y[::-1] - 0.3])
    vec = t_pvalues(rows, margin=m, direction=direction, center=c)
    for i in range(2):
        single = t_pvalues(rows[i], margin=m, direction=direction, center=c)
        for k in vec:
            assert vec[k][i] == pytest.approx(single[k])


def test_significance_matches_the_interval():
    """p(reproduce) < α ⟺ the 95 % t-interval lies beyond the margin; p(equivalent) < α ⟺ inside ±margin."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        y = rng.normal(rng.uniform(-0.2, 0.2), rng.uniform(0.005, 0.1), size=4)
        ci = t_interval(y)
        p = t_pvalues(y, margin=0.05, direction=+1)
        if abs(ci["low"] - 0.05) > 1e-9:
            assert (p["reproduce"] < 0.05) == (ci["low"] > 0.05)
        if min(abs(ci["low"] + 0.05), abs(ci["high"] - 0.05)) > 1e-9:
            assert (p["equivalent"] < 0.05) == (ci["low"] > -0.05 and ci["high"] < 0.05)


def test_holm_against_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([[0.01, 0.04], [0.04, 0.01]]) == pytest.approx(np.array([[0.02, 0.04], [0.04, 0.02]]))


def test_layer_specificity_f_against_least_squares_and_scipy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6)) + np.linspace(0, 1, 6)  # (seeds, layers)
    n, L = x.shape
    layer_d = np.kron(np.ones((n, 1)), np.eye(L))  # one-way: layers as groups, seeds as replicates
    y = x.ravel()
    rss = [np.sum((y - d @ np.linalg.lstsq(d, y, rcond=None)[0]) ** 2) for d in (layer_d, np.ones((n * L, 1)))]
    df1, df2 = L - 1, L * (n - 1)
    F = ((rss[1] - rss[0]) / df1) / (rss[0] / df2)
    assert anova_f(x) == pytest.approx(F)
    assert anova_f(x) == pytest.approx(stats.f_oneway(*x.T).statistic)
    a = layer_specificity(x, margin=1.0)
    assert a["estimate"] == pytest.approx((F - 1) / n)
    assert a["p"]["reproduce"] == pytest.approx(min(1, 2 * stats.f.sf(F / (1 + n), df1, df2)))
    assert a["low"] == pytest.approx((F / stats.f.ppf(0.975, df1, df2) - 1) / n)
    same = np.tile(np.linspace(0.1, 0.8, 6), (4, 1))  # no seed-to-seed spread: no yardstick, no test
    assert layer_specificity(same)["p"] is None


# ---- layer series, onsets, per-run statistics ------------------------------------------------------------------
def test_offset_weights_closed_form():
    # T = 128: 0 stands for |Δ| = 0; −1 for 1–2; −4 for 3–10; −16 for 11–40; −64 for 41–127 (midpoint bins; a
    # tie, |Δ| = 10 between 4 and 16, goes to the offset nearer zero)
    T = 128
    bins = [[0], [1, 2], range(3, 11), range(11, 41), range(41, T)]
    pairs = np.array([sum(T - k for k in b) for b in bins], float)
    assert pairs.sum() == T * (T + 1) / 2  # every causal pair counted once
    w = offset_weights([0, -1, -4, -16, -64], T)
    assert w == pytest.approx(pairs / pairs.sum())
    assert offset_weights([-16, 0], T) == pytest.approx(offset_weights([0, -16], T)[::-1])  # order of the input
    assert offset_weights([0], 8) == pytest.approx([1.0])
    assert offset_weights([0, -4], None) == pytest.approx([0.5, 0.5])  # context unknown: equal weights


def test_layer_series_weights_offsets_then_averages_heads():
    rows = []
    vals = {(0, 0): 1.0, (0, -4): 3.0, (1, 0): 2.0, (1, -4): np.nan}  # (head, offset) → spikes
    for (h, off), sp in vals.items():
        rows.append({"sweep": "s", "name": "r", "step": 0, "layer": 0, "head_index": h, "offset": off, "rank": 8,
                     "spikes": sp, "effective_rank": 4.0 + h, "erank_vs_null": 1.0, "top_energy_vs_null": 1.0,
                     "bulk_effective_rank": 3.0})
    runs = pd.DataFrame([{"sweep": "s", "name": "r", "variant": "mha", "seed": 0, "steps": 10, "context": 8}])
    s = layer_series(pd.DataFrame(rows), runs)
    w = offset_weights([0, -4], 8)
    head0 = w @ [1.0, 3.0]
    head1 = 2.0  # the NaN offset drops out, weights renormalised over what is left
    assert s["spikes"].iloc[0] == pytest.approx((head0 + head1) / 2)
    assert s["effective_rank"].iloc[0] == pytest.approx(4.5)
    assert bool(s["spiked"].iloc[0])


def test_onset_ignores_a_flicker_and_censors():
    steps = [0, 1, 2, 3, 5, 10]
    assert onset(steps, [0, 1, 0, 1, 1, 0], 10) == pytest.approx(0.3)  # the flicker at step 1 is no onset
    assert onset(steps, [0, 1, 0, 1, 0, 1], 10) == 1.0  # never two in a row: censored
    assert onset(steps, [0, 0, 0, 0, 0, 1], 10) == 1.0  # only the last step: censored
    assert onset(steps, [1, 1, 1, 1, 1, 1], 10) == 0.0


def _one_run(spikes, erank, bulk, ervn, rank=16, steps=(0, 1, 2, 3, 4, 5), layers=1):
    rows = [{"sweep": "s", "name": "r", "step": st, "layer": layer, "head_index": 0, "offset": 0, "rank": rank,
             "spikes": spikes[i], "effective_rank": erank[i], "erank_vs_null": ervn[i],
             "top_energy_vs_null": 1.0, "bulk_effective_rank": bulk[i]}
            for layer in range(layers) for i, st in enumerate(steps)]
    runs = pd.DataFrame([{"sweep": "s", "name": "r", "variant": "mha", "seed": 0, "steps": 10, "context": 8}])
    return pd.DataFrame(rows), runs


def test_run_statistics_on_a_hand_built_run():
    cells, runs = _one_run(spikes=[0, 2, 0, 2, 2, 2], erank=[12, 12, 11, 10, 8, 6],
                           bulk=[12, 10.5, 11, 10.5, 10.5, 10.5], ervn=[1, 1, 0.95, 0.85, 0.8, 0.7])
    per_run, layers = run_statistics(layer_series(cells, runs), runs)
    r = per_run.iloc[0]
    assert r["early"] == pytest.approx(0.3)  # first two-in-a-row at step 3 of 10
    assert r["persistence"] == pytest.approx(1.0)  # step 5 (after the confirming step 4) still spiked
    assert layers["rank_onset"].iloc[0] == pytest.approx(0.3)
    assert r["lead"] == pytest.approx(0.0)
    assert r["erank_drop"] == pytest.approx(0.5)
    assert r["spikes"] == pytest.approx(2.0) and r["spikes_per_rank"] == pytest.approx(2 / 16)


def test_spike_share_is_zero_for_a_decaying_bulk_and_one_when_only_spikes_move():
    decay = [12, 11, 10, 9, 7, 6]
    cells, runs = _one_run(spikes=[0] * 6, erank=decay, bulk=decay, ervn=[1] * 6)
    r = run_statistics(layer_series(cells, runs), runs)[0].iloc[0]
    assert r["spike_share"] == pytest.approx(0.0, abs=1e-12)
    # the spikes take the drop: the bulk below them keeps its initial breadth 12/16 of what is left
    spikes = [0, 1, 1, 2, 2, 3]
    cells, runs = _one_run(spikes=spikes, erank=decay, bulk=[0.75 * (16 - s) for s in spikes], ervn=[1] * 6)
    r = run_statistics(layer_series(cells, runs), runs)[0].iloc[0]
    assert r["bulk_drop"] == pytest.approx(0.0, abs=1e-12)
    assert r["spike_share"] == pytest.approx(1.0)


def test_equal_loss_step_interpolates_to_the_worst_final_loss():
    train = pd.DataFrame({"sweep": "s", "name": ["a", "a", "a", "b", "b", "b"], "step": [0, 10, 20, 0, 10, 20],
                          "val_loss": [5.0, 3.0, 2.0, 5.0, 4.0, 3.5]})
    runs = pd.DataFrame({"sweep": "s", "name": ["a", "b"]})
    eq = equal_loss_steps(train, runs).set_index("name")
    assert eq.loc["a", "loss_star"] == 3.5
    assert eq.loc["a", "equal_loss_step"] == pytest.approx(7.5)  # 5 → 3 over 0..10 crosses 3.5 at 7.5
    assert eq.loc["b", "equal_loss_step"] == pytest.approx(20.0)


# ---- the rule on synthetic studies -----------------------------------------------------------------------------
def test_known_effect_is_reproduced_and_the_record_is_complete():
    result = verdict(*synthetic_study("known_effect", seed=1), controls=False)
    assert _claims(result) == {"i": "reproduced", "ii": "reproduced", "iii": "reproduced"}
    json.dumps(result, allow_nan=False)
    point = result["points"][0]
    assert result["margins"] == MARGINS and result["claims"] == CLAIMS and result["min_seeds"] == MIN_SEEDS
    t = point["tests"][0]
    for key in ("claim", "variant", "sentence", "estimate", "low", "high", "level", "n", "margin", "direction",
                "p", "p_holm", "reading"):
        assert key in t
    primary = [x for x in point["tests"] if x["primary"]]
    # a claim's reproduce p: the largest of its parts' (intersection–union), Holm-adjusted across the claims;
    # the not-reproduced readings: Holm across every part
    iut = [max(x["p"]["reproduce"] for x in primary if x["claim"] == c) for c in CLAIMS]
    adjusted = dict(zip(CLAIMS, holm(iut), strict=True))
    assert [x["p_holm"]["reproduce"] for x in primary] == pytest.approx([adjusted[x["claim"]] for x in primary])
    assert [x["p_holm"]["equivalent"] for x in primary] == pytest.approx(
        list(holm([x["p"]["equivalent"] for x in primary])))
    assert all(isinstance(e, str) and " " in e for c in point["claims"].values() for e in c["evidence"])
    assert set(point["onsets"]["mha"]) == set(range(8))
    assert set(point["per_offset"]["mha"]) == {0, -4}
    assert point["claims"]["iii"]["at_equal_loss"] == "reproduced"


def test_flipped_effect_is_not_reproduced():
    result = verdict(*synthetic_study("flipped", seed=2), controls=False)
    assert _claims(result) == {"i": "not reproduced", "ii": "not reproduced", "iii": "not reproduced"}


def test_two_seeds_are_inconclusive():
    result = verdict(*synthetic_study("known_effect", seeds=2, seed=3), controls=False)
    assert _claims(result) == {"i": "inconclusive", "ii": "inconclusive", "iii": "inconclusive"}


def test_spike_free_decay_is_not_a_reproduction_of_claim_ii():
    result = verdict(*synthetic_study("spike_free", seed=4), controls=False)
    assert _claims(result)["ii"] != "reproduced"
    assert _claims(result)["i"] != "reproduced"


def test_simulated_no_effect_and_boundary_studies():
    sim = simulate_studies(studies=2000, seed=7)
    for claim in CLAIMS:
        assert sim["no_effect"][claim]["reproduced"] <= 0.05
        assert sim["boundary"][claim]["reproduced"] <= 0.05
        assert sim["boundary"][claim]["not reproduced"] <= 0.05
        assert sum(sim["no_effect"][claim].values()) == pytest.approx(1.0)


def test_verdict_carries_the_negative_controls():
    result = verdict(*synthetic_study("known_effect", seed=5), studies=1000, permutations=20)
    nc = result["negative_controls"]
    json.dumps(nc, allow_nan=False)
    assert nc["known_effect"]["verdicts"] == {"i": "reproduced", "ii": "reproduced", "iii": "reproduced"}
    assert nc["spike_free"]["verdicts"]["ii"] != "reproduced"
    sim = nc["simulated"][0]
    assert sim["seeds"] == 3 and sim["layers"] == 8 and len(sim["variants"]) == 6
    assert all(sim["no_effect"][c]["reproduced"] <= 0.05 for c in CLAIMS)
    assert nc["permuted"][0]["permutations"] == 20


def test_spikes_that_come_after_the_rank_drop_do_not_coincide_with_it():
    """Claim (ii) is about timing too: spikes that appear only once the rank has long dropped read "not
    reproduced" on the coincide test (rank-drop onset − spike onset clearly below −margin)."""
    cells, train, runs = synthetic_study("known_effect", seed=6)
    late = (cells["variant"] != "mla_decoupled") & (cells["step"] < 0.8 * 400)
    cells.loc[late, "spikes"] = 0.0
    cells.loc[late, "bulk_effective_rank"] = cells.loc[late, "effective_rank"]
    point = verdict(cells, train, runs, controls=False)["points"][0]
    coincide = [t for t in point["tests"] if t["claim"] == "ii" and t["statistic"] == "lead"]
    assert coincide and all(t["reading"] == "not reproduced" and t["high"] < -MARGINS["lead"] for t in coincide)
    assert point["claims"]["ii"]["verdict"] == "not reproduced"


def test_the_t_interval_over_five_seeds_covers_the_true_mean_95_percent_of_the_time():
    """The first edition's percentile bootstrap over 3 seeds was [min, max] and covered 76 %; the t-interval is
    exact for Gaussian seeds: over 4000 studies of 5 seeds its coverage is 0.95 ± 3 binomial SDs (0.0103)."""
    x = np.random.default_rng(11).normal(2.0, 0.3, size=(4000, 5))
    covered = [(ci := t_interval(row))["low"] <= 2.0 <= ci["high"] for row in x]
    assert abs(np.mean(covered) - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / 4000)


def test_a_head_without_a_count_keeps_its_drop_in_the_bulk_and_is_counted_as_uncounted():
    """Where the bulk is not noise-shaped the spikes are not counted (NaN): that head's whole drop stays in the
    bulk (no selection of heads into spike_share), and the share of such heads is reported."""
    spikes = [0, 1, 1, 2, 2, np.nan]  # the last step's bulk did not fit
    decay = [12, 11, 10, 9, 7, 6]
    cells, runs = _one_run(spikes=spikes, erank=decay, bulk=[0.75 * (16 - s) for s in spikes], ervn=[1] * 6)
    r = run_statistics(layer_series(cells, runs), runs)[0].iloc[0]
    assert r["erank_drop"] == pytest.approx(0.5)
    assert r["bulk_drop"] == pytest.approx(0.5)  # 1 − (6/16) / (12/16): the drop left to the bulk
    assert r["spike_share"] == pytest.approx(0.0, abs=1e-12)
    assert r["uncounted"] == pytest.approx(1.0)


def test_identical_onsets_across_seeds_carry_the_grids_rounding_error():
    """Onsets snap to the monitored steps: five identical values are not certainty. With the SD floored at the
    grid's rounding error gap/√12 the p-values are those of a t-test with that SD (not 0 or 1)."""
    y = np.full(5, 0.02)
    floor = 0.01 / math.sqrt(12)
    p = t_pvalues(y, margin=0.05, direction=+1, sd_floor=floor)
    t_eq = (0.02 - 0.05) / (floor / math.sqrt(5))  # TOST: the upper one-sided test decides
    assert p["equivalent"] == pytest.approx(2 * stats.t.cdf(t_eq, 4))
    assert 0 < p["equivalent"] and p["opposite"] == pytest.approx(1.0) and p["reproduce"] == pytest.approx(1.0)
    assert t_interval(y, sd_floor=floor)["high"] == pytest.approx(0.02 + stats.t.ppf(0.975, 4) * floor / math.sqrt(5))


def test_attribution_is_the_paired_difference_of_the_contrasts():
    cells, train, runs = synthetic_study("known_effect", seed=8)
    point = verdict(cells, train, runs, controls=False)["points"][0]
    per_run = pd.DataFrame(point["per_run"])
    row = next(r for r in point["attribution"] if r["a"] == "mla_decoupled" and r["b"] == "mha_decoupled")
    a = per_run[per_run["variant"] == "mla_decoupled"].set_index("seed")["erank_vs_null"]
    b = per_run[per_run["variant"] == "mha_decoupled"].set_index("seed")["erank_vs_null"]
    assert row["erank_vs_null"]["mean"] == pytest.approx(float((a - b).mean()))
    assert row["erank_vs_null"]["low"] == pytest.approx(t_interval((a - b).to_numpy())["low"])
    assert {r["contrast"] for r in point["attribution"]} >= {"grouped keys", "a shared rope key (no latent)"}


def test_permuting_the_variant_labels_within_seeds_removes_the_comparisons_effect():
    """On a study with a strong known effect the rule says "reproduced" for (iii); with the same runs' labels
    permuted within each seed (no systematic difference left) it must say so in at most 5 % of permutations."""
    from rankscope.report.verdict import permutation_control

    cells, train, runs = synthetic_study("known_effect", seeds=5, seed=9)
    assert _claims(verdict(cells, train, runs, controls=False))["iii"] == "reproduced"
    per_run, layers = run_statistics(layer_series(cells, runs), runs, train)
    perm = permutation_control(per_run, layers, permutations=60, seed=3)
    assert perm["permutations"] == 60
    assert perm["iii"]["reproduced"] <= 0.05 and perm["i: earlier onset"]["reproduced"] <= 0.05
    assert sum(perm["iii"].values()) == pytest.approx(1.0)


def test_persistence_is_a_share_of_training_time_not_of_monitored_steps():
    """Steps 0, 1, 2, 3, 4, 5 (dense) then 50 and 100: spiked from 1 on, unspiked at 50 only. Each step stands
    for the time until the next (the last for the gap before it): after the confirming step 2 that is steps 3, 4,
    5, 50, 100 with spans 1, 1, 45, 50, 50; unspiked 50 of 147 → persistence 97/147 (by count it would be 4/5)."""
    steps = (0, 1, 2, 3, 4, 5, 50, 100)
    spikes = [0, 2, 2, 2, 2, 2, 0, 2]
    cells, runs = _one_run(spikes=spikes, erank=[12] * 8, bulk=[12] * 8, ervn=[1] * 8, steps=steps)
    runs = runs.assign(steps=100)
    r = run_statistics(layer_series(cells, runs), runs)[0].iloc[0]
    assert r["persistence"] == pytest.approx(97 / 147)
