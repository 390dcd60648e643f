"""Benchmark: attention-head spectra by the chain path (rankscope) against the dense path (form d×d, SVD).

Measures, side by side in one run on this machine (single-threaded torch by default):

1. GPT-2-small shape (12 layers × 12 heads, d=768, dh=64, random float64 factors, std 0.02, seeded):
   (a) chain spectra of all 144 per-head QK forms, 12 batched calls (one per layer);
   (b) the full ``diagnose_batch`` of all 144 heads, with the product null already cached (warmed untimed);
   (c) the dense path: form each 768×768 ``Wq_h.T @ Wk_h`` and ``torch.linalg.svdvals`` it, head by head;
   plus the agreement of the top-64 eigenvalues between the two paths, and (for reference only) the dense
   path in float32 on one layer, since a naive tool might not work in float64 as rankscope does.
2. One LLaMA-7B-like layer (d=4096, 32 heads, dh=128): chain spectra and diagnosis of all 32 heads; dense
   for 2 heads only, extrapolated to 32 (skip with ``--quick``).
3. Product-null calibration for (768, 64, 768) and (4096, 128, 4096): first call (simulation), second call
   (in-memory cache) and a call after clearing the in-memory cache (disk cache).
4. A summary against the targets: ≥ 40× faster than dense on GPT-2-small with the null cached, and a full
   144-head diagnosis in under 0.5 s.

Nulls go to a fresh temporary ``RANKSCOPE_CACHE_DIR``, removed at the end. Anything under ~2 s is timed
as the best of ``--repeats`` runs (first run included, so warm-up costs never count).

Run:  .venv/bin/python benchmarks/spectra.py [--threads N] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

CACHE = tempfile.mkdtemp(prefix="rankscope-bench-")
os.environ["RANKSCOPE_CACHE_DIR"] = CACHE  # before rankscope is imported

import torch  # noqa: E402

import rankscope  # noqa: E402
from rankscope.spectra import budget, nullcache, nulls  # noqa: E402
from rankscope.spectra.kernels import prepare, spectrum  # noqa: E402

TARGET_SPEEDUP, TARGET_DIAG_S = 40.0, 0.5


def best(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> tuple[float, object]:
    """(best wall time, last result) of fn; a single run if the first one takes over 2 s."""
    times, out = [], None
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if times[0] > 2.0:
            break
    return min(times), out


def qk_heads(layers: int, heads: int, d: int, dh: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (Wq, Wk) stored like nn.Linear weights split by head: (H, dh, d) each, std 0.02."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(0.02 * torch.randn(heads, dh, d, generator=g, dtype=torch.float64) for _ in "qk")
            for _ in range(layers)]


def chain_spectra(model):  # per layer one batched call on the chain [Wqᵀ (H, d, dh), Wk (H, dh, d)]
    return [spectrum(prepare([wq.mT, wk], batched=True)) for wq, wk in model]


def chain_diagnosis(model):
    return [d for wq, wk in model for d in rankscope.diagnose_batch([wq.mT, wk])]


def dense_spectra(model, heads: int | None = None, dtype=torch.float64):  # naive: d×d product, full SVD, per head
    return [torch.linalg.svdvals(wq[h].mT.to(dtype) @ wk[h].to(dtype)).square()
            for wq, wk in model for h in range(heads or len(wq))]


def max_rel_diff(chain: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    lam = torch.cat(chain)[: len(dense)]  # (heads, r)
    ref = torch.stack(dense)[:, : lam.shape[-1]]
    return float(((ref - lam).abs() / lam.abs()).max())


def reset_cache(disk: bool) -> None:
    nullcache.CACHE.clear()
    if disk:
        shutil.rmtree(CACHE, ignore_errors=True)
        os.makedirs(CACHE)


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:9.3f} s "
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:9.3f} µs"


def row(label: str, seconds: float, note: str = "") -> None:
    print(f"  {label:<52} {fmt(seconds)}  {note}".rstrip())


def bench_model(name, layers, heads, d, dh, args, dense_heads=None) -> dict:
    print(f"\n== {name}: {layers} layer(s) × {heads} heads, d={d}, dh={dh}, float64 factors ==")
    model = qk_heads(layers, heads, d, dh, seed=0)
    n = layers * heads
    t0 = time.perf_counter()
    nulls.product_null([(d, dh, d)])
    print(f"  (null for {(d, dh, d)} warmed untimed first: {time.perf_counter() - t0:.2f} s)")
    t_spec, lam = best(lambda: chain_spectra(model), args.repeats)
    t_diag, _ = best(lambda: chain_diagnosis(model), args.repeats)
    row(f"chain spectra, {n} heads ({layers} batched call(s))", t_spec, f"{fmt(t_spec / n).strip()}/head")
    row(f"chain diagnose_batch, {n} heads (null cached)", t_diag, f"{fmt(t_diag / n).strip()}/head")
    res = {"n": n, "spec": t_spec, "diag": t_diag}
    if dense_heads == 0:
        print("  dense path skipped (--quick)")
        return res
    t_dense, ev = best(lambda: dense_spectra(model, dense_heads), args.repeats)
    if dense_heads:
        per = t_dense / dense_heads
        row(f"dense svdvals, {dense_heads} heads measured", t_dense, f"{fmt(per).strip()}/head")
        t_dense = per * n
        row(f"dense svdvals, {n} heads EXTRAPOLATED ({dense_heads} × {n // dense_heads})", t_dense)
    else:
        row(f"dense svdvals, {n} heads (one {d}×{d} at a time)", t_dense, f"{fmt(t_dense / n).strip()}/head")
        t32, _ = best(lambda: dense_spectra(model[:1], dtype=torch.float32), args.repeats)
        row(f"  for reference: dense in float32, {heads} heads", t32,
            f"{fmt(t32 / heads).strip()}/head; ×{layers} layers = {t32 * layers / t_diag:.1f}× chain diagnosis")
    res["dense"] = t_dense
    tag = " (extrapolated)" if dense_heads else ""
    print(f"  ratio dense / chain spectra   : {t_dense / t_spec:8.1f}×{tag}")
    print(f"  ratio dense / chain diagnosis : {t_dense / t_diag:8.1f}×{tag}")
    print(f"  agreement, top-{dh} eigenvalues over {len(ev)} heads: max rel diff {max_rel_diff(lam, ev):.2e}")
    return res


def bench_null(dims: tuple[int, int, int], repeats: int) -> None:
    shape = [dims]
    t_sim, _ = best(lambda: nulls.product_null(shape), repeats, setup=lambda: reset_cache(disk=True))
    t_mem, _ = best(lambda: nulls.product_null(shape), repeats)
    t_disk, _ = best(lambda: nulls.product_null(shape), repeats, setup=lambda: reset_cache(disk=False))
    print(f"  {dims!s:<18} draws={budget.default_draws(shape)}")
    row("first call (simulate + save)", t_sim)
    row("second call (in-memory cache)", t_mem, f"simulation / memory = {t_sim / t_mem:,.0f}×")
    row("after clearing the memory cache (disk cache)", t_disk, f"simulation / disk = {t_sim / t_disk:,.0f}×")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats for timings under ~2 s")
    p.add_argument("--quick", action="store_true", help="skip the (slow) dense LLaMA heads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    print(f"rankscope {rankscope.__version__}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}, cache={CACHE}")
    print("machine load average (1/5/15 min): {:.2f} {:.2f} {:.2f}, cpus={}".format(*os.getloadavg(), os.cpu_count()))
    gpt2 = bench_model("GPT-2-small", 12, 12, 768, 64, args)
    bench_model("LLaMA-7B-like layer", 1, 32, 4096, 128, args, dense_heads=0 if args.quick else 2)
    print("\n== Product-null calibration ==")
    for dims in [(768, 64, 768), (4096, 128, 4096)]:
        bench_null(dims, args.repeats)
    speedup = gpt2["dense"] / gpt2["diag"]
    print("\n== Summary (GPT-2-small, 144 heads, null cached) ==")
    print(f"  dense / chain diagnosis = {speedup:.1f}× (target ≥ {TARGET_SPEEDUP:.0f}×): "
          f"{'MET' if speedup >= TARGET_SPEEDUP else 'MISSED'}")
    print(f"  full 144-head diagnosis = {gpt2['diag']:.3f} s (target < {TARGET_DIAG_S} s): "
          f"{'MET' if gpt2['diag'] < TARGET_DIAG_S else 'MISSED'}")
    print(f"  (dense / chain spectra only = {gpt2['dense'] / gpt2['spec']:.1f}×)")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)
