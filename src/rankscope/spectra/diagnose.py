"""``diagnose``: one spectrum, its null, its outliers, spikes and rank metrics, as a flat record.

Two counts of what stands above the noise (docs/design.md §5):

- ``outliers``: eigenvalues above the bulk edge of the null fitted to the *whole* spectrum by its median. Under the
  null a spectrum has any outlier with probability ≈ fpr. On a trained matrix the median moves up with the
  signal (masking) and a smoothly decaying bulk crosses the edge without any spike, so ``outliers`` says "not
  noise", not "how many spikes".
- ``spikes``: the sequential count against deflated nulls with a scale fitted to the lower quantiles, reported
  only where the bulk left after the spikes fits the null's shape (``sequential``); NaN otherwise. Defined for the
  structure-matched null; rows of the other nulls carry NaN.

``spikes_gap`` (Onatski's gap count) and the factors' excess kurtosis do not depend on the null. The false-positive
rates hold for Gaussian-like entries; ``null="permutation"`` is the check against heavy tails.

Every count and ratio is scale-free, so all of them are computed on the spectrum of the form scaled by powers of
two (``kernels.normalized``, exact); only the fields in eigenvalue units (eigenvalues, λ_max, scale, bulk edge, the
null's quantiles, the tail's xmin) are scaled back, and one that does not fit in float64 is an ``InputError``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra import budget, metrics, permutation
from rankscope.spectra.form import Form, Structure
from rankscope.spectra.kernels import prepare, restore, spectrum
from rankscope.spectra.nullcache import seed as shape_seed
from rankscope.spectra.nulls import NaiveMPNull, TracyWidomNull, median, product_null, sum_null
from rankscope.spectra.sequential import UNTESTED, SpikeCount, count_spikes
from rankscope.spectra.spikes import onatski_count
from rankscope.spectra.tail import power_law_fit
from rankscope.spectra.threads import thread_budget
from rankscope.vocab import MP, NULLS, PERMUTATION, PRODUCT, TW


@dataclass(frozen=True)
class Diagnosis:
    """The diagnosis of one spectrum. Field names are the store's row schema (see ``as_dict``)."""

    eigenvalues: torch.Tensor = field(repr=False)  # (r,) float64, descending
    n: int  # rows of the form
    m: int  # columns of the form
    rank: int  # structural rank r: the length of the spectrum
    null: str  # vocab.NULLS: product (structure-matched), mp (naive mean fit), tw (Tracy–Widom edge), permutation
    fpr: float  # false-positive rate of the outlier test
    lambda_max: float
    scale: float  # fitted null's mean eigenvalue (σ² of an MP law)
    bulk_edge: float  # eigenvalues above it are outliers
    outliers: int  # eigenvalues above the whole-spectrum null's edge: "not noise"
    spikes: float  # eigenvalues above this spectrum's own noise bulk (sequential); NaN where the bulk does not fit
    bulk_fits: bool | None  # the bulk left after the spikes fits the null's shape (None: not tested)
    bulk_stat: float  # Anderson–Darling A² of that bulk against the deflated null
    bulk_threshold: float  # A²'s (1 − fpr) quantile on pure noise of the same structure
    spikes_gap: float  # Onatski's (2010) gap count, a cross-check (NaN below 10 eigenvalues)
    outlier_energy: float  # Σ outlier λ / Σ λ
    spike_strength: float  # λ_max / bulk_edge (inf when the median, hence the bulk, is zero: low rank)
    mp_soft_rank: float  # bulk_edge / λ_max
    stable_rank: float  # Σλ / λ_max
    effective_rank: float  # exp(entropy of σ/Σσ)
    bulk_effective_rank: float  # effective rank of λ[spikes:], the eigenvalues below the spikes (NaN with spikes)
    participation_ratio: float  # (Σλ)² / Σλ²
    spectral_entropy: float  # −Σ p log p, p = λ/Σλ
    top_energy: float  # share of Σλ in the top k = ⌈r/10⌉ eigenvalues (0 for the zero form)
    ks: float  # KS distance between the bulk's empirical CDF and the fitted null
    pl_alpha: float  # power-law tail exponent (NaN below 10 positive or 4 distinct eigenvalues)
    pl_xmin: float  # where the power-law tail starts
    erank_vs_null: float  # effective rank / the structure-matched null's mean effective rank (1 = noise-like)
    top_energy_vs_null: float  # top_energy / the structure-matched null's mean top_energy (1 = noise-like, > 1:
    #   concentrated); NaN, like erank_vs_null, for the other nulls and spectra too small to count (r ≤ 4)
    excess_kurtosis: float  # the largest excess kurtosis of a factor's entries (0 for Gaussian entries)
    factor_kurtosis: tuple[float, ...] = field(default=(), repr=False)  # each factor's, in factor order (not a row)
    null_quantiles: np.ndarray | None = field(default=None, repr=False, compare=False)  # fitted null's λ quantiles

    def as_dict(self) -> dict:
        """Flat dict of every scalar field (not the eigenvalues, null quantiles or per-factor kurtosis): a row."""
        return {k: v for k, v in self.__dict__.items() if k not in ("eigenvalues", "null_quantiles", "factor_kurtosis")}

    def plot(self, ax=None, *, log: bool = True, title: str | None = None):
        """The ESD as a histogram with the bulk edge, the fitted null and the ``outliers`` marked, drawn on ``ax``
        (a new matplotlib figure when None); returns the Axes. ``log``: log λ axis (``spectra.plot.draw_esd``)."""
        from rankscope.spectra.plot import draw_esd

        return draw_esd(self, ax, log=log, title=title)


