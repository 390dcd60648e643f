"""Chain spectra against dense SVDs of the multiplied-out forms; the form type's algebra and stacking."""

import itertools

import numpy as np
import pytest
import torch

from formtools import multiplied_out
from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Structure, Sum, stack
from rankscope.spectra.kernels import prepare, spectrum


def as_form(x, batched=False):
    return prepare(x, batched=batched)


def dense(B: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svdvals(B.double())[..., :r].square()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "dims",
    [(96, 16, 80), (40, 64, 50), (128, 32, 12, 128), (64, 8, 48, 20, 70), (30, 50, 40, 60)],
)
def test_chain_spectrum_equals_dense_svd(dims):
    factors = [rand(a, b, seed=i) for i, (a, b) in enumerate(itertools.pairwise(dims))]
    B = factors[0]
    for f in factors[1:]:
        B = B @ f
    r = min(dims)
    lam = spectrum(as_form(factors))
    assert lam.shape == (r,)
    torch.testing.assert_close(lam, dense(B, r), rtol=1e-10, atol=1e-10 * float(lam[0]))


def test_batched_heads_with_a_shared_factor_equal_dense():
    H, d, dh, dc = 5, 72, 8, 24
    q, uk, dkv = rand(H, d, dh, seed=1), rand(H, dh, dc, seed=2), rand(dc, d, seed=3)  # dkv shared
    lam = spectrum(as_form([q, uk, dkv], batched=True))
    B = q @ uk @ dkv  # (H, d, d)
    torch.testing.assert_close(lam, dense(B, dh), rtol=1e-10, atol=1e-9)


def test_sum_of_chains_equals_dense():
    d, dh, dc, dr = 60, 8, 16, 4
    content = [rand(d, dh, seed=4), rand(dh, dc, seed=5), rand(dc, d, seed=6)]
    rope = [rand(d, dr, seed=7) * 10, rand(dr, d, seed=8)]
    B = content[0] @ content[1] @ content[2] + rope[0] @ rope[1]
    form = as_form([content, rope])
    torch.testing.assert_close(spectrum(form), dense(B, dh + dr), rtol=1e-10, atol=1e-8)
    norms = form.block_norms()
    expected = [torch.linalg.matrix_norm(content[0] @ content[1] @ content[2]),
                torch.linalg.matrix_norm(rope[0] @ rope[1])]
    torch.testing.assert_close(norms, torch.stack(expected), rtol=1e-10, atol=0)


def test_float32_input_is_computed_in_float64_and_matches_numpy():
    A = rand(50, 6, seed=9).float()
    C = rand(6, 40, seed=10).float()
    lam = spectrum(as_form([A, C]))
    assert lam.dtype == torch.float64
    ref = np.linalg.svd(A.double().numpy() @ C.double().numpy(), compute_uv=False)[:6] ** 2
    np.testing.assert_allclose(lam.numpy(), ref, rtol=1e-10)


def test_rank_deficient_chain_has_exact_zeros():
    A = rand(30, 5, seed=11)
    A[:, 3:] = 0  # rank 3
    lam = spectrum(as_form([A, rand(5, 30, seed=12)]))
    assert lam.shape == (5,) and (lam[3:] == 0).all() and (lam[:3] > 0).all()


