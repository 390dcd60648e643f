"""Figures of spectra: the empirical spectral density against its fitted null (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from rankscope.spectra import Diagnosis


def esd_figure(panels: list[tuple[str, Diagnosis]], path: Path) -> Path:
    """Histogram of each spectrum with its bulk edge and outliers marked (``Diagnosis.plot``); saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure registry

    # A fixed layout: constrained layout measures every label, which took longer than a small model's analysis.
    fig = Figure(figsize=(6 * len(panels), 4))
    fig.subplots_adjust(left=0.07 if len(panels) > 1 else 0.12, right=0.98, bottom=0.13, top=0.84, wspace=0.18)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, d) in zip(axes[0], panels, strict=True):
        d.plot(ax, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
