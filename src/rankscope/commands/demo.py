"""``rankscope demo``: the null on an untrained GPT-2-small-shaped stack, and planted spikes in a noise matrix."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def _init_heads(d: int, heads: int, dh: int, seed: int, std: float = 0.02):
    """Per-head query and key factors of a freshly initialised attention layer: (H, d, dh), (H, dh, d)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    Wq = torch.randn(heads * dh, d, generator=g) * std  # PyTorch layout [out, in]
    Wk = torch.randn(heads * dh, d, generator=g) * std
    return Wq.view(heads, dh, d).mT, Wk.view(heads, dh, d)  # B_h = Wq_hᵀ Wk_h


def untrained_table(layers: int, fpr: float, seed: int, progress=None) -> Table:
    """Outliers of every head and layer form of an untrained attention stack: product null against naive MP.
    ``progress(done, total, what)`` is called before each step (the first of each shape simulates its null)."""
    from rankscope.spectra import diagnose, diagnose_batch
    from rankscope.vocab import MP

    d, H, dh = 768, 12, 64
    table = Table(title=f"Untrained attention, GPT-2-small shape (d={d}, {H} heads, dh={dh}): outliers "
                        f"by the structure-matched null (fpr={fpr}) and by the naive MP fit",
                  caption="spike = λ_max / bulk edge of the product null (max over heads)")
    for col in ("layer", "form", "rank", "product null", "naive MP", "stable rank", "spike"):
        table.add_column(col, justify="right")
    tick = progress or (lambda done, total, what: None)
    for layer in range(layers):
        tick(2 * layer, 2 * layers, f"layer {layer}: its {H} heads" + (
            f" (first: simulating the {d}·{dh}·{d} null, cached after)" if layer == 0 else ""))
        q, k = _init_heads(d, H, dh, seed + layer)
        prod = diagnose_batch([q, k], fpr=fpr)
        naive = diagnose_batch([q, k], null=MP)
        table.add_row(str(layer), "head (mean)", str(dh),
                      f"{sum(x.outliers for x in prod) / H:.2f}", f"{sum(x.outliers for x in naive) / H:.2f}",
                      f"{sum(x.stable_rank for x in prod) / H:.1f}",
                      f"{max(x.spike_strength for x in prod):.2f} (max)")
        tick(2 * layer + 1, 2 * layers, f"layer {layer}: its form Σ_h B_h" + (
            f" (first: simulating the {d}·{d}·{d} null, cached after)" if layer == 0 else ""))
        Wq_all, Wk_all = q.mT.reshape(H * dh, d), k.reshape(H * dh, d)
        lay = diagnose([Wq_all.T, Wk_all], fpr=fpr)  # the layer's form Σ_h B_h = Wqᵀ Wk
        lay_mp = diagnose([Wq_all.T, Wk_all], null=MP)
        table.add_row("", "layer", str(lay.rank), str(lay.outliers), str(lay_mp.outliers),
                      f"{lay.stable_rank:.1f}", f"{lay.spike_strength:.2f}")
    tick(2 * layers, 2 * layers, "done")
    return table


def planted(console: Console, fpr: float, seed: int) -> None:
    """A 512×1024 noise matrix with three planted spikes, two above the BBP threshold: found where theory says."""
    import torch

    from rankscope.spectra import diagnose, laws

    g = torch.Generator().manual_seed(seed)
    n, m = 512, 1024
    q_ratio = n / m
    thetas = [2.0, 1.4, 0.5]
    U = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64)).Q
    W = U @ torch.diag(torch.tensor(thetas, dtype=torch.float64)) @ V.T
    W = W + torch.randn(n, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    dg = diagnose(W, fpr=fpr)
    spikes = Table(title=f"Planted spikes in a {n}×{m} noise matrix (BBP threshold θ = "
                         f"{laws.bbp_threshold(q_ratio):.3f})")
    for col in ("θ", "detectable", "predicted λ", "observed λ"):
        spikes.add_column(col, justify="right")
    for i, th in enumerate(thetas):
        above = th > laws.bbp_threshold(q_ratio)
        spikes.add_row(f"{th}", "yes" if above else "no",
                       f"{float(laws.bbp_outlier(th, q_ratio)):.4f}" if above else "(bulk)",
                       f"{float(dg.eigenvalues[i]):.4f}")
    console.print(spikes)
    console.print(f"found {dg.outliers} outliers above the bulk edge {dg.bulk_edge:.4f} "
                  f"(fitted σ² = {dg.scale:.4f}, KS = {dg.ks:.3f}, α = {dg.pl_alpha:.2f})")