def test_a_sum_with_a_shared_left_factor_equals_dense_and_its_rank_is_capped_by_it():
    # a decoupled head with compressed queries: Wdqᵀ · (Wuqᵀ Wuk Wdkv + Wqrᵀ Wkr); with dq below dn + dr the
    # rank is dq, and the spectrum has dq eigenvalues, not dn + dr with the rest exact zeros
    d, dn, dc, dr = 50, 12, 16, 8
    for dq in (40, 14):
        left = Chain(rand(d, dq, seed=20), shared={0})
        content, rope = Chain(rand(dq, dn, seed=21), rand(dn, dc, seed=22), rand(dc, d, seed=23)), \
            Chain(rand(dq, dr, seed=24), rand(dr, d, seed=25))
        form = left @ Sum([content, rope])
        assert isinstance(form, Sum) and form.rank_bound == min(dq, dn + dr)
        assert str(form.structure) == f"{d}·({dq}·{dn}·{dc}·{d} + {dq}·{dr}·{d})"
        B = left.factors[0] @ (content.factors[0] @ content.factors[1] @ content.factors[2]
                               + rope.factors[0] @ rope.factors[1])
        lam = spectrum(prepare(form))
        assert lam.shape == (min(dq, dn + dr),)
        torch.testing.assert_close(lam, dense(B, lam.shape[0]), rtol=1e-10, atol=1e-10 * float(lam[0]))
        norms = prepare(form).block_norms()
        want = torch.stack([torch.linalg.matrix_norm(t) for t in
                            (left.factors[0] @ content.factors[0] @ content.factors[1] @ content.factors[2],
                             left.factors[0] @ rope.factors[0] @ rope.factors[1])])
        torch.testing.assert_close(norms, want, rtol=1e-10, atol=0)


def test_stack_keeps_declared_shared_factors_2d_and_the_batch_equals_the_heads():
    H, d, dh, dc = 4, 30, 6, 10
    latent = rand(dc, d, seed=30)
    heads = [Chain(rand(d, dh, seed=31 + h), rand(dh, dc, seed=41 + h), latent.clone(), shared={2})
             for h in range(H)]  # a copy per head: sharing is declared, not read from object identity
    batched = stack(heads)
    assert [f.ndim for f in batched.factors] == [3, 3, 2] and batched.batch == H
    lam = spectrum(prepare(batched, batched=True))
    for h in range(H):
        torch.testing.assert_close(lam[h], dense(multiplied_out(heads[h]), dh), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(multiplied_out(batched[h]), multiplied_out(heads[h]))
    # conversions keep the declaration, so a .double() or .to() makes no stacked copy either
    assert [f.ndim for f in stack([c.to(torch.float32) for c in heads]).factors] == [3, 3, 2]
    with pytest.raises(InputError, match="different shared"):
        stack([heads[0], Chain(*heads[1].factors)])
    with pytest.raises(InputError, match="different structure"):
        stack([heads[0], Chain(rand(d, dh + 1, seed=1), rand(dh + 1, d, seed=2))])


def test_form_algebra_and_the_older_spellings():
    A, C, D = rand(8, 3, seed=50), rand(3, 9, seed=51), rand(9, 5, seed=52)
    chain = Chain(A) @ C @ D  # Chain @ tensor, twice
    assert chain.structure == Structure(((8, 3, 9, 5),)) and chain.rank_bound == 3
    torch.testing.assert_close(multiplied_out(chain), A @ C @ D)
    summed = Chain(A, C) + Chain(rand(8, 2, seed=53), rand(2, 9, seed=54))
    assert isinstance(summed, Sum) and summed.rank_bound == 5
    torch.testing.assert_close(multiplied_out(summed @ D), multiplied_out(summed) @ D)  # a shared right factor
    assert Form.of(A).structure.is_matrix
    assert Form.of([A, C]).structure == Structure(((8, 3, 9),))
    assert Form.of([[A, C], [rand(8, 4, seed=55), rand(4, 9, seed=56)]]).rank_bound == 7
    with pytest.raises(InputError, match="does not multiply"):
        Form.of([A, D], name="bad")
    with pytest.raises(InputError, match="one shape"):
        Form.of([[A, C], [A, rand(3, 4, seed=57)]])
    with pytest.raises(AttributeError, match="immutable"):
        chain.factors = ()


def test_numpy_arrays_compose_with_forms_from_either_side():
    A, C = np.ones((3, 4)), rand(4, 5, seed=60)
    assert (A @ Chain(C)).structure == Structure(((3, 4, 5),))
    assert (Chain(C.T) @ A.T).structure == Structure(((5, 4, 3),))
