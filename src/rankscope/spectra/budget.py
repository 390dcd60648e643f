"""How many draws a simulated null gets, and which estimator places its edge.

- A form of rank below ``FIT_MIN_RANK`` (a head, a narrow matrix): the empirical (1 − fpr) quantile of
  t = λ_max / median, from as many draws as ``EMPIRICAL_BUDGET`` seconds buy (at most ``MAX_DRAWS``, at least
  enough to put ``MIN_EXCEEDANCES`` draws above the edge).
- From rank ``FIT_MIN_RANK`` on (a layer's summed form, a wide matrix: a draw costs O(r³)): a Tracy–Widom fit,
  t ≈ a + b·TW₁, with a and b matched to the mean and standard deviation of ``FIT_DRAWS`` draws. The largest
  eigenvalue of every ensemble simulated here has TW₁ fluctuations at its soft edge (Johnstone 2001 for
  Wishart; Liu, Wang & Zhang 2016 for products of Gaussian matrices). The fitted quantile's standard error is
  ≈ 2.3/√draws standard deviations of t, against ≈ 4.3–4.7/√draws for the empirical quantile at fpr = 0.01, so
  ``FIT_DRAWS`` fitted draws are worth about four times as many counted. Below ``FIT_MIN_RANK`` the fit is
  biased low (the median's own noise is a larger part of t), hence the threshold; the README gives the
  measured realized rates (tests/test_nulls.py checks them).
- Only where ``FIT_DRAWS`` draws would cost more than ``FIT_BUDGET`` seconds are there fewer, down to
  ``MIN_DRAWS``.

The bound on every null: at most ``MAX_NULL_DRAWS`` draws. A counted edge at fpr needs ``MIN_EXCEEDANCES / fpr``
draws, and any form can need one (below ``FIT_MIN_RANK``, and the spike count's deflated steps and the permutation
null count at every rank), so fpr may not go below ``MIN_FPR`` = ``MIN_EXCEEDANCES / MAX_NULL_DRAWS``. At rank 99,
the widest counted null, 40,000 draws hold 32 MB per (draws, rank) array (about 300 MB at the peak of a simulation)
and took 15 s of one core (a 99×99 matrix). Smaller fpr would need an extrapolated tail instead of counted draws,
which nothing here calibrates: it is refused (``check_fpr``), not estimated.
"""

from __future__ import annotations

import itertools
import math
import numbers

from rankscope.errors import InputError
from rankscope.spectra.form import Structure

MIN_EXCEEDANCES = 4  # simulated t above the edge needed to place it by the empirical quantile
MAX_DRAWS = 2000  # an empirical edge: 20 draws above it at fpr 0.01
EMPIRICAL_BUDGET = 0.25  # seconds of one core for an empirical null (once per shape, then cached)
FIT_MIN_RANK = 100  # from this rank bound on, the edge comes from the Tracy–Widom fit
FIT_DRAWS = 256  # draws of a fitted null
FIT_BUDGET = 10.0  # seconds of one core at most for a fitted null, once per shape...
MIN_DRAWS = 64  # ...but never fewer draws than this
MAX_FPR = 0.5  # an edge below the median of λ_max/median is no outlier test
MIN_FPR = 1e-4  # the smallest fpr a counted edge can place within MAX_NULL_DRAWS
MAX_NULL_DRAWS = math.ceil(MIN_EXCEEDANCES / MIN_FPR)  # 40,000: the most draws of any one null


def fitted(structure) -> bool:
    """Whether the null of this structure places its edge by the Tracy–Widom fit (else by counting)."""
    return Structure.of(structure).rank_bound >= FIT_MIN_RANK


def seconds_per_draw(structure) -> float:
    """A rough cost model of one simulated spectrum on one core (coefficients from benchmarks/spectra.py):
    a p-wide tridiagonal eigensolve for a matrix, one p-wide eigensolve for a two-factor chain, products and a
    K-wide core eigensolve for anything else."""
    s = Structure.of(structure)
    if s.is_matrix:
        return 2e-5 + 1.3e-8 * min(s.chains[0]) ** 2
    if s.is_chain and len(s.chains[0]) == 3:
        n, k, m = s.chains[0]
        p = min(n, k)
        return 6e-5 + 1.2e-10 * p * min(p, m) ** 2
    k = max(sum(d[1] for d in s.chains), sum(d[-2] for d in s.chains), 1)
    inner = sum(a * b * max(d[1:-1] or (1,)) for d in s.chains for a, b in itertools.pairwise(d[1:-1]))
    shared = sum(a * b * k for dims in (s.left, s.right) for a, b in itertools.pairwise(dims))
    return 2e-5 + 5e-10 * (k**3 + inner + shared)


def default_draws(structure, fpr: float = 0.01) -> int:
    """Draws for a null: below rank ``FIT_MIN_RANK``, what ``EMPIRICAL_BUDGET`` buys up to ``MAX_DRAWS`` but
    never fewer than ``MIN_EXCEEDANCES / fpr``; from it on, ``FIT_DRAWS``, fewer (down to ``MIN_DRAWS``) only
    where they would cost more than ``FIT_BUDGET``."""
    per = seconds_per_draw(structure)
    if not fitted(structure):
        return max(math.ceil(MIN_EXCEEDANCES / fpr), min(MAX_DRAWS, int(EMPIRICAL_BUDGET / per)))
    return max(MIN_DRAWS, min(FIT_DRAWS, int(FIT_BUDGET / per)))


def check_fpr(fpr) -> float:
    """fpr as a float, or ``InputError`` saying the allowed range: a real number in (0, ``MAX_FPR``], and at least
    ``MIN_FPR`` (the smallest whose edge ``MAX_NULL_DRAWS`` draws can place)."""
    if isinstance(fpr, bool) or not isinstance(fpr, numbers.Real) or not 0 < fpr <= MAX_FPR:
        raise InputError(f"fpr must be a number in (0, {MAX_FPR}], the outlier test's false-positive rate; got {fpr!r}")
    if fpr < MIN_FPR:
        raise InputError(f"fpr={float(fpr):g} is below {MIN_FPR:g}, the smallest fpr allowed: an edge at fpr needs "
                         f"{MIN_EXCEEDANCES}/fpr = {math.ceil(MIN_EXCEEDANCES / fpr):,} null draws, and a null may "
                         f"hold at most {MAX_NULL_DRAWS:,} (its memory and time budget)")
    return float(fpr)


def check_draws(draws) -> None:
    """``InputError`` unless draws is None (the default for each null) or a count in [1, ``MAX_NULL_DRAWS``]."""
    if draws is None:
        return
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral) or not 1 <= draws <= MAX_NULL_DRAWS:
        raise InputError(f"draws must be a whole number of null draws in [1, {MAX_NULL_DRAWS:,}] (the memory and "
                         f"time budget of a null), or None for the default; got {draws!r}")
