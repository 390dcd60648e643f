"""Diagnosis.plot: one ESD on an Agg canvas, the outliers marked one by one, the bulk edge drawn where it is."""

import math

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import rankscope as rs
from rankscope.report.figures import esd_figure

matplotlib.use("Agg", force=True)  # no display: the pyplot path (ax=None) draws off-screen too


def spiked(spikes: int, seed: int = 0) -> rs.Diagnosis:
    """A 200×100 Gaussian matrix with ``spikes`` planted directions, each far above the MP edge."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(200, 100, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(200, spikes, generator=g, dtype=torch.float64)).Q if spikes else None
    v = torch.linalg.qr(torch.randn(100, spikes, generator=g, dtype=torch.float64)).Q if spikes else None
    return rs.diagnose(w + (40 * u @ v.T if spikes else 0))


def marked(ax) -> np.ndarray:
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "outliers"]
    return np.asarray(line.get_xdata())


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("spikes", [0, 3])
def test_the_marked_outliers_are_the_eigenvalues_above_the_edge(spikes, log):
    d = spiked(spikes)
    assert d.outliers == spikes  # 40 × √(200·100)-scaled spikes against an edge near (√200 + √100)² ≈ 580
    fig = Figure()
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    assert d.plot(ax, log=log) is ax
    xs = marked(ax)
    assert len(xs) == d.outliers
    lam = d.eigenvalues.numpy()
    np.testing.assert_allclose(np.sort(xs), np.sort(lam[lam > d.bulk_edge]))
    edges = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(edges) == 1 and edges[0].get_xdata()[0] == pytest.approx(d.bulk_edge)
    assert ax.get_xscale() == ("log" if log else "linear")
    canvas.draw()  # it renders
    assert canvas.buffer_rgba().shape[:2] == (480, 640)


def test_without_axes_it_makes_a_figure_and_draws_degenerate_spectra():
    import matplotlib.pyplot as plt

    for d in (rs.diagnose(torch.zeros(30, 20)), rs.diagnose(torch.ones(30, 1) @ torch.ones(1, 20))):
        ax = d.plot()
        assert len(marked(ax)) == d.outliers
        ax.figure.canvas.draw()
        plt.close(ax.figure)
    assert math.isinf(d.spike_strength)  # the rank-one matrix: a zero bulk edge, drawn on a log axis all the same


def test_esd_figure_draws_each_panel_with_the_same_code(tmp_path):
    a, b = spiked(2), spiked(0, seed=1)
    path = esd_figure([("spiked", a), ("noise", b)], tmp_path / "esd.png")
    assert path.stat().st_size > 10_000
