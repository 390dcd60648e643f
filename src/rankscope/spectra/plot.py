"""Drawing one spectrum: the histogram of its eigenvalues (the ESD) against its fitted null, outliers marked.

matplotlib is imported inside the functions: the numerics never need it. ``Diagnosis.plot`` and the report's
``esd_figure`` both draw with ``draw_esd``.
"""

from __future__ import annotations

import numpy as np

BINS = 60


def _plain_log_ticks():
    """Tick labels "1e-05", not mathtext "10⁻⁵": typesetting every label took longer than a small analysis."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("1e0", "1"))


def draw_esd(d, ax=None, *, log: bool = True, title: str | None = None):
    """Draw the ESD of the diagnosis ``d`` on ``ax`` (a new pyplot figure when None) and return the Axes.

    The bulk (λ ≤ bulk edge) in blue and the outliers (λ > bulk edge, ``d.outliers`` of them) in red, each outlier
    also marked by a red tick on the axis; the bulk edge as a dashed line; the fitted null (its λ quantiles, scaled
    to this spectrum's count) as a black step histogram. ``log``: log-spaced bins on a log λ axis (spikes sit
    decades above the bulk), else linear. The zero eigenvalues are left out on a log axis.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 4), layout="tight")  # one figure of its own: labels inside it
    lam = d.eigenvalues.detach().cpu().numpy()
    edge = d.bulk_edge
    shown = lam[lam > 0] if log else lam
    if shown.size == 0:
        lo, hi = (1e-3, 1.0) if log else (0.0, 1.0)
    else:
        lo = min(shown.min(), edge) if edge > 0 or not log else shown.min()  # a zero edge has no place on a log axis
        hi = max(shown.max(), edge)
        hi = hi if hi > lo else lo + 1.0
    bins = np.geomspace(lo * 0.9, hi * 1.1, BINS) if log else np.linspace(lo, hi + 0.02 * (hi - lo), BINS)
    out = shown[shown > edge]  # the outliers: strictly above the edge, as ``metrics.outlier_count``
    # one polygon per histogram ("stepfilled"), not a rectangle per bin: a third of the drawing time
    ax.hist(shown[shown <= edge], bins=bins, histtype="stepfilled", color="tab:blue", alpha=0.8, label="bulk")
    if out.size:
        ax.hist(out, bins=bins, histtype="stepfilled", color="tab:red", alpha=0.9)
    ax.plot(out, np.zeros(out.size), linestyle="none", marker="|", markersize=14, markeredgewidth=2,
            color="tab:red", label=f"outliers ({d.outliers})", gid="outliers", clip_on=False)
    ax.axvline(edge, color="k", ls="--", label=f"bulk edge ({d.null} null, fpr={d.fpr})")
    if d.null_quantiles is not None:  # the fitted null as a density, scaled to this spectrum's count
        q = np.asarray(d.null_quantiles)
        q = q[q > 0] if log else q
        if q.size:
            ax.hist(q, bins=bins, weights=np.full(q.size, shown.size / q.size), histtype="step", color="k", lw=1.5,
                    label="fitted null")
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}spike strength {d.spike_strength:.2f}, stable rank {d.stable_rank:.1f}", fontsize=10)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_plain_log_ticks())
    ax.set_xlabel("eigenvalue λ of B Bᵀ" + (" (log scale)" if log else ""))
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return ax