def _null_for(s: Structure, null: str, fpr: float, draws: int | None, norms: list[float] | None = None):
    draws = draws or budget.default_draws(s, fpr)
    if null == MP:
        return NaiveMPNull(q=s.rank_bound / max(s.n, s.m))
    if null == TW:
        if not s.is_matrix:
            raise InputError('null="tw" (Tracy–Widom edge) is defined for a single matrix, not a chain')
        return TracyWidomNull(s.n, s.m)
    if len(s.chains) > 1:
        return sum_null(s, norms, draws)
    return product_null(s, None, draws)


def _ks(bulk_ratio: np.ndarray, null) -> float:
    """sup |ECDF(bulk) − F_null| over the bulk's points (both sides of every step)."""
    if bulk_ratio.size == 0:
        return 0.0
    x = np.sort(bulk_ratio)
    F = null.cdf(x)
    i = np.arange(1, x.size + 1)
    return float(max(np.max(i / x.size - F), np.max(F - (i - 1) / x.size)))


def _diagnose_spectra(lam: torch.Tensor, n: int, m: int, null_objs: list, null: str, fpr: float,
                      shared: tuple[dict, list, list], counts: list[SpikeCount],
                      scale_back: tuple[torch.Tensor, torch.Tensor, str]) -> list[Diagnosis]:
    """Diagnoses of a batch of spectra λ̂ (B, r), each with its null; ``shared`` holds the null-free metrics.
    ``scale_back``: (λ (B, r), k (B,), name) with λ = λ̂·2^k, the spectra in the form's own units."""
    ref = median(lam) if null_objs[0].reference == "median" else lam.mean(-1)  # (B,)
    unique = {id(x): x for x in null_objs}  # heads of one shape share one null: compute its edge once
    edge_of = {k: x.edge_ratio(fpr) for k, x in unique.items()}
    mean_of = {k: x.mean_ratio for k, x in unique.items()}
    edge = ref * torch.tensor([edge_of[id(x)] for x in null_objs], dtype=torch.float64)  # (B,)
    scale = ref * torch.tensor([mean_of[id(x)] for x in null_objs], dtype=torch.float64)
    rank_cols, tails, per_spectrum = shared
    cols = {
        "outliers": metrics.outlier_count(lam, edge),
        "outlier_energy": metrics.outlier_energy(lam, edge),
        "spike_strength": metrics.spike_strength(lam, edge),
        "mp_soft_rank": metrics.mp_soft_rank(lam, edge),
        **rank_cols,
    }
    eigenvalues, k, name = scale_back
    out = []
    for b in range(lam.shape[0]):
        ev = lam[b]
        r0 = float(ref[b])
        bulk = ev[ev <= edge[b]].numpy()
        ks = _ks(bulk / r0, null_objs[b]) if r0 > 0 else 0.0
        c = counts[b]
        out.append(Diagnosis(
            eigenvalues=ev, n=n, m=m, rank=ev.numel(), null=null, fpr=fpr,
            lambda_max=float(ev[0]), scale=float(scale[b]), bulk_edge=float(edge[b]),
            **{k: (int(v[b]) if k == "outliers" else float(v[b])) for k, v in cols.items()},
            spikes=c.spikes, bulk_fits=c.bulk_fits, bulk_stat=c.bulk_stat, bulk_threshold=c.bulk_threshold,
            erank_vs_null=c.erank_vs_null, top_energy_vs_null=c.top_energy_vs_null,
            bulk_effective_rank=_bulk_effective_rank(ev, c.spikes), ks=ks, pl_alpha=tails[b].alpha,
            pl_xmin=tails[b].xmin,
            null_quantiles=r0 * null_objs[b].ratio_quantiles, **per_spectrum[b],
        ))
        out[-1] = _scaled_back(out[-1], eigenvalues[b], int(k[b]), name)
    return out


