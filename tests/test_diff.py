"""``rankscope.analysis.diff.diff`` and ``rankscope diff``: the spectrum of ΔW = W_tuned − W_base per matrix and
head, against theory and independent computations.

- the form algebra: the telescoped change of a chain or sum equals the dense B_t − B_b; the top singular
  subspaces of a chain equal a dense SVD's; the overlap is 1 for the same subspace and cos²θ for a rotation by θ;
- negative controls: a model against itself (ΔW = 0: "no change", no spikes, overlaps 1); independent noise
  re-drawn into every weight (no more spiked spectra than the fpr allows, binomial bound);
- positive control: a planted rank-2 change above the BBP threshold in one layer's q_proj: 2 spikes exactly in
  that matrix, in the head it touches and in its layer's qk form; none elsewhere;
- bad input: different shapes name the matrix and both shapes (exit code 2 on the CLI).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom
from typer.testing import CliRunner

from rankscope.analysis.diff import diff, form_change, shares_factors, subspace_overlap, top_singular_vectors
from rankscope.cli import app
from rankscope.errors import InputError
from rankscope.spectra import Chain, Sum

HIDDEN, HEADS, DH = 32, 2, 16
FPR = 0.01
SIGMA = 0.002  # noise of a change, a tenth of the init's 0.02
Q1 = "model.layers.1.self_attn.q_proj.weight"


def tiny(seed: int, **config):
    """A 2-layer LLaMA, hidden 32, 2 heads of 16: its Linear weights are N(0, 0.02²) at init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                    num_key_value_heads=HEADS, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))


