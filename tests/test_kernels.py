"""Chain spectra against dense SVDs of the multiplied-out forms."""

import itertools

import numpy as np
import pytest
import torch

from rankscope.spectra.kernels import as_form, block_norms, spectrum


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
    norms = block_norms(form)
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