def _scaled_back(d: Diagnosis, eigenvalues: torch.Tensor, k: int, name: str) -> Diagnosis:
    """A diagnosis of λ̂ as one of λ = λ̂·2^k: the fields in eigenvalue units multiplied by 2^k (exact), the rest
    scale-free. ``InputError`` naming the form where one of them overflows float64."""

    overflow = InputError(f"{name}: the null's bulk edge, scale or quantiles overflow float64 (the spectrum "
                          f"reaches {float(eigenvalues[0]):.3g}); rescale the factors")

    def up(x: float) -> float:
        if x == 0 or not math.isfinite(x):
            return x
        try:
            return math.ldexp(x, k)
        except OverflowError:
            raise overflow from None

    quantiles = d.null_quantiles
    if quantiles is not None:
        with np.errstate(over="ignore"):
            quantiles = np.ldexp(np.asarray(quantiles, dtype=np.float64), k)
        if np.isinf(quantiles).any():
            raise overflow
    return replace(d, eigenvalues=eigenvalues, lambda_max=float(eigenvalues[0]), scale=up(d.scale),
                   bulk_edge=up(d.bulk_edge), pl_xmin=up(d.pl_xmin), null_quantiles=quantiles)


def _bulk_effective_rank(ev: torch.Tensor, spikes: float) -> float:
    """Effective rank of ``ev[spikes:]`` (descending): the eigenvalues below the spikes; NaN where spikes is NaN."""
    if math.isnan(spikes):
        return math.nan
    bulk = ev[int(spikes):]
    return float(metrics.effective_rank(bulk)) if bulk.numel() else 0.0