def changed(model, change) -> object:
    """A copy of ``model`` with ``change(name, weight, generator)`` added to every 2-D weight (None: left as is)."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if p.dim() == 2:
                delta = change(name, p, g)
                if delta is not None:
                    p.add_(delta)
    return copy


def noise(name, p, g):
    return SIGMA * torch.randn(p.shape, generator=g)


def rotation(n: int, U: torch.Tensor, P: torch.Tensor, theta: float) -> torch.Tensor:
    """R (n, n) orthogonal: turns each u_i towards p_i by θ in the plane (u_i, p_i), identity elsewhere."""
    return (torch.eye(n, dtype=torch.float64) + (math.cos(theta) - 1) * (U @ U.T + P @ P.T)
            + math.sin(theta) * (P @ U.T - U @ P.T))


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


# ---------------------------------------------------------------------------------------------- the algebra


def test_the_change_of_a_form_is_the_dense_difference():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    A, C, M = r(12, 4), r(4, 5), r(5, 9)
    A2, M2 = A + r(12, 4), M + r(5, 9)
    d = form_change(Chain(A, C, M), Chain(A2, C, M2))  # two of three factors changed: two chains
    assert isinstance(d, Sum) and len(d.chains) == 2
    dense = sum(torch.linalg.multi_dot(t) for t in d.terms())
    torch.testing.assert_close(dense, A2 @ C @ M2 - A @ C @ M, rtol=0, atol=1e-12)
    # a sum of chains (a decoupled head's content + rope blocks): every block telescoped
    Q, K, Qr, Kr = r(12, 4), r(4, 9), r(12, 2), r(2, 9)
    Kr2 = Kr + r(2, 9)
    d = form_change(Sum([Chain(Q, K), Chain(Qr, Kr)]), Sum([Chain(Q, K), Chain(Qr, Kr2)]))
    assert isinstance(d, Chain)  # only the rope key changed: one chain
    torch.testing.assert_close(torch.linalg.multi_dot(d.factors), Qr @ Kr2 - Qr @ Kr, rtol=0, atol=1e-12)
    assert form_change(Chain(A, C), Chain(A.clone(), C.clone())) is None  # no factor changed
    # blocks that share a factor (a 3-factor chain with two changed) have no independent-blocks null
    assert shares_factors(form_change(Chain(A, C, M), Chain(A2, C, M2)))
    assert not shares_factors(form_change(Chain(A, C), Chain(A2, C + r(4, 5))))


def test_an_mla_head_change_is_measured_but_not_counted(one_thread):
    """MLA heads are 3-factor chains: with noise in every weight the telescoped blocks share factors, the product
    null is not their law, so the rows give the change's spectrum (checked against the dense B_t − B_b) and no
    count, and say why."""
    from rankscope.nn import GPT, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, n_layer=1, d_model=32, n_head=2, max_seq_len=16, attention="mla_prerope",
                         kv_lora_rank=16)
    base, tuned = GPT(config), GPT(config)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() == 2:
                p.add_(SIGMA * torch.randn_like(p))
    df = diff(base, tuned, kinds=["qk"])
    assert (df["error"] == "").all() and df["dw_note"].str.startswith("not counted").all()
    assert df["dw_spikes"].isna().all() and df["dw_outliers"].isna().all()

    def dense(model):  # (d, d): head 1's form multiplied out
        (form,) = [f.form for f in model.attention_layers()[0].qk_chains() if f.head == 1]
        return sum(torch.linalg.multi_dot([x.double() for x in t]) if len(t) > 1 else t[0].double()
                   for t in form.terms())

    row = df[df["head_index"] == 1].iloc[0]
    sigma = torch.linalg.svdvals(dense(tuned) - dense(base))
    assert row["dw_lambda_max"] == pytest.approx(float(sigma[0] ** 2), rel=1e-8)
    assert row["dw_norm"] == pytest.approx(float(sigma.square().sum().sqrt()), rel=1e-8)


def test_top_subspaces_of_a_chain_match_a_dense_svd_and_rotate_by_theta():
    g = torch.Generator().manual_seed(1)
    n, m, k = 40, 30, 3
    A, C = torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(8, m, generator=g, dtype=torch.float64)
    U, V = top_singular_vectors(Chain(A, C), k)
    Ud, _, Vdh = torch.linalg.svd(A @ C)
    for X, Xd in ((U, Ud[:, :k]), (V, Vdh[:k].T)):  # the same subspaces: equal projectors
        torch.testing.assert_close(X @ X.T, Xd @ Xd.T, rtol=0, atol=1e-10)
    assert subspace_overlap(U, U) == pytest.approx(1.0, abs=1e-12)
    # rotate the top-k left subspace by θ towards orthogonal directions P: U_t = cos θ U + sin θ P
    P = torch.linalg.qr(torch.cat([U, torch.randn(n, k, generator=g, dtype=torch.float64)], 1)).Q[:, k:]
    for theta in (0.3, 0.9, math.pi / 2):
        R = rotation(n, U, P, theta)
        Ut, Vt = top_singular_vectors(Chain(R @ A, C), k)
        assert subspace_overlap(U, Ut) == pytest.approx(math.cos(theta) ** 2, abs=1e-9)
        assert subspace_overlap(V, Vt) == pytest.approx(1.0, abs=1e-9)  # the right singular vectors stay
    # and two independent random k-dim subspaces of ℝⁿ: E overlap = k/n (mean of 200 pairs, 5 standard errors)
    draws = [subspace_overlap(orthonormal(n, k, g), orthonormal(n, k, g)) for _ in range(200)]
    mean, se = float(torch.tensor(draws).mean()), float(torch.tensor(draws).std()) / math.sqrt(200)
    assert abs(mean - k / n) < 5 * se


# ---------------------------------------------------------------------------------------------- negative controls


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("diff") / "base"
    tiny(0).save_pretrained(path)
    return path


def test_a_model_against_itself_is_no_change(base_dir, one_thread):
    df = diff(str(base_dir), str(base_dir), fpr=FPR, k=2)
    assert (df["error"] == "").all() and not df["changed"].any()
    assert (df["dw_norm"] == 0).all() and (df["dw_spikes"] == 0).all() and (df["dw_outliers"] == 0).all()
    for col in ("spikes_change", "stable_rank_change", "effective_rank_change"):
        assert (df[col].fillna(0) == 0).all(), col
    # the same top-2 subspaces: overlap 1 (against k/n for random ones)
    assert df["overlap_left"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert df["overlap_right"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert (df["overlap_random_left"] == 2 / df["shapes"].str.split("·").str[0].astype(int)).all()
    # every matrix and every form: 9 matrices per layer... one row per (matrix or form, null)
    assert set(df["kind"]) >= {"qk", "ov", "attn_weight", "mlp_in", "mlp_out", "embedding"}
    assert len(df[df["head_index"] >= 0]) == 2 * 2 * HEADS  # 2 layers × (qk, ov) × heads


def test_independent_noise_in_every_weight_gives_spikes_at_the_fpr_only(base_dir, one_thread):
    """ΔW = σ·G, a fresh Gaussian in every matrix (three re-draws): a spectrum of the change with a spike is a false
    alarm, and their number must stay within the binomial (1 − 10⁻³) quantile at the fpr."""
    base = tiny(0)
    frames = []
    for draw in range(3):
        g = torch.Generator().manual_seed(100 + draw)
        tuned = changed(base, lambda name, p, _, g=g: SIGMA * torch.randn(p.shape, generator=g))
        frames.append(diff(base, tuned, fpr=FPR))
    df = frames[0]
    assert (df["error"] == "").all() and df["changed"].all()
    # an independent computation of one head's change: the dense ΔB_h = Wq_tᵀ Wk_t − Wq_bᵀ Wk_b, its largest σ²
    sb, st = base.state_dict(), tuned.state_dict()
    h = slice(DH, 2 * DH)  # head 1 of layer 0

    def B(s):  # (d, d)
        return s["model.layers.0.self_attn.q_proj.weight"][h].double().T @ s["model.layers.0.self_attn.k_proj.weight"][
            h].double()

    dense = torch.linalg.matrix_norm(B(st) - B(sb), ord=2) ** 2
    row = frames[2][(frames[2]["layer"] == 0) & (frames[2]["head_index"] == 1) & (frames[2]["kind"] == "qk")].iloc[0]
    assert row["dw_lambda_max"] == pytest.approx(float(dense), rel=1e-9)
    # the change of stable rank of a matrix, against a dense SVD of both
    s_b = torch.linalg.svdvals(sb[Q1].double()) ** 2
    s_t = torch.linalg.svdvals(st[Q1].double()) ** 2
    row = frames[2][frames[2]["name"] == Q1].iloc[0]
    assert row["stable_rank_change"] == pytest.approx(float(s_t.sum() / s_t[0] - s_b.sum() / s_b[0]), rel=1e-9)
    n = sum(len(f) for f in frames)
    bound = binom.ppf(1 - 1e-3, n, FPR)
    spiked = sum(int((f["dw_spikes"] > 0).sum()) for f in frames)
    outlying = sum(int((f["dw_outliers"] > 0).sum()) for f in frames)
    assert spiked <= bound and outlying <= bound, (spiked, outlying, n, bound)


# ---------------------------------------------------------------------------------------------- positive control


def test_a_planted_rank_2_change_is_found_where_it_was_planted(tmp_path, one_thread):
    """tuned = base + (σ·G + θ (u1 v1ᵀ + u2 v2ᵀ)) in layer 1's q_proj only, u_i in head 0's rows, θ six times the
    BBP threshold σ (n m)^{1/4}: ΔW has 2 spikes there, so do head 0's and the layer's qk form changes
    (ΔWq_hᵀ Wk: chains); head 1's change is noise; every other matrix is unchanged. At fpr 10⁻³ (four spectra
    decide; 0 failures in 20 seeds, against 1 in 12 at 10⁻² and 5 in 20 at 4× BBP, where the layer form's 32·32·32
    chain loses power)."""
    base = tiny(0)
    g = torch.Generator().manual_seed(7)
    n, m = HIDDEN, HIDDEN
    U = torch.zeros(n, 2)
    U[:DH] = orthonormal(DH, 2, g).float()  # rows of head 0
    V = orthonormal(m, 2, g).float()
    theta = 6 * SIGMA * (n * m) ** 0.25

    def planted(name, p, gen):
        return SIGMA * torch.randn(p.shape, generator=gen) + theta * U @ V.T if name == Q1 else None

    tuned = changed(base, planted)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    df = diff(str(tmp_path / "base"), str(tmp_path / "tuned"), fpr=0.001)
    assert (df["error"] == "").all()
    at = df.set_index(["name"])
    assert at.loc[Q1, "dw_spikes"] == 2
    qk1 = df[(df["layer"] == 1) & (df["kind"] == "qk")].set_index("head_index")
    assert qk1.loc[0, "dw_spikes"] == 2 and qk1.loc[-1, "dw_spikes"] == 2  # head 0 and the layer's form
    assert qk1.loc[1, "dw_spikes"] == 0  # head 1: only the noise of its rows
    elsewhere = df[(df["name"] != Q1) & ~((df["layer"] == 1) & (df["kind"] == "qk"))]
    assert not elsewhere["changed"].any() and (elsewhere["dw_spikes"] == 0).all()


def test_a_rotated_top_subspace_has_overlap_cos2_theta(tmp_path, one_thread):
    """The base's q_proj of layer 0 has 3 planted outliers; the tuned one is R·W with R turning the top-3 left
    singular vectors by θ: overlap_left = cos²θ (k = the base's 3 outliers), overlap_right = 1."""
    base = tiny(0)
    g = torch.Generator().manual_seed(3)
    name = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        W = base.get_parameter(name)
        Ub, Vb = orthonormal(HIDDEN, 3, g), orthonormal(HIDDEN, 3, g)
        W.add_((Ub @ torch.diag(torch.tensor([8.0, 6.0, 4.0], dtype=torch.float64)) @ Vb.T).float() * 0.02 * 8)
    w = base.get_parameter(name).detach().double()
    U3 = torch.linalg.svd(w)[0][:, :3]
    P = torch.linalg.qr(torch.cat([U3, torch.randn(HIDDEN, 3, generator=g, dtype=torch.float64)], 1)).Q[:, 3:]
    theta = 0.6
    R = rotation(HIDDEN, U3, P, theta)
    tuned = changed(base, lambda n_, p, _: (R @ p.double()).float() - p if n_ == name else None)
    df = diff(base, tuned, fpr=FPR, kinds=["weights"])
    row = df[df["name"] == name].iloc[0]
    assert row["base_outliers"] == 3 and row["overlap_k"] == 3
    assert row["overlap_left"] == pytest.approx(math.cos(theta) ** 2, abs=1e-5)  # float32 weights
    assert row["overlap_right"] == pytest.approx(1.0, abs=1e-5)
    assert row["overlap_random_left"] == pytest.approx(3 / HIDDEN)


# ---------------------------------------------------------------------------------------------- bad input


def test_different_shapes_name_the_matrix_and_both_shapes(tmp_path, base_dir):
    tiny(1, intermediate_size=48).save_pretrained(tmp_path / "wider")
    with pytest.raises(InputError, match=r"mlp\.(down|gate|up)_proj\.weight: shape \[\d+, \d+\] in the base .* but "
                                         r"\[\d+, \d+\] in the tuned"):
        diff(str(base_dir), str(tmp_path / "wider"))
    tiny(1, num_hidden_layers=1).save_pretrained(tmp_path / "shallow")
    with pytest.raises(InputError, match=r"model\.layers\.1\..*: in .* but not in .*shallow"):
        diff(str(base_dir), str(tmp_path / "shallow"))
    result = CliRunner().invoke(app, ["diff", str(base_dir), str(tmp_path / "wider")])
    assert result.exit_code == 2 and "in the tuned" in result.output, result.output
    result = CliRunner().invoke(app, ["diff", str(base_dir), str(base_dir), "--fpr", "2"])
    assert result.exit_code == 2 and "fpr" in result.output


def test_the_cli_writes_rows_and_figure(tmp_path, base_dir):
    tuned = tmp_path / "tuned"
    changed(tiny(0), noise).save_pretrained(tuned)  # tiny(0) is the base
    result = CliRunner().invoke(app, ["diff", str(base_dir), str(tuned), "--out", str(tmp_path / "out"),
                                      "--kinds", "qk,weights", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "What changed" in result.output and "Per-head form changes" in result.output
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "out" / "diff.parquet")
    assert set(rows["kind"]) == {"qk", "attn_weight", "embedding"} and rows["changed"].all()
    png = (tmp_path / "out" / "diff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_stacks_are_kept_apart_and_a_model_without_a_layout_says_so(tmp_path, monkeypatch):
    import transformers

    import rankscope.cli
    from rankscope.commands.diff import heads_table, matrices_table

    monkeypatch.setattr(rankscope.cli.console, "width", 200)
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    base = transformers.T5Model(cfg)
    df = diff(base, changed(base, noise), kinds=["qk"])
    heads = df[df["head_index"] >= 0]
    assert sorted(set(heads["stack"])) == ["cross", "decoder", "encoder"]
    assert heads.groupby("stack").size().tolist() == [2, 2, 2]  # two heads in each stack, never merged
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(heads_table(df))
    console.print(matrices_table(df))
    text = console.export_text()
    for stack in ("encoder", "decoder", "cross"):
        assert stack in text
    import copy

    plain = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 10))
    tuned = copy.deepcopy(plain)
    with torch.no_grad():
        tuned[0].weight.add_(SIGMA * torch.randn(30, 20))
    out = diff(plain, tuned)
    assert out.attrs["notes"] and "per-head attention forms need a layout" in out.attrs["notes"][0]
    with pytest.raises(InputError, match="cannot compare kinds qk"):
        diff(plain, plain, kinds=["qk"])
