"""Effective dimension of random ReLU networks: the claim E[EDim(ℓ)] = m[1 − (1 − 2/π)^ℓ] for the m×n post-ReLU
feature matrix at depth ℓ, put beside measurements of its rank and its entropy effective rank (Roy & Vetterli);
writes docs/relu_edim.png.

Network: input X₀ (m, n) with i.i.d. N(0, 1) entries (n samples as columns), H_ℓ = ReLU(W_ℓ H_{ℓ−1}), W_ℓ (m, m)
i.i.d. N(0, 2/m) (He initialisation). Averages over seeds.

    PYTHONPATH=src python benchmarks/theory_relu_edim.py
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rankscope.spectra.metrics import effective_rank


def claimed_edim(m: int, depth: int) -> float:
    """The claim under test: m[1 − (1 − 2/π)^ℓ]."""
    return m * (1 - (1 - 2 / math.pi) ** depth)


def relu_features(m: int, n: int, depth: int, seed: int) -> list[torch.Tensor]:
    """Post-ReLU feature matrices H_1..H_depth, each (m, n), float64."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(m, n, generator=g, dtype=torch.float64)  # (m, n)
    out = []
    for _ in range(depth):
        W = torch.randn(m, m, generator=g, dtype=torch.float64) * math.sqrt(2 / m)
        H = torch.relu(W @ H)
        out.append(H)
    return out


def measure(H: torch.Tensor) -> tuple[int, float]:
    """(numerical rank, entropy effective rank exp(H(σ/Σσ))) of a feature matrix (m, n)."""
    rank = int(torch.linalg.matrix_rank(H))  # tolerance σ_max · max(m, n) · eps, as numpy.linalg.matrix_rank
    lam = torch.linalg.svdvals(H).square()
    return rank, float(effective_rank(lam))


def sweep(widths=(32, 64, 128), n: int = 256, depth: int = 12, seeds: int = 3) -> dict[int, dict[str, list[float]]]:
    """Per width: mean rank, mean effective rank and the claimed EDim at depths 1..depth."""
    out = {}
    for m in widths:
        ranks = torch.zeros(depth, dtype=torch.float64)
        eranks = torch.zeros(depth, dtype=torch.float64)
        for s in range(seeds):
            for ell, H in enumerate(relu_features(m, n, depth, seed=s)):
                r, e = measure(H)
                ranks[ell] += r / seeds
                eranks[ell] += e / seeds
        out[m] = {"rank": ranks.tolist(), "effective_rank": eranks.tolist(),
                  "claim": [claimed_edim(m, ell) for ell in range(1, depth + 1)]}
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    res = sweep()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (m, r) in enumerate(res.items()):
        depth = range(1, len(r["rank"]) + 1)
        c = f"C{i}"
        ax.plot(depth, [v / m for v in r["rank"]], "o-", color=c, ms=3, label=f"rank / m (m={m})")
        ax.plot(depth, [v / m for v in r["effective_rank"]], "s--", color=c, ms=3, label=f"effective rank / m (m={m})")
        print(f"m={m}: rank/m at depth 1, 2, 12 = " + ", ".join(f"{r['rank'][k] / m:.3f}" for k in (0, 1, -1))
              + "; effective rank/m = " + ", ".join(f"{r['effective_rank'][k] / m:.3f}" for k in (0, 1, -1))
              + "; claim/m = " + ", ".join(f"{r['claim'][k] / m:.3f}" for k in (0, 1, -1)))
    depth = range(1, len(next(iter(res.values()))["rank"]) + 1)
    ax.plot(depth, [1 - (1 - 2 / math.pi) ** ell for ell in depth], "k-", lw=2, label="claim 1 − (1 − 2/π)^ℓ")
    ax.set(xlabel="depth ℓ", ylabel="dimension / width m", title="Random ReLU network, n = 256 samples", ylim=(0, 1.05))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(__file__).resolve().parents[1] / "docs" / "relu_edim.png"
    fig.savefig(out, dpi=100)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