def excess_kurtosis(form: Form, batch: int) -> np.ndarray:
    """(batch, factors): E[(x − μ)⁴] / σ⁴ − 3 over each factor's entries (NaN for a constant factor)."""
    out = []
    for f in form.factor_list:
        x = f.reshape(f.shape[0] if f.ndim == 3 else 1, -1)  # (B or 1, entries), float64 already
        mean = x.mean(dim=1, keepdim=True)
        m2 = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        m4 = torch.zeros_like(m2)
        step = max(1, 2**16 // x.shape[0])  # in column chunks of 0.5 MB: a large matrix is not copied whole
        for lo in range(0, x.shape[1], step):
            c2 = (x[:, lo:lo + step] - mean).square_()
            m2 += c2.sum(dim=1)
            m4 += c2.square_().sum(dim=1)
        m2, m4 = m2 / x.shape[1], m4 / x.shape[1]
        k = torch.where(m2 > 0, m4 / torch.where(m2 > 0, m2, 1.0).square() - 3, torch.full_like(m2, math.nan))
        out.append(k.cpu().expand(batch))
    return torch.stack(out, dim=1).numpy()


def _shared_metrics(lam: torch.Tensor, form: Form) -> tuple[dict, list, list]:
    """The metrics that do not depend on the null: rank measures, the power-law tail, Onatski's gap count and the
    factors' kurtosis, per spectrum."""
    cols = {
        "stable_rank": metrics.stable_rank(lam),
        "effective_rank": metrics.effective_rank(lam),
        "participation_ratio": metrics.participation_ratio(lam),
        "spectral_entropy": metrics.spectral_entropy(lam),
        "top_energy": metrics.top_energy(lam),
    }
    kurt = excess_kurtosis(form, lam.shape[0])  # (B, F)
    lam_np = lam.numpy()
    per = [{"spikes_gap": onatski_count(lam_np[b]), "factor_kurtosis": tuple(float(v) for v in kurt[b]),
            "excess_kurtosis": float(np.nanmax(kurt[b])) if np.isfinite(kurt[b]).any() else math.nan}
           for b in range(lam.shape[0])]
    return cols, [power_law_fit(lam[b]) for b in range(lam.shape[0])], per



def _check_options(nulls: tuple[str, ...], fpr: float, draws: int | None) -> float:
    """The options checked before any work (``InputError`` naming the allowed values); returns fpr as a float."""
    for null in nulls:
        if not isinstance(null, str) or null not in NULLS:
            raise InputError(f"null must be one of {', '.join(NULLS)}; got {null!r}")
    budget.check_draws(draws)
    return budget.check_fpr(fpr)


@torch.no_grad()
def _diagnose_form(form: Form, exponent: torch.Tensor, nulls: tuple[str, ...], fpr: float, draws: int | None,
                   name: str) -> dict[str, list[Diagnosis]]:
    """Null → the diagnoses of a batch of forms 2^exponent·B̂ (``form`` is B̂, ``kernels.normalized``); the spectra and
    null-free metrics are computed once."""
    s = form.structure
    n, m = s.n, s.m
    try:
        lam, k = spectrum(form, name, scaled=True, normalized_already=True, remember=True)  # (B, r), (B,): λ = λ̂·2^k
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as exc:  # not expected of a rescaled form
        raise InputError(f"{name}: the eigensolver failed ({exc})") from None
    if lam.shape[0] == 0:
        return {null: [] for null in nulls}
    lam, k = lam.to("cpu"), (k + 2 * exponent.to(k.device)).to("cpu")
    eigenvalues = restore(lam, k, name)  # an overflow is refused here, before any null is drawn
    B = lam.shape[0]
    shared = _shared_metrics(lam, form)
    norms = form.block_norms().to("cpu").expand(B, len(s.chains)) if len(s.chains) > 1 else None  # (B, C)
    out = {}
    for null in nulls:
        counts = [UNTESTED] * B
        if null == PERMUTATION:
            n_draws = draws or permutation.default_draws(fpr)
            try:
                null_objs = [permutation.permutation_null(form[b], n_draws, shape_seed(s, b))
                             for b in range(B)]
            except InputError as exc:
                raise InputError(f"{name}: {exc}") from None
        elif norms is None or null == MP:
            null_objs = [_null_for(s, null, fpr, draws)] * B
        else:  # a sum of chains: the null depends on each spectrum's block-norm ratios
            null_objs = [_null_for(s, null, fpr, draws, row.tolist()) for row in norms]
        if null == PRODUCT:
            counts = count_spikes(lam.numpy(), s, None if norms is None else norms.numpy(), fpr, draws,
                                  shared[0]["effective_rank"].numpy(), shared[0]["top_energy"].numpy())
        out[null] = _diagnose_spectra(lam, n, m, null_objs, null, fpr, shared, counts, (eigenvalues, k, name))
    return out


def diagnose_nulls(form, nulls: tuple[str, ...], *, fpr: float = 0.01, name: str = "form", batched: bool = False,
                   draws: int | None = None, threads: int | None = None) -> dict[str, list[Diagnosis]]:
    """Null → diagnoses (a list: one per batch item, or one for an unbatched form), the spectrum computed once.

    What a training monitor wants: the same forms under the product null and the naive MP fit, side by side.
    ``threads``: None leaves the process's threads as they are; a count runs the call under
    ``thread_budget(torch=1, blas=threads)`` (restored after).
    """
    nulls = tuple(nulls)
    fpr = _check_options(nulls, fpr, draws)
    with nullcontext() if threads is None else thread_budget(torch=1, blas=threads):
        form, exponent = prepare(form, name=name, batched=batched, scaled=True)  # B = 2^exponent·B̂
        if form.batch is None:
            form = form.map(lambda f: f[None])
        return _diagnose_form(form, exponent, nulls, fpr, draws, name)


def diagnose_batch(form, *, null: str = PRODUCT, fpr: float = 0.01, name: str = "form",
                   draws: int | None = None, threads: int | None = None) -> list[Diagnosis]:
    """Diagnoses of a batch of forms of one shape: factors carry a leading batch axis (e.g. heads).

    A 2-D factor is shared by the whole batch (e.g. the decoupled rope key of DeepSeek-V2). ``threads``: as
    ``diagnose_nulls``'.
    """
    return diagnose_nulls(form, (null,), fpr=fpr, name=name, batched=True, draws=draws, threads=threads)[null]


def diagnose(form, *, null: str = PRODUCT, fpr: float = 0.01, name: str = "form",
             draws: int | None = None, threads: int | None = None) -> Diagnosis:
    """Diagnosis of a matrix W, a chain [A, C] (= A @ C) or a sum of chains [[A1, C1], [A2, C2]].

    ``null="product"`` (default): the structure-matched null (for a single matrix the MP law, with the
    exact finite-size law of λ_max/median). ``null="mp"``: the naive MP fit of papers (σ² = mean λ).
    ``null="tw"``: a single matrix's MP fit with Johnstone's Tracy–Widom edge. ``null="permutation"``: each
    (balanced) factor's entries shuffled, drawn for this form (robust to heavy-tailed entries).
    ``threads``: None (the default) leaves the process's threads as they are; a count runs the call on one torch
    thread and that many BLAS threads, restored after.
    """
    return diagnose_nulls(form, (null,), fpr=fpr, name=name, draws=draws, threads=threads)[null][0]
