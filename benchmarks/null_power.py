"""Benchmark: what each count says on noise, on planted spikes and on spike-free decay, and what it costs.

Tables, one run, every row simulated here from full Gaussian (or Student-t) factors:

1. Calibration on pure noise (rate of spectra with any flag; nominal = --fpr): ``outliers`` (the whole-spectrum
   median fit), ``spikes`` (sequential, a NaN counts as no spike), ``spikes_gap`` (Onatski), the permutation null's
   ``outliers``, and how often the bulk check fails (spikes then NaN).
2. Power on planted spikes (head forms A C whose first s inner dimensions carry u_i v_iᵀ at ``strength`` × the
   noise λ_max): mean count and share of trials counting exactly s.
3. Spike-free spectra: products with inner variances ∝ i^−β and a gapless power law: mean outliers, the share
   whose bulk does not fit (spikes NaN), mean spikes where reported, mean spikes_gap.
4. Cost per 144 GPT-2-small-shaped heads (12 layers × 12 heads, 768·64·768), nulls warm: today's outlier-only
   pass (the spike count, gap count and kurtosis switched off) against the full diagnosis, and the permutation null.

Run:  .venv/bin/python benchmarks/null_power.py [--trials 1000] [--fpr 0.01] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import rankscope as rs
from rankscope.spectra.form import Chain, Sum

D = 160


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


NOISE = {  # name → (form maker, trials factor, structure note)
    "matrix 120×60": lambda g, T: randn(g, T, 120, 60),
    "head 160·32·160": lambda g, T: [randn(g, T, D, 32), randn(g, T, 32, D)],
    "MLA chain 160·16·48·160": lambda g, T: [randn(g, T, D, 16), randn(g, T, 16, 48), randn(g, T, 48, D)],
    "decoupled sum (160·16·48·160 + 160·8·160)": lambda g, T: [
        [randn(g, T, D, 16), randn(g, T, 16, 48), randn(g, T, 48, D)], [3 * randn(g, T, D, 8), randn(g, T, 8, D)]],
    "GQA layer 160·16·160 (2 KV groups of 8)": lambda g, T: [randn(g, T, D, 16), randn(g, T, 16, D)],
    "shared Wdq, dq 40 (rank 24)": lambda g, T: _shared(g, T, 40),
    "shared Wdq, dq 20 (rank 20)": lambda g, T: _shared(g, T, 20),
    "layer 160·160·160 (fitted edge)": lambda g, T: [randn(g, T, D, D), randn(g, T, D, D)],
    "Student-t₅ head 100·20·100": lambda g, T: _student(int(g.initial_seed()), T),
}


def _student(seed, T):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_t(5, (T, 100, 20))), torch.from_numpy(rng.standard_t(5, (T, 20, 100)))]


def _shared(g, T, dq):
    return Chain(randn(g, T, D, dq)) @ Sum([Chain(randn(g, T, dq, 16), randn(g, T, 16, 48), randn(g, T, 48, D)),
                                            Chain(randn(g, T, dq, 8), randn(g, T, 8, D))])


def _rate(values) -> float:
    return float(np.mean(values))


def calibration(trials: int, fpr: float, permutation_trials: int) -> None:
    print(f"\n== 1. Calibration on pure noise: share of spectra flagged (nominal {fpr:.3f}) ==")
    print(f"  {'noise':<44} {'outliers':>9} {'spikes':>9} {'gap':>9} {'perm.':>9} {'bulk fails':>11}  trials")
    for i, (name, make) in enumerate(NOISE.items()):
        T = trials // 4 if "fitted" in name else trials
        form = make(torch.Generator().manual_seed(100 + i), T)
        t0 = time.perf_counter()
        ds = rs.diagnose_batch(form, fpr=fpr)
        perm = "-"
        if permutation_trials and ("head" in name):
            sub = form[:permutation_trials] if isinstance(form, Chain | Sum) else [f[:permutation_trials] for f in form]
            pd = rs.diagnose_batch(sub, fpr=fpr, null="permutation")
            perm = f"{_rate([d.outliers > 0 for d in pd]):.4f}"
        fails, seconds = _rate([d.bulk_fits is False for d in ds]), time.perf_counter() - t0
        print(f"  {name:<44} {_rate([d.outliers > 0 for d in ds]):9.4f} {_rate([d.spikes > 0 for d in ds]):9.4f} "
              f"{_rate([d.spikes_gap > 0 for d in ds]):9.4f} {perm:>9} {fails:11.4f}  {T} ({seconds:.1f} s)")


def _planted(g, T, n, h, m, spikes, strength, lam_noise):
    A, C = randn(g, T, n, h), randn(g, T, h, m)
    U, V = torch.linalg.qr(randn(g, T, n, spikes)).Q, torch.linalg.qr(randn(g, T, m, spikes)).Q
    A[:, :, :spikes] = U * math.sqrt(strength * lam_noise)
    C[:, :spikes, :] = V.mT
    return [A, C]


def power(trials: int, fpr: float, permutation_trials: int) -> None:
    print(f"\n== 2. Power on planted spikes (head 200·40·200, fpr {fpr}): mean count [share exact] ==")
    n, h, m = 200, 40, 200
    g = torch.Generator().manual_seed(7)
    lam_noise = float(np.mean([d.lambda_max for d in rs.diagnose_batch([randn(g, 500, n, h), randn(g, 500, h, m)])]))
    print(f"  {'planted':<28} {'outliers':>16} {'spikes':>16} {'gap':>16} {'perm. outliers':>16}")
    for spikes, strength in [(4, 1.2), (12, 1.5), (12, 10.0), (20, 1.5), (20, 10.0)]:
        form = _planted(g, trials, n, h, m, spikes, strength, lam_noise)
        ds = rs.diagnose_batch(form, fpr=fpr)

        def cell(values, spikes=spikes):
            v = np.asarray(values, dtype=float)
            return f"{np.nanmean(v):6.2f} [{np.mean(v == spikes):.3f}]"

        perm = "-"
        if permutation_trials:
            pd = rs.diagnose_batch([f[:permutation_trials] for f in form], fpr=fpr, null="permutation")
            perm = cell([d.outliers for d in pd])
        label = f"{spikes} ({spikes / h:.0%} of rank) at {strength}×"
        print(f"  {label:<28} {cell([d.outliers for d in ds]):>16} {cell([d.spikes for d in ds]):>16} "
              f"{cell([d.spikes_gap for d in ds]):>16} {perm:>16}")


def spike_free(trials: int, fpr: float) -> None:
    print(f"\n== 3. No spike at all (fpr {fpr}) ==")
    print(f"  {'spectrum':<44} {'outliers':>9} {'bulk fails':>11} {'spikes where reported':>22} {'gap':>7}")
    g = torch.Generator().manual_seed(9)
    rows = []
    for n, h in [(200, 40), (256, 48), (768, 64)]:
        for beta in (0.5, 1.0, 2.0):
            scale = torch.arange(1, h + 1, dtype=torch.float64) ** (-beta / 2)
            T = trials if n < 768 else max(20, trials // 5)
            rows.append((f"inner variances ∝ i^−{beta}, {n}·{h}·{n}", [randn(g, T, n, h) * scale, randn(g, T, h, n)]))
    n, h, T = 200, 40, max(20, trials // 5)
    lam = torch.arange(1, h + 1, dtype=torch.float64) ** -1.5
    U, V = torch.linalg.qr(randn(g, T, n, h)).Q, torch.linalg.qr(randn(g, T, n, h)).Q
    rows.append((f"gapless power law λ_i = i^−1.5, {n}·{h}·{n}", [U * lam.sqrt(), V.mT]))
    for name, form in rows:
        ds = rs.diagnose_batch(form, fpr=fpr)
        spikes = np.array([d.spikes for d in ds])
        shown = f"{np.nanmean(spikes):.2f} ({np.mean(~np.isnan(spikes)):.0%})" if (~np.isnan(spikes)).any() else "-"
        fails = _rate([d.bulk_fits is False for d in ds])
        print(f"  {name:<44} {np.mean([d.outliers for d in ds]):9.2f} {fails:11.3f} "
              f"{shown:>22} {np.nanmean([d.spikes_gap for d in ds]):7.2f}")


def cost(repeats: int, permutation_heads: int) -> None:
    print("\n== 4. Cost: 144 GPT-2-small-shaped heads (12 layers × 12 heads, 768·64·768), nulls warm, 1 thread ==")
    dg = importlib.import_module("rankscope.spectra.diagnose")
    g = torch.Generator().manual_seed(0)
    layers = [(randn(g, 12, 768, 64) * 0.02, randn(g, 12, 64, 768) * 0.02) for _ in range(12)]

    def run():
        return [rs.diagnose_batch([q, k]) for q, k in layers]

    def best(fn):
        fn()  # warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    full = best(run)
    saved = dg.count_spikes, dg.onatski_count, dg.excess_kurtosis
    dg.count_spikes = lambda lam, *a, **k: [dg._NOT_COUNTED] * lam.shape[0]
    dg.onatski_count = lambda lam: math.nan
    dg.excess_kurtosis = lambda form, batch: np.zeros((batch, len(form.factor_list)))
    try:
        base = best(run)
    finally:
        dg.count_spikes, dg.onatski_count, dg.excess_kurtosis = saved
    print(f"  outliers only (spike count, gap count and kurtosis off): {base:.3f} s")
    print(f"  full diagnosis (outliers, spikes, bulk check, gap, kurtosis): {full:.3f} s   "
          f"ratio {full / base:.2f}× (target ≤ 2×): {'MET' if full / base <= 2 else 'NOT MET'}")
    if permutation_heads:
        q, k = layers[0]
        t0 = time.perf_counter()
        rs.diagnose_batch([q[:permutation_heads], k[:permutation_heads]], null="permutation")
        per = (time.perf_counter() - t0) / permutation_heads
        print(f"  permutation null: {per:.3f} s a head ({permutation_heads} measured) → {144 * per:.1f} s for 144 "
              f"heads ({144 * per / full:.0f}× the full diagnosis)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="200 trials, fewer permutation draws")
    args = p.parse_args()
    trials = 200 if args.quick else args.trials
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    print(f"rankscope {rs.__version__}, torch {torch.__version__}, 1 thread; load average "
          "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    t0 = time.perf_counter()
    calibration(trials, args.fpr, permutation_trials=min(trials, 100 if args.quick else 300))
    power(min(trials, 300), args.fpr, permutation_trials=30 if args.quick else 60)
    spike_free(min(trials, 300), args.fpr)
    cost(repeats=3, permutation_heads=2 if args.quick else 6)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
