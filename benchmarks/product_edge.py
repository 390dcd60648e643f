"""The analytic two-factor edge (rankscope.spectra.product_edge) against each shape's own simulation.

Per shape: ``draws`` fresh draws of t = λ_max / median (sampling.two_factor_spectra, exact in law; seeds
0xBE4C0000 + i, unlike the calibration's), and the analytic edge at fpr 1 %:

- counted: the share of simulated t above the edge (± its binomial standard error);
- TW-implied: the tail of the moment-matched a + b·TW₁ of the same draws above the edge (± a bootstrap standard
  error), the estimate that still means something with a few dozen draws of a costly shape;
- the edge's distance from the simulation's own fitted edge (nulls.tracy_widom_fit_quantile), in sd of t.

The target band is [0.7 %, 1.4 %]. Times: the analytic edge cold (its law's caches cleared), and the simulated
null at the default draws (budget.default_draws × the measured seconds a draw), one BLAS thread.

    .venv/bin/python benchmarks/product_edge.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from rankscope.spectra import budget, laws, nulls, product_edge
from rankscope.spectra.sampling import two_factor_spectra

FPR = 0.01
BAND = (0.007, 0.014)
SEED_BASE = 0xBE4C0000
SHAPES = [  # (n, k, m), draws
    ((384, 32, 384), 4000),  # a MiniLM head: rank 32, below FIT_MIN_RANK (simulated, counted)
    ((2048, 128, 2048), 4000),
    ((4096, 128, 4096), 4000),  # a LLaMA-7B head
    ((1024, 256, 1024), 2000),
    ((4096, 512, 4096), 600),  # a GQA layer form (8 kv heads of 64)
    ((4096, 1024, 4096), 300),  # a GQA layer form (8 kv heads of 128)
    ((768, 768, 768), 800),  # a GPT-2 layer form
    ((2048, 2048, 2048), 120),
    ((4096, 4096, 4096), 12),  # a LLaMA-7B layer form
    ((3072, 768, 768), 400),  # rectangular outer dims
    ((1500, 300, 600), 2000),  # off the grid's points
]


def tw_tail(t: np.ndarray, edge: float) -> float:
    """P(a + b·TW₁ > edge) for a, b matching the mean and sd of t."""
    b = float(np.std(t, ddof=1)) / laws.TW1_SD
    s = (edge - float(np.mean(t))) / b + laws.TW1_MEAN
    return 1.0 - laws.tracy_widom1_cdf(s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every shape's draws")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'shape':>16} {'draws':>6} {'source':>9} {'counted %':>13} {'TW-implied %':>14} {'Δ edge/sd':>10} "
          f"{'in band':>8} {'analytic s':>11} {'simulated s':>12}")
    with threadpool_limits(1):
        for index, (dims, draws) in enumerate(SHAPES):
            draws = max(8, round(draws * args.scale))
            start = time.perf_counter()
            lam = two_factor_spectra(*dims, draws, SEED_BASE + index)  # (draws, r)
            per_draw = (time.perf_counter() - start) / draws
            t = (lam[:, 0] / nulls.median(lam)).numpy()
            covered = budget.fitted([dims]) and product_edge.covers(*dims)
            product_edge.product_law.cache_clear()
            start = time.perf_counter()
            if covered:
                edge, source = product_edge.edge_ratio(*dims, FPR), "analytic"
            else:  # what the null does here: the (counted) quantile of its own draws
                edge, source = nulls.upper_quantile(np.sort(t), FPR, budget.fitted([dims])), "simulated"
            analytic_s = time.perf_counter() - start
            counted = float((t > edge).mean())
            counted_se = math.sqrt(FPR * (1 - FPR) / draws)
            implied = tw_tail(t, edge)
            boot = [tw_tail(t[rng.integers(0, draws, draws)], edge) for _ in range(200)]
            fitted_edge = nulls.tracy_widom_fit_quantile(t, 1 - FPR)
            shift = (edge - fitted_edge) / float(t.std(ddof=1))
            ok = "yes" if BAND[0] <= implied <= BAND[1] else "NO"
            shape = "·".join(map(str, dims))
            print(f"{shape:>16} {draws:>6} {source:>9} {100 * counted:>6.2f} ± {100 * counted_se:<4.2f} "
                  f"{100 * implied:>7.2f} ± {100 * float(np.std(boot)):<4.2f} {shift:>+10.3f} {ok:>8} "
                  f"{analytic_s:>11.4f} {per_draw * budget.default_draws([dims]):>12.1f}", flush=True)


if __name__ == "__main__":
    main()
