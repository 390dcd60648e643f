"""Calibrate the finite-size part of the analytic two-factor edge (rankscope.spectra.product_edge).

For every aspect-ratio cell (u, v) = (log₂ k/n, log₂ m/n), n ≥ m, on the grid ``U × V`` and every rank
r = min(n, k, m) in ``RANKS``, simulates t = λ_max / median(λ) of the chain (n, k, m) with
``sampling.two_factor_spectra`` (exact in law), standardizes it, s = (t·median − λ₊)/σ with the limiting law's
median, edge and Tracy–Widom scale, and matches s ≈ α + β·TW₁ in mean and standard deviation. Per cell, α and
β − 1 are then fitted by least squares (weights: the draws) to the first two terms of their expansion in
x = r^{-1/3}: α = a₁x + a₂x², β = 1 + b₁x + b₂x² (both vanish as r → ∞, where s → TW₁). Writes
src/rankscope/spectra/data/product_edge.json: the grids, the fitted coefficients, and every raw estimate with
its dims, draws and seed.

Seeds: 0x5EED0000 + the run's index of (cell, rank); the tests and benchmarks/product_edge.py draw with others.

    .venv/bin/python benchmarks/calibrate_product_edge.py [--dry-run] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from rankscope.spectra import budget, product_edge
from rankscope.spectra.sampling import two_factor_spectra

U = tuple(range(-6, 3))  # log₂ k/n: a 64th of the width (a narrow head of a wide model) to 4× it
V = (-2, -1, 0)  # log₂ m/n with n ≥ m: a quarter to square
RANKS = (100, 200, 400)  # from budget.FIT_MIN_RANK on
DRAWS = {100: 2000, 200: 1500, 400: 800}
SEED_BASE = 0x5EED0000
OUT = Path(__file__).resolve().parents[1] / "src" / "rankscope" / "spectra" / "data" / "product_edge.json"


def dims_of(u: int, v: int, r: int) -> tuple[int, int, int]:
    """(n, k, m) with k/n ≈ 2^u, m/n ≈ 2^v and min(n, k, m) = r."""
    n = round(r / min(1.0, 2.0**u, 2.0**v))
    return n, round(n * 2.0**u), round(n * 2.0**v)


def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares of y on (x, x²), through the origin."""
    A = np.stack([x, x**2], axis=1) * np.sqrt(w)[:, None]
    return np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the cells and the cost model's seconds")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (the machine may be shared)")
    args = parser.parse_args()
    assert RANKS[0] >= budget.FIT_MIN_RANK
    jobs = [(u, v, r) for u in U for v in V for r in RANKS]
    if args.dry_run:
        total = sum(DRAWS[r] * budget.seconds_per_draw([dims_of(u, v, r)]) for u, v, r in jobs)
        print(f"{len(jobs)} (cell, rank) runs, ≈ {total / 60:.1f} min of one core by the cost model")
        return
    raw = []
    start = time.perf_counter()
    with threadpool_limits(args.threads):
        for index, (u, v, r) in enumerate(jobs):
            n, k, m = dims_of(u, v, r)
            draws, seed = DRAWS[r], SEED_BASE + index
            lam = two_factor_spectra(n, k, m, draws, seed).numpy()  # (draws, r)
            t = lam[:, 0] / np.median(lam, axis=1)
            alpha, beta = product_edge.calibrate(product_edge.standardized(t, n, k, m))
            raw.append({"u": u, "v": v, "rank": r, "dims": [n, k, m], "draws": draws, "seed": seed,
                        "alpha": alpha, "beta": beta})
            print(f"{n}·{k}·{m}: α {alpha:+.3f} β {beta:.3f} ({draws} draws, "
                  f"{time.perf_counter() - start:.0f} s so far)", flush=True)
    alpha_coef = np.zeros((len(U), len(V), 2))
    beta_coef = np.zeros((len(U), len(V), 2))
    for iu, u in enumerate(U):
        for iv, v in enumerate(V):
            rows = [e for e in raw if e["u"] == u and e["v"] == v]
            x = np.array([e["rank"] ** (-1 / 3) for e in rows])
            w = np.array([e["draws"] for e in rows], dtype=float)
            alpha_coef[iu, iv] = fit(x, np.array([e["alpha"] for e in rows]), w)
            beta_coef[iu, iv] = fit(x, np.array([e["beta"] - 1 for e in rows]), w)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "about": "finite-size correction of rankscope.spectra.product_edge, by benchmarks/calibrate_product_edge.py",
        "model": "alpha = a1 x + a2 x^2, beta = 1 + b1 x + b2 x^2, x = rank^(-1/3)",
        "u": list(U), "v": list(V), "ranks": list(RANKS),
        "alpha_coef": alpha_coef.round(6).tolist(), "beta_coef": beta_coef.round(6).tolist(),
        "raw": raw, "seconds": round(time.perf_counter() - start, 1),
    }, indent=1) + "\n")
    print(f"wrote {OUT} ({time.perf_counter() - start:.0f} s)")
    for iu, u in enumerate(U):
        for iv, v in enumerate(V):
            rows = [e for e in raw if e["u"] == u and e["v"] == v]
            resid = [e["beta"] - 1 - np.polyval([*beta_coef[iu, iv][::-1], 0], e["rank"] ** (-1 / 3)) for e in rows]
            print(f"u={u:+d} v={v:+d}: a={alpha_coef[iu, iv].round(2)} b={beta_coef[iu, iv].round(2)} "
                  f"β residuals {np.round(resid, 3)}")


if __name__ == "__main__":
    main()
