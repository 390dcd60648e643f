"""The warning column and the model summary: rules on hand-built rows whose answers are known by construction, the
rules' negative and positive controls on real diagnoses, the robust layer rule's false-alarm rate on i.i.d. layers,
and a planted low-rank component in one layer of a tiny LLaMA that the summary must find."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import rankscope as rs
from rankscope.analysis import analyze_full
from rankscope.analysis.summary import (
    MAD_TO_SIGMA,
    OUTLIER_MADS,
    WARNINGS,
    standing_out,
    summary,
    warning_column,
)

NAN = math.nan


def row(**over) -> dict:
    """A row of a diagnosed form that no rule flags: a spiked 384·32·384 head under the product null."""
    base = {"name": "layer 0 qk head 0", "stack": "", "layer": 0, "head_index": 0, "expert": -1, "kind": "qk",
            "offset": 0, "shapes": "384·32·384", "error": "", "null": "product", "rank": 32, "lambda_max": 5.0,
            "spike_strength": 2.0, "outliers": 2, "spikes": 2.0, "bulk_fits": True, "erank_vs_null": 0.9,
            "pl_alpha": 3.0, "stable_rank": 10.0, "effective_rank": 25.0}
    return {**base, **over}


# (overrides, expected code): each rule at and beside its threshold, and the order in which rules win
CASES = [
    ({}, ""),
    ({"error": "skipped: torch.int64 buffer, not a weight", "lambda_max": NAN}, "error"),
    ({"error": "layer 0: contains non-finite values", "erank_vs_null": 0.1}, "error"),  # error wins
    ({"lambda_max": 0.0, "spike_strength": 0.0, "erank_vs_null": 0.0}, "degenerate"),  # the zero form
    ({"spike_strength": math.inf, "erank_vs_null": 0.05}, "degenerate"),  # median 0: half the rank is zero
    ({"erank_vs_null": 0.49}, "rank_collapse"),
    ({"erank_vs_null": 0.5}, ""),  # strictly below the threshold
    ({"erank_vs_null": NAN}, ""),  # no ratio (another null, or rank ≤ 4): no flag
    ({"shapes": "512·384", "rank": 384, "pl_alpha": 1.9}, "heavy_tail"),
    ({"shapes": "512·384", "rank": 384, "pl_alpha": 2.0}, ""),
    ({"shapes": "512·384", "rank": 384, "pl_alpha": 1.9, "erank_vs_null": 0.3}, "rank_collapse"),  # collapse wins
    ({"shapes": "384·32·384", "pl_alpha": 1.2}, ""),  # a chain: its own heavy tail is no warning
    ({"shapes": "100·49", "rank": 49, "pl_alpha": 1.5}, ""),  # below MIN_TAIL_RANK
    ({"shapes": "100·50", "rank": 50, "pl_alpha": 1.5}, "heavy_tail"),
    ({"outliers": 0, "spikes": 0.0, "bulk_fits": True}, "noise_like"),
    ({"outliers": 0, "spikes": 0.0, "bulk_fits": True, "null": "mp"}, ""),  # the bulk check is the product null's
    ({"outliers": 1, "spikes": 0.0, "bulk_fits": True}, ""),
    ({"outliers": 0, "spikes": NAN, "bulk_fits": False}, ""),
    ({"outliers": 0, "spikes": 0.0, "bulk_fits": None}, ""),  # not tested
]


def test_each_rule_at_its_threshold_and_the_order_in_which_rules_win():
    df = pd.DataFrame([row(**over) for over, _ in CASES], index=np.arange(10, 10 + len(CASES)))
    got = warning_column(df)
    assert got.name == "warning" and list(got.index) == list(df.index)
    assert list(got) == [code for _, code in CASES]
    assert set(got) - {""} <= set(WARNINGS)


def test_a_table_of_error_rows_only_has_no_diagnosis_columns_and_is_all_errors():
    df = pd.DataFrame([{"name": "a.weight", "layer": -1, "head_index": -1, "kind": "weight", "shapes": "3·4",
                        "error": "skipped: torch.int64 buffer, not a weight"}] * 3)
    assert list(warning_column(df)) == ["error"] * 3


def test_gaussian_forms_get_no_fault_and_are_noise_like():
    # negative control: matrices of rank ≥ 50 (where heavy_tail reads α) and heads; nothing but noise_like fires,
    # and noise_like on ≈ 1 − 2·fpr of them (each of the outlier and bulk tests at fpr = 0.01)
    g = torch.Generator().manual_seed(0)
    mats = [rs.diagnose(torch.randn(120, 60, generator=g, dtype=torch.float64)) for _ in range(20)]
    rows = [{"shapes": "120·60", "error": "", **d.as_dict()} for d in mats]
    heads = rs.diagnose_batch([torch.randn(20, 64, 16, generator=g, dtype=torch.float64),
                               torch.randn(20, 16, 64, generator=g, dtype=torch.float64)])
    rows += [{"shapes": "64·16·64", "error": "", **d.as_dict()} for d in heads]
    codes = warning_column(pd.DataFrame(rows))
    assert set(codes) <= {"", "noise_like"}
    assert (codes == "noise_like").sum() >= 35  # of 40: P(≥ 6 misses) < 1e-3 at a 2.5 % miss rate


def test_planted_structures_get_their_codes():
    g = torch.Generator().manual_seed(3)
    n, m = 300, 200
    U = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q  # (n, m) orthonormal columns
    V = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    lam = torch.rand(m, generator=g, dtype=torch.float64) ** (-1 / 0.8)  # a Pareto ESD, density ∝ λ^(−1.8)
    heavy = rs.diagnose(U @ torch.diag(lam.sqrt()) @ V.T)
    assert abs(heavy.pl_alpha - 1.8) < 0.3  # the MLE's standard error is (α − 1)/√n ≈ 0.06
    low_rank = rs.diagnose(U[:, :3] @ torch.randn(3, m, generator=g, dtype=torch.float64)
                           + 1e-3 * torch.randn(n, m, generator=g, dtype=torch.float64))  # rank 3 + faint noise
    rank_one = rs.diagnose(torch.ones(n, 1, dtype=torch.float64) @ torch.ones(1, m, dtype=torch.float64))
    zero = rs.diagnose(torch.zeros(n, m))
    spiked = rs.diagnose(torch.randn(n, m, generator=g, dtype=torch.float64)
                         + 3 * U[:, :2] @ V[:, :2].T * math.sqrt(n))  # two strong spikes on a Gaussian bulk
    rows = [{"shapes": f"{n}·{m}", "error": "", **d.as_dict()} for d in (heavy, low_rank, rank_one, zero, spiked)]
    assert list(warning_column(pd.DataFrame(rows))) == ["heavy_tail", "rank_collapse", "degenerate", "degenerate", ""]


# ---- the layer rule --------------------------------------------------------------------------------------------


def test_a_planted_layer_stands_out_and_the_rule_is_median_plus_minus_three_mads():
    values = pd.Series([10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 3.0], index=[0, 1, 2, 3, 4, 5, 6, 7])
    med = np.median(values)
    sigma = MAD_TO_SIGMA * np.median(np.abs(values - med))
    expected = [i for i, v in values.items() if abs(v - med) > OUTLIER_MADS * sigma]
    assert expected == [7] and standing_out(values) == [7]
    assert standing_out(values.iloc[:4]) == []  # fewer than MIN_LAYERS layers
    assert standing_out(pd.Series([1.0, 1.0, 1.0, 1.0, 1.0, 7.0])) == []  # MAD 0: no spread to judge by


@pytest.mark.parametrize(("layers", "rate"), [(5, 0.069), (12, 0.023)])
def test_iid_layers_stand_out_at_the_documented_rate(layers, rate):
    # negative control: i.i.d. normal layer values; the documented per-layer rate (200,000 simulated models)
    rng = np.random.default_rng(layers)
    models = 1500
    marked = sum(len(standing_out(pd.Series(rng.normal(10, 2, layers)))) for _ in range(models))
    # layers of one model share their median and MAD, so the count is overdispersed; 5 binomial σ covers it
    sd = math.sqrt(rate * (1 - rate) * models * layers)
    assert abs(marked - rate * models * layers) < 5 * sd


def hand_table() -> pd.DataFrame:
    """Two kinds over 6 layers: qk with 4 heads and a layer form per layer, mlp_in one matrix per layer; layer 4's
    heads have a far lower stable rank; plus rows the summary must leave out (mp null, offset 3)."""
    rows = []
    for layer in range(6):
        sr = [12.0, 11.0, 13.0, 12.5] if layer != 4 else [2.0, 2.5, 1.5, 3.0]
        spikes = [0.0, 2.0, NAN, 1.0]
        for h in range(4):
            rows.append(row(layer=layer, head_index=h, stable_rank=sr[h] + 0.1 * layer, spikes=spikes[h],
                            effective_rank=20.0 + h, erank_vs_null=0.8 + 0.01 * h))
        rows.append(row(layer=layer, head_index=-1, shapes="384·384·384", rank=384, spikes=0.0 if layer else 3.0,
                        stable_rank=50.0))
        rows.append(row(name=f"l{layer}.up_proj", kind="mlp_in", layer=layer, head_index=-1, shapes="1536·384",
                        rank=384, stable_rank=30.0 + layer, spikes=NAN, bulk_fits=False,
                        erank_vs_null=0.3 if layer == 2 else 0.9))
        rows.append(row(layer=layer, head_index=0, null="mp", stable_rank=0.1, erank_vs_null=NAN, spikes=NAN))
        rows.append(row(layer=layer, head_index=0, offset=3, stable_rank=0.1))
    rows.append(row(name="embed.weight", kind="embedding", layer=-1, head_index=-1, shapes="1000·384", rank=384,
                    stable_rank=5.0))
    rows.append({"name": "position_ids", "stack": "", "layer": -1, "head_index": -1, "kind": "embedding", "offset": 0,
                 "shapes": "1·512", "error": "skipped: torch.int64 buffer, not a weight"})  # no null: still counted
    return pd.DataFrame(rows)


def test_summary_counts_shares_medians_and_the_standout_layer_of_a_hand_built_table():
    s = summary(hand_table()).set_index("kind")
    qk, mlp, emb = s.loc["qk"], s.loc["mlp_in"], s.loc["embedding"]
    assert (qk["forms"], qk["heads"], qk["layer_forms"]) == (30, 24, 6)
    assert qk["heads_spiked"] == pytest.approx(2 / 3) and qk["heads_no_count"] == 6  # spikes 0, 2, NaN, 1 per layer
    assert qk["layers_spiked"] == pytest.approx(1 / 6) and qk["layers_no_count"] == 0
    heads = hand_table().query("kind == 'qk' and head_index >= 0 and null == 'product' and offset == 0")
    assert qk["median_stable_rank"] == pytest.approx(np.median(heads["stable_rank"]))  # over heads, not layer forms
    assert qk["median_erank_vs_null"] == pytest.approx(0.815)
    assert qk["layers_standing_out"] == [4]
    assert (mlp["forms"], mlp["heads"], mlp["rank_collapse"], mlp["layers_no_count"]) == (6, 0, 1, 6)
    assert math.isnan(mlp["layers_spiked"]) and mlp["layers_standing_out"] == []  # 30..35 evenly: nothing stands out
    assert (emb["forms"], emb["error"]) == (2, 1) and emb["layers_standing_out"] == []  # layer −1 is no layer
    assert all(s[code].sum() >= 0 for code in WARNINGS)


def test_summary_reads_the_null_asked_for():
    s = summary(hand_table(), null="mp").set_index("kind")
    assert s.loc["qk", "heads"] == 6 and s.loc["qk", "median_stable_rank"] == pytest.approx(0.1)


# ---- a real model --------------------------------------------------------------------------------------------


def test_a_planted_low_rank_component_in_one_layers_q_proj_stands_out():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=6,
                      intermediate_size=128, vocab_size=96)
    model = LlamaModel(cfg).eval()
    planted = 3
    with torch.no_grad():
        q = model.layers[planted].self_attn.q_proj.weight  # (64, 64), entries N(0, 0.02²)
        u, v = torch.randn(64, 2), torch.randn(2, 64)
        q += 0.5 * u @ v / 8  # a rank-2 part with singular values ≈ 0.5, against a noise edge of ≈ 0.32
    df = analyze_full(model, kinds=["qk", "weights"]).table
    df["warning"] = warning_column(df)
    s = summary(df).set_index("kind")
    assert planted in s.loc["qk", "layers_standing_out"]
    heads = df[df["kind"].eq("qk") & (df["head_index"] >= 0)]
    per_layer = heads.groupby("layer")["stable_rank"].median()
    assert per_layer.idxmin() == planted  # the planted layer is the extreme one, downwards
    # the untrained heads elsewhere look like noise; the planted layer's do not
    assert (heads[heads["layer"] != planted]["warning"] == "noise_like").mean() > 0.85
    assert not (heads[heads["layer"] == planted]["warning"] == "noise_like").any()
