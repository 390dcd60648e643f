"""Model collapse under recursive training, simulated against three closed forms; writes docs/model_collapse.png.

(a) OLS refit on its own labels (Dohmatob, Feng & Kempe 2024, isotropic case): generation k draws fresh X_k (T, d)
    ~ N(0, I), labels X_k ŵ_{k−1} + N(0, σ²) (ŵ_0 = w0), refits OLS. Then ŵ_n − w0 = Σ_k (X_kᵀX_k)⁻¹X_kᵀε_k, a sum of
    n uncorrelated terms with E‖·‖² = σ² Tr E[(XᵀX)⁻¹] = σ² d/(T−d−1) (inverse-Wishart mean), so the excess risk is
    E‖ŵ_n − w0‖² = n σ² d / (T − d − 1), exactly.
(b) Gaussian refit by MLE on T samples: T σ²_{n+1}/σ²_n ~ χ²_{T−1}, so log σ² is a random walk with
    E[log σ²_n] − log σ²_0 = n (ψ((T−1)/2) + log(2/T)) and variance n ψ'((T−1)/2).
(c) KDE resampling: the KDE of S_n (bandwidth h_n) has variance var_n + h_n² (var_n the 1/T variance of S_n). With
    Silverman's h_n = 1.06 s_n T^{−1/5} (s_n² the unbiased variance), E[s²_{n+1} | S_n] = g s²_n with
    g = (T−1)/T + 1.06² T^{−2/5}, so E[s²_n] = gⁿ σ²_0.

    PYTHONPATH=src python benchmarks/theory_model_collapse.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import digamma, polygamma


def ols_recursive(T: int = 40, d: int = 10, sigma: float = 1.0, generations: int = 10, repeats: int = 2000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, standard error, theory) of ‖ŵ_n − w0‖² for n = 1..generations."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(d)
    w = np.tile(w0, (repeats, 1))  # (R, d)
    risk = np.empty((generations, repeats))
    for n in range(generations):
        X = rng.standard_normal((repeats, T, d))
        y = np.einsum("rtd,rd->rt", X, w) + sigma * rng.standard_normal((repeats, T))
        w = np.linalg.solve(np.einsum("rtd,rte->rde", X, X), np.einsum("rtd,rt->rd", X, y)[..., None])[..., 0]
        risk[n] = ((w - w0) ** 2).sum(1)
    theory = np.arange(1, generations + 1) * sigma**2 * d / (T - d - 1)
    return risk.mean(1), risk.std(1, ddof=1) / np.sqrt(repeats), theory


def gaussian_refit(T: int = 20, generations: int = 30, repeats: int = 4000, seed: int = 1):
    """(mean, standard error, theory) of log σ²_n − log σ²_0 for n = 1..generations, sampling and refitting by MLE."""
    rng = np.random.default_rng(seed)
    mu, var = np.zeros(repeats), np.ones(repeats)
    logs = np.empty((generations, repeats))
    for n in range(generations):
        x = mu[:, None] + np.sqrt(var)[:, None] * rng.standard_normal((repeats, T))
        mu, var = x.mean(1), x.var(1)  # MLE
        logs[n] = np.log(var)
    theory = np.arange(1, generations + 1) * (digamma((T - 1) / 2) + np.log(2 / T))
    return logs.mean(1), logs.std(1, ddof=1) / np.sqrt(repeats), theory


def log_variance_spread(T: int, n: int) -> float:
    """Standard deviation of log σ²_n under (b): sqrt(n ψ'((T−1)/2))."""
    return float(np.sqrt(n * polygamma(1, (T - 1) / 2)))


def kde_resample(T: int = 50, generations: int = 20, repeats: int = 4000, seed: int = 2):
    """(mean, standard error, theory) of the unbiased sample variance s²_n, resampling from a Silverman KDE."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((repeats, T))  # generation 0, σ²_0 = 1
    s2 = np.empty((generations, repeats))
    for n in range(generations):
        h = 1.06 * x.std(1, ddof=1) * T ** (-0.2)  # (R,) Silverman's rule of thumb
        pick = rng.integers(0, T, (repeats, T))
        x = np.take_along_axis(x, pick, 1) + h[:, None] * rng.standard_normal((repeats, T))  # draw from the KDE
        s2[n] = x.var(1, ddof=1)
    g = (T - 1) / T + 1.06**2 * T ** (-0.4)
    theory = g ** np.arange(1, generations + 1)
    return s2.mean(1), s2.std(1, ddof=1) / np.sqrt(repeats), theory


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        (ols_recursive(), "(a) OLS on its own labels (T=40, d=10)", "excess risk ‖ŵ_n − w₀‖²", "n σ² d/(T−d−1)"),
        (gaussian_refit(), "(b) Gaussian MLE refit (T=20)", "E[log σ²_n]", "n(ψ((T−1)/2) + log(2/T))"),
        (kde_resample(), "(c) KDE resampling, Silverman h (T=50)", "E[s²_n]", "gⁿ, g = (T−1)/T + 1.06²T^(−2/5)"),
    ]
    for ax, ((mean, se, theory), title, ylabel, law) in zip(axes, panels, strict=True):
        n = np.arange(1, len(mean) + 1)
        ax.errorbar(n, mean, yerr=4 * se, fmt="o", ms=3, label="simulation (±4 SE)")
        ax.plot(n, theory, "-", label=law)
        ax.set(title=title, xlabel="generation n", ylabel=ylabel)
        ax.legend(fontsize=8)
        z = np.abs(mean - theory) / se
        print(f"{title}: max |simulation − theory| / SE = {z.max():.2f} over {len(n)} generations; "
              f"last: {mean[-1]:.4g} vs {theory[-1]:.4g}")
    fig.tight_layout()
    out = Path(__file__).resolve().parents[1] / "docs" / "model_collapse.png"
    fig.savefig(out, dpi=100)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
