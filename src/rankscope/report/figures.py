"""Figures of spectra: the empirical spectral density against its fitted null (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.spectra import Diagnosis


def esd_figure(panels: list[tuple[str, Diagnosis]], path: Path) -> Path:
    """Histogram of each spectrum with its bulk edge and outliers marked; saved as PNG to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure registry
    from matplotlib.ticker import FuncFormatter

    # A fixed layout and plain "1e-05" tick labels: constrained layout and mathtext "10⁻⁵" labels measure
    # and typeset every label, which took longer than the whole analysis of a small model.
    fig = Figure(figsize=(6 * len(panels), 4))
    fig.subplots_adjust(left=0.07 if len(panels) > 1 else 0.12, right=0.98, bottom=0.13, top=0.84, wspace=0.18)
    axes = fig.subplots(1, len(panels), squeeze=False)
    plain = FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("1e0", "1"))
    for ax, (title, d) in zip(axes[0], panels, strict=True):
        lam = d.eigenvalues.numpy()
        lam = lam[lam > 0]
        lo = min(lam.min(), d.bulk_edge) if lam.size else 1e-3
        hi = max(lam.max(), d.bulk_edge) if lam.size else 1.0
        bins = np.geomspace(lo * 0.9, hi * 1.1, 60)  # log-spaced: spikes sit decades above the bulk
        # one polygon per histogram ("stepfilled"), not a rectangle per bin: a third of the drawing time
        ax.hist(lam[lam <= d.bulk_edge], bins=bins, histtype="stepfilled", color="tab:blue", alpha=0.8, label="bulk")
        ax.hist(lam[lam > d.bulk_edge], bins=bins, histtype="stepfilled", color="tab:red", alpha=0.9,
                label=f"outliers ({d.outliers})")
        ax.axvline(d.bulk_edge, color="k", ls="--", label=f"bulk edge ({d.null} null, fpr={d.fpr})")
        if d.null_quantiles is not None:  # the fitted null as a density, scaled to this spectrum's count
            q = d.null_quantiles
            ax.hist(q, bins=bins, weights=np.full(q.size, lam.size / q.size), histtype="step", color="k",
                    lw=1.5, label="fitted null")
        ax.set_title(f"{title}\nspike strength {d.spike_strength:.2f}, stable rank {d.stable_rank:.1f}", fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("eigenvalue λ of B Bᵀ (log scale)")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
